"""``kvrouter --api-key`` (issue 13, item 8): clients need the router's key on every route
but ``/health`` and ``/metrics``; backends get the router's own backend key, never the
client's."""

from __future__ import annotations

import json
import socket

from router_upstream import get, post

from router.cli import main

UNAUTHORIZED = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


def raw_request(port: int, auth: bytes) -> int:
    """The status of a request whose Authorization header holds arbitrary bytes."""
    body = b'{"prompt": "hi"}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: " + auth + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split()[1])


def assert_unauthorized(status: int, body: dict) -> None:
    assert status == 401
    err = body["error"]
    assert {k: err[k] for k in UNAUTHORIZED} == UNAUTHORIZED and err["message"]


def test_api_key_guards_everything_but_health_and_metrics(ups, start_router):
    a = ups.start("a")
    r = start_router(
        "--backend", a.url, "--api-key", "client-key", "--backend-api-key", "backend-key"
    )
    for token in (None, "wrong", "backend-key"):
        assert_unauthorized(*post(r.url + "/v1/completions", {"prompt": "hi"}, token=token)[:2])
        assert_unauthorized(
            *post(r.url + "/v1/chat/completions", {"messages": []}, token=token)[:2]
        )
        status, text = get(r.url + "/v1/models", token)
        assert_unauthorized(status, json.loads(text))
    assert raw_request(r.port, b"Bearer \xff\xfe\x80") == 401
    assert raw_request(r.port, b"Bearer client-key\xc3\xa9") == 401
    assert a.requests == []
    assert get(r.url + "/health")[0] == 200 and get(r.url + "/metrics")[0] == 200
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "hi"}, token="client-key")
    assert status == 200 and body["backend"] == "a"
    assert get(r.url + "/v1/models", "client-key")[0] == 200
    # the backend sees the router's key, never the client's, on requests and on probes
    assert a.headers[-1]["authorization"] == "Bearer backend-key"
    assert a.probe_headers and all(
        h.get("authorization") == "Bearer backend-key" for h in a.probe_headers
    )


def test_keys_from_the_environment(ups, start_router):
    a = ups.start("a")
    r = start_router("--backend", a.url, env={"KVSTORE_API_KEY": "env-key"})
    assert_unauthorized(*post(r.url + "/v1/completions", {"prompt": "hi"})[:2])
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "hi"}, token="env-key")
    assert status == 200
    assert "authorization" not in a.headers[-1]  # no backend key: the client's is not passed
    b = ups.start("b")
    r = start_router("--backend", b.url, env={"KVSTORE_BACKEND_API_KEY": "env-backend"})
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "hi"}, token="anything")
    assert status == 200 and b.headers[-1]["authorization"] == "Bearer env-backend"


def test_api_key_files(ups, start_router, tmp_path):
    a = ups.start("a")
    (tmp_path / "key").write_text("file-key\n")
    (tmp_path / "bkey").write_text("file-backend\n")
    r = start_router(
        "--backend",
        a.url,
        "--api-key-file",
        str(tmp_path / "key"),
        "--backend-api-key-file",
        str(tmp_path / "bkey"),
    )
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "hi"}, token="file-key")
    assert status == 200 and a.headers[-1]["authorization"] == "Bearer file-backend"


def test_api_key_cli_errors_exit_2(capsys, tmp_path):
    (tmp_path / "key").write_text("k\n")
    assert (
        main(["serve", "--backend", "a", "--api-key", "k", "--api-key-file", str(tmp_path / "key")])
        == 2
    )
    assert "not both" in capsys.readouterr().err
    assert main(["serve", "--backend", "a", "--backend-api-key-file", str(tmp_path / "no")]) == 2
    assert "cannot read the backend API key file" in capsys.readouterr().err
    assert main(["serve", "--backend", "a", "--api-key", ""]) == 2
    assert "API key is empty" in capsys.readouterr().err
