"""The server's pieces in-process: chat templates, stream deltas, request checks."""

from __future__ import annotations

import json

import pytest

from engine.presets import save_preset
from engine.server.chat import ChatTemplate, ChatTemplateError
from engine.server.protocol import ApiError, parse_chat, parse_completion
from engine.server.responses import TextDeltas

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = save_preset("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    cfg["eos_token"] = {"content": "</s>", "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_a_checkpoints_template_renders_with_its_special_tokens(checkpoint):
    t = ChatTemplate.for_model(str(checkpoint))
    assert not t.is_plain
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert t.render(msgs) == "<s><|system|>S</s>\n<|user|>U</s>\n<|assistant|>"
    with pytest.raises(ApiError) as exc:
        t.render([{"role": "tool", "content": "x"}])
    assert exc.value.status == 400 and "no tools here" in exc.value.message


def test_named_templates_a_jinja_file_and_the_plain_fallback(tmp_path, checkpoint):
    assert ChatTemplate.for_model("tiny").render([{"role": "user", "content": "hi"}]) == (
        "user: hi\nassistant:"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "T"},
                    {"name": "default", "template": "D"},
                ]
            }
        )
    )
    assert ChatTemplate.for_model(str(tmp_path)).render([]) == "D"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert ChatTemplate.for_model(str(tmp_path)).render([{"role": "user", "content": ""}]) == "J1"
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate.for_model(str(tmp_path))


def test_text_deltas_hold_back_partial_stop_strings_and_broken_utf8():
    d = TextDeltas(["STOP"])
    assert d.next("hello S", False) == "hello "  # "S" could begin "STOP"
    assert d.next("hello ST", False) == ""
    assert d.next("hello STa\ufffd", False) == "STa"
    assert d.next("hello STab", True) == "b"
    d = TextDeltas([])
    assert d.next("a\ufffd", False) == "a" and d.next("ab", True) == "b"


def test_request_checks():
    req = parse_completion(
        {
            "model": "m",
            "prompt": ["one"],
            "stop": "x",
            "seed": 3,
            "cache_salt": "t",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        "m",
    )
    assert (req.prompt, req.params.stop, req.params.seed, req.cache_salt) == ("one", ["x"], 3, "t")
    assert req.stream and req.include_usage and req.params.max_tokens == 16
    chat = parse_chat(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
        },
        "m",
        100,
    )
    assert chat.messages[0]["content"] == "ab" and chat.params.max_tokens == 100
    for body, param in (
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": "a", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "a", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "a", "cache_salt": ""}, "cache_salt"),
        ({"model": "m", "prompt": "a", "logprobs": 2}, "logprobs"),
        ([1, 2], None),
    ):
        with pytest.raises(ApiError) as exc:
            parse_completion(body, "m")
        assert exc.value.param == param and exc.value.status == 400
