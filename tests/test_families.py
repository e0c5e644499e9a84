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
        chat = server.post(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        )
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
    else:
        assert chat[0] == 200 and chat[1]["choices"][0]["message"]["role"] == "assistant"
