"""finetune --from-scratch with a modern shape: a config-only Llama or Qwen2 directory builds that model,
and --n-layer/--n-head/--n-embd/--context land on the config's own fields (or are refused clearly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import finetune_args
from transformers import AutoConfig, AutoModelForCausalLM

from llmkit.testing import build_tiny_family

SHAPE = ["--n-layer", "3", "--n-head", "4", "--n-embd", "96", "--context", "64"]
TRAIN = ["--max-steps", "3", "--val-split", "0"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, a directory holding only its config.json, a tokenizer directory to pass with --tokenizer)."""
    where = tmp_path_factory.mktemp("families")
    tokenizer = build_tiny_family(where / request.param, request.param)
    shape = where / f"{request.param}-shape"
    shape.mkdir()
    shutil.copy(tokenizer / "config.json", shape / "config.json")
    return request.param, shape, tokenizer


def test_a_config_only_directory_builds_that_model_in_the_asked_shape(
    cli, family, pattern_corpus: Path, tmp_path: Path
) -> None:
    name, shape, tokenizer = family
    base = json.loads((shape / "config.json").read_text())
    out = tmp_path / "scratch"
    result = cli(
        *finetune_args(pattern_corpus, out, shape, "--from-scratch", "--tokenizer", tokenizer, *SHAPE, *TRAIN)
    )
    assert result.exit_code == 0, result.stderr
    made = AutoConfig.from_pretrained(out)
    assert made.model_type == name
    assert (made.num_hidden_layers, made.num_attention_heads, made.hidden_size) == (3, 4, 96)
    assert made.max_position_embeddings == 64
    assert made.num_attention_heads % made.num_key_value_heads == 0  # grouped-query heads still divide
    assert made.intermediate_size == base["intermediate_size"] * 96 // base["hidden_size"]  # the MLP's ratio
    assert getattr(made, "head_dim", None) in (None, 24)
    if name == "qwen2":
        assert made.layer_types == ["full_attention"] * 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3 and model.model.embed_tokens.weight.shape[1] == 96
    generated = cli("generate", "-m", out, "The cat", "--greedy", "-n", "4", "--no-stream")
    assert generated.exit_code == 0, generated.stderr


def test_the_base_shape_is_kept_without_options(cli, family, pattern_corpus: Path, tmp_path: Path) -> None:
    _, shape, tokenizer = family
    base = json.loads((shape / "config.json").read_text())
    out = tmp_path / "scratch"
    result = cli(
        *finetune_args(pattern_corpus, out, shape, "--from-scratch", "--tokenizer", tokenizer, *TRAIN)
    )
    assert result.exit_code == 0, result.stderr
    made = json.loads((out / "config.json").read_text())
    for field in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
    ):
        assert made[field] == base[field], field


def test_a_shape_the_config_cannot_take_is_refused(cli, family, pattern_corpus: Path, tmp_path: Path) -> None:
    _, shape, tokenizer = family
    uneven = cli(
        *finetune_args(
            pattern_corpus, tmp_path / "a", shape, "--from-scratch", "--tokenizer", tokenizer, "--n-head", "3"
        )
    )
    assert uneven.exit_code == 2
    assert "Error: hidden_size 64 is not divisible by num_attention_heads 3" in uneven.stderr
    assert "Traceback" not in uneven.stderr + uneven.stdout


def test_an_option_the_architecture_has_no_field_for_is_refused(
    cli, tiny_model: Path, pattern_corpus: Path, tmp_path: Path
):
    shape = tmp_path / "mamba"
    shape.mkdir()
    (shape / "config.json").write_text(
        json.dumps({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2})
    )
    result = cli(
        *finetune_args(
            pattern_corpus,
            tmp_path / "out",
            shape,
            "--from-scratch",
            "--tokenizer",
            tiny_model,
            "--n-head",
            "4",
        )
    )
    assert result.exit_code == 2, result.stderr
    assert "Error: --n-head: a mamba config has no num_attention_heads to set" in result.stderr
