"""The ``kvstore`` console script and the trace replay behind its second table."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest

from store.cli import DEFAULT_TRACE as TRACE
from store.cli import main
from store.replay import Request, read_trace, replay

needs_trace = pytest.mark.skipif(not os.path.exists(TRACE), reason=f"trace {TRACE} not present")


def test_bench_runs_end_to_end_and_writes_json(tmp_path, capsys, redis_url):
    out = tmp_path / "bench.json"
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [0, 1, 2]}\n' * 3
    )
    rc = main(
        [
            "bench",
            "--tiers",
            "cpu,disk,redis",
            "--sizes",
            "64KiB",
            "--total",
            "256KiB",
            "--json",
            str(out),
            "--set",
            f"disk.path={tmp_path}",
            "--set",
            f"redis.url={redis_url}",
            "--trace",
            str(trace),
            "--capacities",
            "2,10",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["tier"] for r in report["throughput"]] == ["cpu", "disk", "redis"]
    assert all(r["put"] > 0 and r["get"] > 0 and r["base_put"] > 0 for r in report["throughput"])
    # 3 identical requests of 3 blocks: the 2nd and 3rd hit 1100 tokens each with room for 3 blocks
    assert report["replay"][1] == {
        "capacity_blocks": 10,
        "readme_lru": None,
        "lru": 2 / 3,
        "s3fifo": 2 / 3,
    }
    text = capsys.readouterr().out
    assert "memcpy" in text and "trace replay" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--tiers", "tape"], "--tiers: tape not benchmarkable"),
        (["bench", "--sizes", "big"], "--sizes: 'big' is not a size"),
        (["bench", "--set", "cpu.size"], "expected KEY=VALUE"),
        (["bench", "--set", "cpu.size=huge"], "cpu.size: 'huge' is not a size"),
        (["bench", "--trace", "/nonexistent.jsonl"], "--trace: /nonexistent.jsonl does not exist"),
        (["bench", "--capacities", "x"], "--capacities"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _plain_lru(requests: list[Request], capacity: int) -> float:
    """The trace README's reference: a prefix-chain LRU of ``capacity`` blocks."""
    cache: OrderedDict[tuple, None] = OrderedDict()
    hit = total = 0
    for r in requests:
        chain = [tuple(r.hash_ids[: i + 1]) for i in range(len(r.hash_ids))]
        n = next((i for i, c in enumerate(chain) if c not in cache), len(chain))
        hit += min(n * 512, r.input_length)
        total += r.input_length
        for c in chain:
            cache[c] = None
            cache.move_to_end(c)
            while len(cache) > capacity:
                cache.popitem(last=False)
    return hit / total


@needs_trace
def test_store_lru_replay_reproduces_the_reference_lru():
    requests = read_trace(TRACE, limit=400)
    for capacity in (50, 400):
        assert replay(requests, capacity, "lru").hit_ratio == pytest.approx(
            _plain_lru(requests, capacity), abs=0.002
        )


@needs_trace
def test_s3fifo_beats_lru_at_small_capacity_on_the_trace():
    requests = read_trace(TRACE, limit=1500)
    assert (
        replay(requests, 1000, "s3fifo").hit_ratio > 1.1 * replay(requests, 1000, "lru").hit_ratio
    )
