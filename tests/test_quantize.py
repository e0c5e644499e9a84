"""`--quantize int8`: int8 weights on the CPU for generate and perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from llmkit.testing import sentences


def test_int8_model_has_only_quantized_linear_layers(tiny_model: Path) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from transformers.pytorch_utils import Conv1D

    from llmkit.config import LoadConfig
    from llmkit.models import load

    model = load(LoadConfig(model=str(tiny_model), quantize="int8")).model
    # 4 projections per block, and the LM head.
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * model.config.n_layer + 1
    assert not any(isinstance(m, Conv1D | nn.Linear) for m in model.modules())


def test_int8_perplexity_stays_close_to_float32(cli, tiny_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(" ".join(sentences(40, seed=3)))
    runs = {}
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        result = cli("perplexity", "-m", tiny_model, text, "-f", "json", *extra)
        assert result.exit_code == 0, result.stderr
        runs[name] = json.loads(result.stdout)
    assert runs["int8"]["tokens"] == runs["fp32"]["tokens"]
    # Rounding moves the loss a little, never much: the same model, not a different one.
    assert runs["int8"]["nll"] != runs["fp32"]["nll"]
    assert abs(runs["int8"]["nll"] - runs["fp32"]["nll"]) < 0.02 * runs["fp32"]["nll"]


def test_int8_generates(cli, tiny_model: Path) -> None:
    result = cli(
        "generate", "-m", tiny_model, "The king", "-n", "6", "--greedy", "--quantize", "int8", "-f", "jsonl"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["completion_tokens"] == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "int4"], "unknown --quantize"),
        (["--quantize", "int8", "--dtype", "bfloat16"], "starts from float32"),
        (["--quantize", "int8", "--device", "cuda"], "for the CPU"),
    ],
)
def test_int8_misuse_is_a_usage_error(cli, tiny_model: Path, extra: list[str], message: str) -> None:
    result = cli("generate", "-m", tiny_model, "x", *extra)
    assert result.exit_code == 2
    assert message in result.stderr
