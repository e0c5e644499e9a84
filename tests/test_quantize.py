"""`--quantize int8|int4`: int8 or 4-bit weights on the CPU for generate and perplexity."""

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


# Rounding moves the loss a little, never much: the same model, not a different one. f16 rounds only
# the weights, far below int8's; 4 bits move it most.
@pytest.mark.parametrize(("quantize", "tolerance"), [("f16", 1e-3), ("int8", 0.02), ("int4", 0.05)])
def test_quantized_perplexity_stays_close_to_float32(
    cli, tiny_model: Path, tmp_path: Path, quantize: str, tolerance: float
) -> None:
    text = tmp_path / "t.txt"
    text.write_text(" ".join(sentences(40, seed=3)))
    runs = {}
    for name, extra in (("fp32", ["--dtype", "float32"]), (quantize, ["--quantize", quantize])):
        result = cli("perplexity", "-m", tiny_model, text, "-f", "json", *extra)
        assert result.exit_code == 0, result.stderr
        runs[name] = json.loads(result.stdout)
    assert runs[quantize]["tokens"] == runs["fp32"]["tokens"]
    assert runs[quantize]["nll"] != runs["fp32"]["nll"]
    assert abs(runs[quantize]["nll"] - runs["fp32"]["nll"]) < tolerance * runs["fp32"]["nll"]


def test_int8_generates(cli, tiny_model: Path) -> None:
    result = cli(
        "generate", "-m", tiny_model, "The king", "-n", "6", "--greedy", "--quantize", "int8", "-f", "jsonl"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["completion_tokens"] == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "int2"], "unknown --quantize"),
        (["--quantize", "int4", "--dtype", "bfloat16"], "starts from float32"),
        (["--quantize", "int8", "--dtype", "bfloat16"], "starts from float32"),
        (["--quantize", "int8", "--device", "cuda"], "for the CPU"),
    ],
)
def test_int8_misuse_is_a_usage_error(cli, tiny_model: Path, extra: list[str], message: str) -> None:
    result = cli("generate", "-m", tiny_model, "x", *extra)
    assert result.exit_code == 2
    assert message in result.stderr


def test_int4_product_is_the_dequantized_weights_product() -> None:
    """The packed layer computes x·Wᵀ + b with W rounded to 4 bits per group of 32: against the
    dequantized weights in float32 (bf16 inputs: within bf16's rounding), rows not a multiple of 16."""
    import torch

    from llmkit.quantize import INT4_GROUP, Int4Linear

    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = Int4Linear(linear, INT4_GROUP)
    w = linear.weight.detach().reshape(40, 3, INT4_GROUP)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low) / 15
    dequantized = (torch.round((w - low) / scale) * scale + low).reshape(40, 96)
    x = torch.randn(2, 5, 96)
    want = x @ dequantized.t() + linear.bias.detach()
    got = layer(x)
    assert got.shape == (2, 5, 40) and got.dtype == torch.float32
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    # Rounding to 4 bits is a real change: the float32 layer gives something else.
    assert (linear(x) - want).abs().max() > 1e-3


def test_int4_model_quantizes_every_linear_layer(tiny_model: Path) -> None:
    from transformers.pytorch_utils import Conv1D

    from llmkit.config import LoadConfig
    from llmkit.models import load

    model = load(LoadConfig(model=str(tiny_model), quantize="int4")).model
    int4 = [m for m in model.modules() if type(m).__name__ == "Int4Linear"]
    assert len(int4) == 4 * model.config.n_layer + 1
    assert not any(isinstance(m, Conv1D | nn.Linear) for m in model.modules())


def test_int4_generates_and_streams_the_same_text(cli, tiny_model: Path) -> None:
    args = ("generate", "-m", tiny_model, "The king", "-n", "6", "--greedy", "--quantize", "int4")
    result = cli(*args, "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["completion_tokens"] == 6
    streamed = cli(*args, "--stream")
    assert streamed.exit_code == 0, streamed.stderr
    assert streamed.stdout == record["completion"] + "\n"


def test_f16_model_keeps_float32_around_float16_weights(tiny_model: Path) -> None:
    import torch

    from llmkit.config import LoadConfig
    from llmkit.models import load

    model = load(LoadConfig(model=str(tiny_model), quantize="f16")).model
    assert sum(type(m).__name__ == "F16Linear" for m in model.modules()) == 4 * model.config.n_layer + 1
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_f16_greedy_text_is_float32s(cli, tiny_model: Path) -> None:
    args = ("generate", "-m", tiny_model, "The king", "-n", "12", "--greedy", "-f", "jsonl")
    want = cli(*args, "--dtype", "float32")
    got = cli(*args, "--quantize", "f16")
    assert want.exit_code == got.exit_code == 0, got.stderr
    assert json.loads(got.stdout)["completion"] == json.loads(want.stdout)["completion"]
