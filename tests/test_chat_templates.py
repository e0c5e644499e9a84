"""--chat-template chatml|zephyr|FILE.jinja: the built-ins' exact text and assistant masks, finetune
saving the template (tokens, resized embeddings, the end of turn a stop), chat and serve applying one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import finetune_args, meta, run_llmkit
from serving import Server

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
]
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    ),
    "zephyr": (
        "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nWhat is 2+3?<|endoftext|>\n"
        "<|assistant|>\n5<|endoftext|>\n"
    ),
}
PROMPT = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "zephyr": "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nWhat is 2+3?<|endoftext|>\n<|assistant|>\n",
}
END = {"chatml": "<|im_end|>", "zephyr": "<|endoftext|>"}  # the tiny tokenizer's EOS is <|endoftext|>


def _templated(tiny_model: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.templates import apply_template, resolve_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    added = apply_template(tok, model, resolve_template(name))
    return tok, model, added


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
def test_builtin_templates_render_the_real_formats(name: str, tiny_model: Path) -> None:
    tok, model, added = _templated(tiny_model, name)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED[name]
    assert (
        tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True) == PROMPT[name]
    )
    assert added == (["<|im_start|>", "<|im_end|>"] if name == "chatml" else [])
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert tok.eos_token_id in eos and tok.convert_tokens_to_ids(END[name]) in eos
    # The markers are single tokens, so a reply can stop at one.
    assert tok.convert_tokens_to_ids(END[name]) in tok(EXPECTED[name])["input_ids"]


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
def test_assistant_mask_is_the_reply_and_its_end_of_turn(name: str, tiny_model: Path) -> None:
    tok, _, _ = _templated(tiny_model, name)
    conversation = [
        *CONVERSATION,
        {"role": "user", "content": "And 1+1?"},
        {"role": "assistant", "content": "2"},
    ]
    enc = tok.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    spans: list[list[int]] = []
    for i, (token, on) in enumerate(zip(ids, mask, strict=True)):
        if on:
            if not spans or not mask[i - 1]:
                spans.append([])
            spans[-1].append(token)
    assert [tok.decode(s) for s in spans] == [f"5{END[name]}", f"2{END[name]}"]


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model fine-tuned a few steps with --chat-template chatml."""
    root = tmp_path_factory.mktemp("chatml")
    data = root / "text.txt"
    data.write_text("The cat sees the moon. A dog likes the sea.\n" * 100)
    out = root / "run"
    result = run_llmkit(
        *finetune_args(data, out, tiny_model, "--max-steps", "3", "--chat-template", "chatml")
    )
    assert result.returncode == 0, result.stderr
    return out


def test_finetune_saves_the_template_tokens_and_stops(chatml_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatml_run)
    model = AutoModelForCausalLM.from_pretrained(chatml_run)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED["chatml"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.get_vocab())
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    eos = model.generation_config.eos_token_id
    assert isinstance(eos, list) and tok.eos_token_id in eos and im_end in eos
    assert meta(chatml_run)["config"]["chat_template"] == "chatml"
    # Plain transformers chats with it: the prompt ends at the assistant's turn, generate stops at a marker.
    ids = tok.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_chat_uses_the_saved_template_with_no_flag(chatml_run: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    piped = "\n".join(json.dumps(m) for m in CONVERSATION[:2]) + "\n"
    result = run_llmkit("-v", "chat", "-m", chatml_run, "--greedy", "-n", "8", input=piped)
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(chatml_run)
    model = AutoModelForCausalLM.from_pretrained(chatml_run, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert f"{ids['input_ids'].shape[1]} prompt tokens" in result.stderr  # the template's rendering
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result.stdout == expected + "\n"


def test_chat_template_overrides_the_models_own(chatml_run: Path) -> None:
    from transformers import AutoTokenizer

    from llmkit.templates import ZEPHYR

    piped = "\n".join(json.dumps(m) for m in CONVERSATION[:2]) + "\n"
    result = run_llmkit(
        "-v", "chat", "-m", chatml_run, "--chat-template", "zephyr", "--greedy", "-n", "2", input=piped
    )
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(chatml_run)
    own = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)["input_ids"]
    tok.chat_template = ZEPHYR
    zephyr = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)["input_ids"]
    assert len(own) != len(zephyr) and f"{len(zephyr)} prompt tokens" in result.stderr


def test_chat_template_on_a_model_without_one(cli, tiny_model: Path) -> None:
    piped = json.dumps({"role": "user", "content": "Hello"}) + "\n"
    result = cli("chat", "-m", tiny_model, "--chat-template", "chatml", "--greedy", "-n", "4", input=piped)
    assert result.exit_code == 0, result.stderr
    assert "added <|im_start|>, <|im_end|>" in result.stderr and "never seen" in result.stderr
    quiet = cli("chat", "-m", tiny_model, "--chat-template", "zephyr", "--greedy", "-n", "4", input=piped)
    assert quiet.exit_code == 0, quiet.stderr
    assert "never seen" not in quiet.stderr


