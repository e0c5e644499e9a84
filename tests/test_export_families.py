"""`llmkit export` of Llama, Mistral and Qwen2, checked by llama.cpp itself (tests/test_export.py's probe,
float32 both sides), and `-m FILE.gguf` checked against the directory it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_export import AWKWARD, _export, _hf, _logprobs, probe

from llmkit.testing import build_tiny_family

FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers -> llama.cpp arch
PROMPT = "The old king finds a quiet song. The queen"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """family -> (tiny model directory, its f32 GGUF file)."""
    root = tmp_path_factory.mktemp("families")
    files = {}
    for family in FAMILIES:
        model = build_tiny_family(root / family, family)
        files[family] = (model, _export(model, root / f"{family}.gguf", "f32"))
    return files


def _fields(gguf: Path) -> dict:
    from gguf import GGUFReader

    return {key: field.contents() for key, field in GGUFReader(gguf).fields.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_matches_transformers(exported: dict[str, tuple[Path, Path]], family: str) -> None:
    model, gguf = exported[family]
    hf, tokenizer = _hf(model)
    prompt = tokenizer(PROMPT)["input_ids"]  # with the BOS where the family's tokenizer adds one
    answer = probe(gguf, tokenize=AWKWARD, next=prompt, greedy={"prompt": prompt, "n": 20})

    got = torch.tensor(answer["next"])
    assert (got - _logprobs(hf, prompt)[-1]).abs().max().item() < 1e-3  # measured: < 1e-6
    greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert answer["greedy"] == greedy[0, len(prompt) :].tolist()
    assert answer["vocab"] == len(tokenizer) and answer["context"] == hf.config.max_position_embeddings
    for text, ids in zip(AWKWARD, answer["tokenize"], strict=True):
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text

    fields = _fields(gguf)
    arch = FAMILIES[family]
    assert fields["general.architecture"] == arch
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == ("qwen2" if family == "qwen2" else "gpt-2")
    adds_bos = family != "qwen2"
    assert fields["tokenizer.ggml.add_bos_token"] is adds_bos
    assert (prompt[0] == fields.get("tokenizer.ggml.bos_token_id")) is adds_bos
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields[f"{arch}.attention.head_count_kv"] == 1 and fields[f"{arch}.rope.dimension_count"] == 32
    assert _has_tensor(gguf, "blk.0.attn_q.bias") is (family == "qwen2")


def _has_tensor(gguf: Path, name: str) -> bool:
    from gguf import GGUFReader

    return any(t.name == name for t in GGUFReader(gguf).tensors)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_as_model_round_trip(
    exported: dict[str, tuple[Path, Path]], family: str, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "valid.txt"
    text.write_text("The cat sees the moon. A dog follows the sea.\nMy friend remembers a red apple.\n")
    scores = []
    for model in exported[family]:
        result = cli("perplexity", "-m", model, text, "--dtype", "float32", "--format", "json")
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout))
    assert scores[0] == scores[1]
    tokens = [cli("tokenize", "-m", model, AWKWARD[4]).stdout for model in exported[family]]
    assert tokens[0] == tokens[1]


def test_tied_embeddings_leave_output_out(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """As llama.cpp's converter writes a tied Llama: no output.weight, llama.cpp uses token_embd, and
    transformers ties it again on reading."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_family(tmp_path / "tied", "llama")
    untied = AutoModelForCausalLM.from_pretrained(model)
    untied.config.tie_word_embeddings = True
    untied.tie_weights()
    untied.save_pretrained(model)
    gguf = _export(model, tmp_path / "tied.gguf", "f32")
    assert not _has_tensor(gguf, "output.weight") and _has_tensor(gguf, "token_embd.weight")
    hf, tokenizer = _hf(model)
    assert hf.config.tie_word_embeddings
    prompt = tokenizer(PROMPT)["input_ids"]
    got = torch.tensor(probe(gguf, next=prompt)["next"])
    assert (got - _logprobs(hf, prompt)[-1]).abs().max().item() < 1e-3
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "valid.txt"
    text.write_text("The cat sees the moon. A dog follows the sea.\n")
    scores = [
        cli("perplexity", "-m", m, text, "--dtype", "float32", "--format", "json") for m in (model, gguf)
    ]
    assert scores[0].exit_code == 0 and scores[0].stdout == scores[1].stdout, scores[1].output


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q8_0_near_f32(exported: dict[str, tuple[Path, Path]], family: str, tmp_path: Path) -> None:
    from gguf import GGUFReader

    model, _ = exported[family]
    gguf = _export(model, tmp_path / "q8.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_k.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types.get("blk.0.attn_q.bias", "F32") == "F32"
    hf, tokenizer = _hf(model)
    prompt = tokenizer(PROMPT)["input_ids"]
    diff = (torch.tensor(probe(gguf, next=prompt)["next"]) - _logprobs(hf, prompt)[-1]).abs().max().item()
    assert 1e-5 < diff < 0.05  # quantized for real; measured: 0.0066 for both


def test_refuses_other_architectures(tmp_path: Path, cli) -> None:
    model = build_tiny_family(tmp_path / "phi3", "phi3")
    out = tmp_path / "phi3.gguf"
    result = cli("export", model, "-o", out)
    assert result.exit_code == 1
    assert "is a phi3 model: llmkit export writes gpt2, llama, mistral, qwen2 models only" in result.stderr
    assert not out.exists()
