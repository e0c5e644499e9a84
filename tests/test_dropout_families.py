"""finetune --dropout sets each config's own dropout fields (GPT-2's are tested in test_train_options.py),
and refuses a config that has none rather than setting a field the model never reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import finetune_args, meta
from transformers import AutoConfig

from llmkit.testing import build_tiny_family

TRAIN = ["--max-steps", "2", "--val-split", "0", "--log-every", "1"]
FIELDS = {
    "llama": {"attention_dropout"},
    "qwen2": {"attention_dropout"},
    "phi3": {"resid_pdrop", "embd_pdrop", "attention_dropout"},
    "gemma2": {"attention_dropout"},
    "mistral": {"attention_dropout"},
}
GPT2_ONLY = {"resid_pdrop", "embd_pdrop", "attn_pdrop"}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_dropout_sets_the_configs_own_fields(
    cli, name: str, pattern_corpus: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = build_tiny_family(tmp_path_factory.mktemp("families") / name, name)
    out = tmp_path / "run"
    result = cli(*finetune_args(pattern_corpus, out, base, "--dropout", "0.3", *TRAIN))
    assert result.exit_code == 0, result.stderr
    saved = AutoConfig.from_pretrained(out).to_dict()
    for field in FIELDS[name]:
        assert saved[field] == 0.3, field
    for field in GPT2_ONLY - FIELDS[name]:
        assert field not in saved, field  # no stray GPT-2 names the model would never read
    assert meta(out)["config"]["dropout"] == 0.3


def test_a_run_without_dropout_records_the_configs(cli, pattern_corpus: Path, tmp_path: Path) -> None:
    base = build_tiny_family(tmp_path / "phi3", "phi3")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**config, "resid_pdrop": 0.2, "embd_pdrop": 0.2, "attention_dropout": 0.2})
    )
    out = tmp_path / "run"
    result = cli(*finetune_args(pattern_corpus, out, base, *TRAIN, "--save-every", "2"))
    assert result.exit_code == 0, result.stderr
    again = cli(
        *finetune_args(pattern_corpus, out, base, *TRAIN, "--save-every", "2", "--resume", "--dropout", "0.1")
    )
    assert again.exit_code == 2 and "dropout: 0.2 → 0.1" in again.stderr


def test_a_config_without_dropout_fields_is_refused(cli, tiny_model: Path, pattern_corpus: Path, tmp_path):
    shape = tmp_path / "mamba"
    shape.mkdir()
    (shape / "config.json").write_text(
        json.dumps({"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 400})
    )
    args = ["--from-scratch", "--tokenizer", tiny_model, "--dropout", "0.1", *TRAIN]
    result = cli(*finetune_args(pattern_corpus, tmp_path / "run", shape, *args))
    assert result.exit_code == 2, result.stderr
    assert "--dropout: a mamba config has none of the dropout fields" in " ".join(result.stderr.split())
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
