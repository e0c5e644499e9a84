"""Decoder-only families beside GPT-2, built tiny and local: each command does what the model's own
tokenizer expects (a BOS before text for Llama-style tokenizers, nothing for GPT-2 and Qwen2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from serving import Server
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit import data
from llmkit.testing import FAMILIES, build_tiny_family

TEXT = "The cat sees the moon. A dog likes the sea.\nThe old king sings to her brother."
PROMPT = "The cat"
MESSAGES = [{"role": "user", "content": "Who sees the moon?"}]


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2", "phi3"])
def family(request, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    if request.param == "gpt2":
        return "gpt2", tiny_model
    return request.param, build_tiny_family(
        tmp_path_factory.mktemp("families") / request.param, request.param
    )


def reference(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def nll_of(model, ids: list[int]) -> tuple[float, int]:
    """Summed NLL of ids[1:] given what precedes each, in one forward pass (plain transformers)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")), len(
        ids
    ) - 1


def test_the_tokenizers_conventions_are_what_the_real_ones_are(family) -> None:
    name, path = family
    tok = AutoTokenizer.from_pretrained(path)
    adds_bos = tok("x")["input_ids"][0] == tok.bos_token_id and tok.bos_token_id is not None
    assert adds_bos == FAMILIES.get(name, False)


def test_greedy_generation_is_transformers_on_the_tokenizers_own_ids(family, cli) -> None:
    _name, path = family
    tok, model = reference(path)
    ids = tok(PROMPT, return_tensors="pt")  # with the BOS where the tokenizer adds one
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    got = cli(
        "generate", "-m", path, PROMPT, "-n", "8", "--min-new-tokens", "8", "--greedy", "--format", "jsonl"
    )
    assert got.exit_code == 0, got.stderr
    record = json.loads(got.stdout)
    assert record["completion"] == expected
    assert record["prompt_tokens"] == ids["input_ids"].shape[1]