def test_serve_with_a_chat_template(tiny_model: Path) -> None:
    server = Server("-m", tiny_model, "--chat-template", "chatml")
    try:
        status, body = server.post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
        )
        assert status == 200, body
        tok, _, _ = _templated(tiny_model, "chatml")
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        ids = rendered["input_ids"]
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # a marker is one token
        assert "never seen" in server.stderr
    finally:
        server.stop()


def test_a_jinja_file_and_bad_ones(cli, tiny_model: Path, tmp_path: Path) -> None:
    good = tmp_path / "mine.jinja"
    good.write_text(
        "{% for m in messages %}<|turn|>{{ m['role'] }}: {{ m['content'] }}<|done|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|turn|>assistant: {% endif %}"
    )
    piped = json.dumps({"role": "user", "content": "Hello"}) + "\n"
    result = cli("chat", "-m", tiny_model, "--chat-template", good, "--greedy", "-n", "3", input=piped)
    assert result.exit_code == 0, result.stderr
    assert "added <|turn|>, <|done|>" in result.stderr

    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    result = cli("chat", "-m", tiny_model, "--chat-template", broken, input=piped)
    assert result.exit_code == 2  # a usage error, like an unknown option value
    assert result.stderr.startswith(f"Error: --chat-template {broken}: not a usable chat template")
    empty = tmp_path / "empty.jinja"
    empty.write_text("nothing here")
    result = cli("chat", "-m", tiny_model, "--chat-template", empty, input=piped)
    assert result.exit_code == 2 and "does not render the messages' content" in result.stderr
    result = cli("chat", "-m", tiny_model, "--chat-template", tmp_path / "missing.jinja", input=piped)
    assert result.exit_code == 2 and "no such template or file" in result.stderr
    assert "chatml, zephyr" in result.stderr


def test_serve_and_remote_chat_refuse_before_loading(cli, tmp_path: Path) -> None:
    # No model is loaded (-m names nothing that exists): the template is checked first.
    result = cli("serve", "-m", tmp_path / "nowhere", "--port", "0", "--chat-template", tmp_path / "x.jinja")
    assert (
        result.exit_code == 2 and "--chat-template" in result.stderr and "no such template" in result.stderr
    )
    piped = json.dumps({"role": "user", "content": "Hello"}) + "\n"
    result = cli("chat", "--server", "http://127.0.0.1:9", "--chat-template", "chatml", input=piped)
    assert result.exit_code == 2 and "start the server with it" in result.stderr


def test_lora_refuses_a_template_that_adds_tokens(cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("The cat sees the moon.\n" * 50)
    result = cli(*finetune_args(data, tmp_path / "out", tiny_model, "--lora", "--chat-template", "chatml"))
    assert result.exit_code != 0
    assert "LoRA adapter can't carry new embedding rows" in result.stderr
    assert "--chat-template zephyr" in result.stderr


def test_lora_with_zephyr_saves_the_template_with_the_adapter(cli, tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    data = tmp_path / "text.txt"
    data.write_text("The cat sees the moon.\n" * 50)
    out = tmp_path / "adapter"
    flags = ("--lora", "--chat-template", "zephyr", "--max-steps", "2")
    result = cli(*finetune_args(data, out, tiny_model, *flags))
    assert result.exit_code == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED["zephyr"]
    piped = "\n".join(json.dumps(m) for m in CONVERSATION[:2]) + "\n"
    result = cli("-v", "chat", "-m", out, "--greedy", "-n", "3", input=piped)
    assert result.exit_code == 0, result.stderr
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)["input_ids"]
    assert f"{len(prompt)} prompt tokens" in result.stderr  # the adapter's template, no flag


def test_a_resumed_chatml_run_is_the_uninterrupted_one(cli, tiny_model: Path, tmp_path: Path) -> None:
    """The checkpoint holds the grown embeddings: a resume re-applies the template, then loads them."""
    import shutil

    from safetensors.torch import load_file

    data = tmp_path / "text.txt"
    data.write_text("The cat sees the moon. A dog likes the sea.\n" * 50)
    flags = ("--chat-template", "chatml", "--max-steps", "4", "--save-every", "2")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert cli(*finetune_args(data, whole, tiny_model, *flags)).exit_code == 0
    resumed.mkdir()
    shutil.copytree(whole / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    result = cli(*finetune_args(data, resumed, tiny_model, *flags, "--resume"))
    assert result.exit_code == 0, result.stderr
    assert "resuming from" in result.stderr and "at step 2/4" in result.stderr
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_no_template_hint_names_the_option(cli, tiny_model: Path) -> None:
    result = cli("chat", "-m", tiny_model, input="Hello\n")
    assert result.exit_code == 1 and "Hint: pass --chat-template chatml" in result.stderr
