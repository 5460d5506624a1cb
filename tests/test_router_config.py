"""``kvrouter serve`` arguments and RouterConfig checks."""

from __future__ import annotations

import pytest

from router.cli import main
from router.config import RouterConfig


def test_kv_event_sources_follow_the_backends():
    cfg = RouterConfig(
        prefill=["p:1"],
        decode=["http://d:2/"],
        kv_events=["tcp://p:5557", "tcp://d:5557,tcp://d:5558"],
    )
    assert cfg.kv_event_sources() == [
        ("http://p:1", "tcp://p:5557", None),
        ("http://d:2", "tcp://d:5557", "tcp://d:5558"),
    ]
    named = RouterConfig(backends=["a:1", "b:1"], kv_events=["http://b:1=tcp://b:9"])
    assert named.kv_event_sources() == [("http://b:1", "tcp://b:9", None)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no backends"),
        ({"backends": ["a"], "decode": ["d"]}, "not both"),
        ({"prefill": ["p"]}, "needs at least one --decode"),
        ({"backends": ["a"], "policy": "random"}, "unknown policy"),
        ({"backends": ["a"], "block_size": 0}, "block size"),
        ({"backends": ["a"], "health_interval": 0}, "health-interval must be > 0"),
        (
            {"backends": ["a"], "kv_events": ["tcp://x:1", "tcp://y:1"]},
            "more endpoints than backends",
        ),
        ({"backends": ["a"], "kv_events": ["http://z:1=tcp://x:1"]}, "is not a backend"),
        ({"backends": ["a"], "api_key": ""}, "the API key is empty"),
        ({"backends": ["a"], "backend_api_key": "a b"}, "backend API key must be printable ASCII"),
        ({"backends": ["a"], "api_key": "clé"}, "API key must be printable ASCII"),
        ({"backends": ["a"], "max_body_bytes": 100}, "max-body-bytes must be >= 1024"),
        ({"backends": ["a"], "route_prefix_tokens": 8}, "route-prefix-tokens must be >= the block"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_cli_errors_exit_2(capsys, tmp_path):
    assert main(["serve", "--backend", "a", "--decode", "d"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve", "--backend", "a", "--auth-token-file", str(tmp_path / "none")]) == 2
    assert "cannot read the API key file" in capsys.readouterr().err