def test_perplexity_scores_every_text_token_after_a_bos(family, cli, tmp_path: Path) -> None:
    name, path = family
    tok, model = reference(path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    nll, count = nll_of(model, tok(TEXT)["input_ids"])
    got = cli("perplexity", "-m", path, text, "--format", "json")
    assert got.exit_code == 0, got.stderr
    [result] = (
        json.loads(got.stdout)["files"] if "files" in json.loads(got.stdout) else [json.loads(got.stdout)]
    )
    assert result["tokens"] == count
    text_tokens = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    assert count == (text_tokens if FAMILIES.get(name) else text_tokens - 1)
    assert math.isclose(result["nll"], nll / count, rel_tol=1e-5)


def test_per_line_scores_each_line_as_its_own_text(family, cli, tmp_path: Path) -> None:
    _name, path = family
    tok, model = reference(path)
    lines = TEXT.splitlines()
    text = tmp_path / "t.txt"
    text.write_text("\n".join(lines) + "\n")
    got = cli("perplexity", "-m", path, text, "--per-line")
    assert got.exit_code == 0, got.stderr
    records = [json.loads(line) for line in got.stdout.splitlines()]
    for line, record in zip(lines, records, strict=True):
        nll, count = nll_of(model, tok(line)["input_ids"])
        assert record["tokens"] == count
        assert math.isclose(record["nll"], nll / count, rel_tol=1e-5)


def test_training_documents_and_records_start_with_the_bos(family, tmp_path: Path) -> None:
    _name, path = family
    tok = AutoTokenizer.from_pretrained(path)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT.splitlines()))
    tokens = data.tokenize([str(docs)], tok, cache_dir=tmp_path / "cache")
    expected: list[int] = []
    for line in TEXT.splitlines():
        expected += tok(line)["input_ids"] + [tok.eos_token_id]
    assert tokens.array().tolist() == expected
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Q: 1+2=", "completion": " 3"}) + "\n")
    prepared = data.prepare([str(pairs)], tok, block_size=16, val_split=0, cache_dir=tmp_path / "cache")
    ids, labels, _ = prepared.train.arrays(range(len(prepared.train)))
    record = (
        tok("Q: 1+2=")["input_ids"] + tok(" 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    )
    assert ids[0, : len(record)].tolist() == record
    learnt = np.flatnonzero(labels[0] != -100).tolist()
    assert learnt == list(range(len(tok("Q: 1+2=")["input_ids"]), len(record)))  # never the BOS or prompt


def test_serve_echo_scores_text_prompts_like_the_tokenizer(family, tmp_path: Path) -> None:
    name, path = family
    tok, model = reference(path)
    server = Server("-m", path)
    try:
        status, body = server.post(
            "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}
        )
        chat = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0})
    finally:
        server.stop()
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    ids = tok(PROMPT)["input_ids"]
    text_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert "".join(lp["tokens"]) == PROMPT  # a BOS llmkit added is context, not echoed text
    assert len(lp["tokens"]) == len(text_ids)
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    scored = [x for x in lp["token_logprobs"] if x is not None]
    assert scored == pytest.approx(expected, abs=1e-4)
    if name == "gpt2":
        assert chat[0] == 400  # no chat template
        return
    assert chat[0] == 200, chat[1]
    # Greedy through the real server is transformers' greedy on the template's ids, stopping where the
    # model's generation config says (an end of turn or of text).
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    [choice] = chat[1]["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert chat[1]["usage"]["prompt_tokens"] == len(ids)


def test_info_reads_the_configs_own_fields(family, cli) -> None:
    name, path = family
    got = cli("info", "-m", path, "--format", "json")
    assert got.exit_code == 0, got.stderr
    info = json.loads(got.stdout)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert info["model_type"] == name and info["architecture"] == type(model).__name__
    assert info["parameters"] == sum(p.numel() for p in model.parameters())  # tied ones once
    assert (info["layers"], info["heads"], info["embedding_width"]) == (
        config.num_hidden_layers,
        config.num_attention_heads,
        config.hidden_size,
    )
    assert info["context"] == config.max_position_embeddings == 128
    assert info["vocab_size"] == len(AutoTokenizer.from_pretrained(path))
    assert info.get("kv_heads") == (None if name == "gpt2" else 1)  # grouped-query: the tiny ones keep 1


def test_int8_runs_and_scores_near_float32(family, cli, tmp_path: Path) -> None:
    _name, path = family
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    nll = {}
    for label, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        got = cli("perplexity", "-m", path, text, "--format", "json", *extra)
        assert got.exit_code == 0, got.stderr
        nll[label] = json.loads(got.stdout)["nll"]
    assert nll["int8"] != nll["fp32"]  # quantized for real
    # Random tiny models sit near ln(vocab) (5.99 here); a model int8 broke down to uniform logits would
    # be ~0.01 away, so the tolerance is tighter than that. (Seen: 0.0004 to 0.001.)
    assert abs(nll["int8"] - nll["fp32"]) < 0.004
    # Greedy text may differ from float32's (near-ties flip); it must run and give the tokens asked.
    got = cli(
        "generate",
        "-m",
        path,
        PROMPT,
        "-n",
        "6",
        "--min-new-tokens",
        "6",
        "--greedy",
        "--quantize",
        "int8",
        "--format",
        "jsonl",
    )
    assert got.exit_code == 0, got.stderr
    assert json.loads(got.stdout)["completion_tokens"] == 6


@pytest.mark.slow  # 10-40 s a family on a busy 2-core CPU with a cold inductor cache
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_compiled_greedy_text_is_eager_greedy_text(cli, tmp_path: Path, family: str) -> None:
    from torch._dynamo.utils import counters

    path = build_tiny_family(tmp_path / family, family)
    args = [
        "generate",
        "-m",
        path,
        PROMPT,
        "-n",
        "8",
        "--min-new-tokens",
        "8",
        "--greedy",
        "--dtype",
        "float32",
    ]
    eager = cli(*args, "--format", "jsonl")
    counters.clear()
    compiled = cli(*args, "--compile", "--format", "jsonl")
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.stderr
    assert counters["stats"]["unique_graphs"] >= 1  # the decoding step really was compiled
    assert json.loads(compiled.stdout)["completion"] == json.loads(eager.stdout)["completion"]
