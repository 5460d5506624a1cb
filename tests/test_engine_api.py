"""The LLM API and CLI on the tiny preset: sampling, stopping, metrics, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, InvalidRequestError, ModelLoadError, SamplingParams
from engine.presets import PRESETS, save_preset


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", kv_cache_memory="16MiB")


def test_text_in_text_out(llm):
    out = llm.generate("Hello, world", SamplingParams(temperature=0, max_tokens=8))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.metrics.ttft is not None and out.metrics.ttft > 0
    assert out.metrics.num_prompt_tokens == len(llm.tokenizer.encode("Hello, world"))


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, max_tokens=12, seed=42)
    alone = llm.generate("abc", p)[0].token_ids
    batched = llm.generate(
        ["xyz", "abc", "hello"],
        [
            SamplingParams(temperature=1.0, max_tokens=12),
            p,
            SamplingParams(temperature=0.7, max_tokens=5),
        ],
    )
    assert batched[1].token_ids == alone
    other_seed = llm.generate("abc", SamplingParams(temperature=1.0, max_tokens=12, seed=43))[0]
    assert other_seed.token_ids != alone


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10))[0].token_ids
    top1 = llm.generate("abc", SamplingParams(temperature=1.3, top_k=1, max_tokens=10, seed=3))[0]
    tiny_p = llm.generate(
        "abc", SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, seed=3)
    )[0]
    assert top1.token_ids == greedy and tiny_p.token_ids == greedy


def test_logprobs_of_chosen_tokens(llm):
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=6, logprobs=True))[0]
    assert len(out.logprobs) == 6
    assert all(lp <= 0 for lp in out.logprobs)
    prompt = llm.engine.tokenize("abc")
    ids = prompt + out.token_ids
    # the last logprob equals the one of a from-scratch pass over prompt + all but one token
    fresh = LLM("tiny", kv_cache_memory="4MiB")
    ref = fresh.generate([ids[:-1]], SamplingParams(temperature=0, max_tokens=1, logprobs=True))[0]
    assert ref.token_ids == [ids[-1]]
    assert ref.logprobs[0] == pytest.approx(out.logprobs[-1], abs=1e-5)


def test_stop_token_ids_and_strings(llm):
    free = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10))[0]
    stop_tok = free.token_ids[3]
    out = llm.generate(
        "abc", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok])
    )[0]
    first = free.token_ids.index(stop_tok)
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert out.text == llm.tokenizer.decode(free.token_ids[:first])
    needle = free.text[5:7]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, stop=[needle]))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(needle)]


def test_eos_stops_unless_ignored(tmp_path):
    llm = LLM("tiny", kv_cache_memory="4MiB")
    free = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=10))[0]
    llm.engine.eos_token_ids = frozenset({free.token_ids[2]})
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=10))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:3]
    ignored = llm.generate(
        [5, 6, 7], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    )[0]
    assert ignored.token_ids == free.token_ids


def test_generation_stops_at_the_context_length():
    llm = LLM("tiny", kv_cache_memory="4MiB", max_model_len=20)
    out = llm.generate([5] * 15, SamplingParams(temperature=0, max_tokens=50))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_abort_frees_blocks(llm):
    eng = llm.engine
    req = eng.add_request("some prompt text", SamplingParams(max_tokens=100))
    eng.step()
    assert eng.abort_request(req.request_id)
    assert not eng.abort_request(req.request_id)
    assert eng.kv.pool.num_free_blocks == eng.kv.num_blocks
    eng.kv.check_integrity()


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", None, "prompt is empty"),
        ([], None, "no prompts given"),
        ([[]], None, "prompt is empty"),
        ([[5, 99999]], None, "outside the vocabulary"),
        ([[5] * 5000], None, "prompt has 5000 tokens; the context is"),
    ],
)
def test_bad_prompts(llm, prompt, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(prompt, params)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"stop": [""]}, "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_one_bad_prompt_admits_none(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6], []])
    assert not llm.engine.has_unfinished()


def test_unknown_model_and_broken_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'nope': not a built-in preset"):
        LLM("nope")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        LLM(str(tmp_path))
    ckpt = save_preset("tiny", tmp_path / "ck")
    (ckpt / "model.safetensors").rename(tmp_path / "weights.bak")
    with pytest.raises(ModelLoadError, match=r"has no \*.safetensors weights"):
        LLM(str(ckpt))
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read"):
        LLM(str(ckpt))
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        LLM(str(ckpt))


def test_missing_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = save_preset("tiny", tmp_path / "ck")
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing weight model.layers.1.mlp.up_proj.weight"):
        LLM(str(ckpt))


def test_saved_preset_matches_hf_and_sharded_checkpoints_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = save_preset("tiny", tmp_path / "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompt = [10, 20, 30, 40, 50]
    hf.generation_config.eos_token_id = None
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert LLM("tiny").generate([prompt], p)[0].token_ids == ref
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert LLM(str(sharded)).generate([prompt], p)[0].token_ids == ref


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=120,
    )


def test_cli_generate_json():
    r = _cli("generate", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    assert out["metrics"]["num_prompt_tokens"] > 0 and out["metrics"]["ttft_s"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope", "--prompt", "hi"], "unknown model 'nope'"),
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "hi", "--max-tokens", "0"], "max_tokens must be at least 1"),
        (["--prompt", "hi", "--max-tokens", "x"], "invalid int value"),
        (["--prompt", "x" * 5000], "prompt has 5000 tokens"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    r = _cli("generate", *args)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_presets_are_small_and_realistic():
    from engine.models.llama import hf_weight_names  # noqa: F401 (names used by loaders)

    tiny, bench = PRESETS["tiny"], PRESETS["bench"]
    n_bench = _params(bench)
    assert _params(tiny) * 4 < 5 * 2**20  # a few MB
    assert 80e6 < n_bench < 130e6 and bench.num_kv_heads < bench.num_heads


def _params(c) -> int:
    per_layer = (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
        + 3 * c.hidden_size * c.intermediate_size
    )
    emb = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return per_layer * c.num_layers + emb
