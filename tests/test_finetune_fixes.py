"""finetune as a new user meets it (issue 16): dtypes from scratch, what the run says about itself, OUT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import finetune_args, meta
from safetensors.torch import load_file

from llmkit.testing import sentences


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(sentences(800, seed=3)))
    return path


def finetune(cli, corpus: Path, out: Path, model: Path | str, *flags: str):
    return cli(*finetune_args(corpus, out, model, *flags))


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model with a config that says bfloat16, as the built-in model's does."""
    base = tmp_path_factory.mktemp("models") / "bf16-config"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, corpus: Path, bf16_base: Path):
    """A from-scratch run (Muon, the default there) on the bf16-config base, checkpointed at its end."""
    from typer.testing import CliRunner

    from llmkit.cli.app import app

    out = tmp_path_factory.mktemp("runs") / "scratch"
    args = ["finetune", str(corpus), "-o", str(out), "-m", str(bf16_base), "--from-scratch"]
    args += ["--block-size", "32", "--max-steps", "2", "--save-every", "2", "--no-cache"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return out, result.stderr


def test_from_scratch_on_a_bf16_config_trains_and_saves_float32(cli, scratch) -> None:
    out, _ = scratch
    info = cli("info", "-m", out, "--format", "json")
    assert info.exit_code == 0, info.stderr
    assert json.loads(info.stdout)["stored_dtype"] == "float32"
    assert meta(out)["config"]["save_dtype"] == "float32"
    # The checkpoint holds the weights and optimizer states the loop trained: float32 master weights.
    step = out / "checkpoints" / "step-2"
    assert {t.dtype for t in load_file(step / "model.safetensors").values()} == {torch.float32}
    states = [torch.load(p, weights_only=True)["state"] for p in sorted(step.glob("optimizer*.bin"))]
    assert len(states) == 2  # AdamW and Muon
    tensors = [v for s in states for per_param in s.values() for v in per_param.values() if v.dim() > 0]
    assert tensors and {t.dtype for t in tensors} == {torch.float32}


def test_a_muon_run_names_both_optimizers_and_rates(scratch) -> None:
    out, stderr = scratch
    words = "Muon lr 0.02 on the blocks' matrices and AdamW lr 0.0006 on the rest with 0 warm-up steps"
    assert words in stderr
    assert meta(out)["muon_lr"] == 0.02 and meta(out)["lr"] == 0.0006
    card = (out / "README.md").read_text()
    assert "| optimizer | Muon, lr 0.02, on the blocks' matrices and AdamW, lr 0.0006, on the rest" in card


def test_an_adamw_run_says_adamw(cli, corpus: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "adamw"
    result = finetune(cli, corpus, out, tiny_model, "--max-steps", "1", "--save-every", "0")
    assert result.exit_code == 0, result.stderr
    assert "AdamW lr 5e-05 with 0 warm-up steps" in result.stderr and "Muon" not in result.stderr
    assert meta(out)["muon_lr"] is None
    assert "| optimizer | AdamW, lr 5e-05 (cosine, 0 warm-up steps)" in (out / "README.md").read_text()


def test_counts_are_singular_and_a_val_file_is_counted_apart(
    cli, corpus: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    val = tmp_path / "val.txt"
    val.write_text("\n".join(sentences(120, seed=9)))
    out = tmp_path / "one-step"
    result = finetune(
        cli, corpus, out, tiny_model, "--val-file", val, "--max-steps", "1", "--save-every", "0",
        "--batch-size", "1", "--warmup-steps", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # Each document is its ids and an end-of-text token.
    train_tokens = len(tokenizer(corpus.read_text())["input_ids"]) + 1
    val_tokens = len(tokenizer(val.read_text())["input_ids"]) + 1
    data = meta(out)["data"]
    assert (data["documents"], data["tokens"]) == (1, train_tokens)
    assert (data["val_documents"], data["val_tokens"]) == (1, val_tokens)
    train_blocks, val_blocks = data["train_blocks"], data["val_blocks"]
    assert (
        f"data: 1 document, {train_tokens:,} tokens → {train_blocks:,} train blocks of 32; "
        f"validation file: 1 document, {val_tokens:,} tokens → {val_blocks:,} blocks"
    ) in result.stderr
    assert "effective batch 1 block (32 tokens)" in result.stderr
    assert ", 1 step, " in result.stderr and "with 1 warm-up step\n" in result.stderr
    assert "done: 1 step in" in result.stderr
    card = (out / "README.md").read_text()
    assert f"| data | 1 document, {train_tokens:,} tokens ({train_blocks:,} train blocks of 32); " in card
    assert f"validation file: 1 document, {val_tokens:,} tokens ({val_blocks:,} blocks) |" in card
    assert "| batch | 1 block per step (1 per batch × 1 accumulation × 1 process) |" in card
    assert "1 warm-up step)" in card


def test_a_refused_resume_names_the_values_the_run_used(
    cli, corpus: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    flags = ("--max-steps", "2", "--save-every", "1")
    assert finetune(cli, corpus, out, tiny_model, *flags).exit_code == 0  # default lr, the model's dropout
    refused = finetune(cli, corpus, out, tiny_model, *flags, "--resume", "--lr", "1e-3", "--dropout", "0.3")
    assert refused.exit_code == 2
    assert "lr: 5e-05 → 0.001" in refused.stderr and "dropout: 0.1 → 0.3" in refused.stderr
    # The same values spelt out are the same run.
    same = finetune(cli, corpus, out, tiny_model, *flags, "--resume", "--lr", "5e-5", "--dropout", "0.1")
    assert same.exit_code == 0, same.stderr


def test_an_earlier_runs_output_is_refused_without_overwrite(
    cli, corpus: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    flags = ("--max-steps", "1", "--save-every", "1")
    assert finetune(cli, corpus, out, tiny_model, *flags).exit_code == 0
    assert cli("plot", out).exit_code == 0 and (out / "loss.png").is_file()
    (out / "notes.txt").write_text("mine")
    before = (out / "model.safetensors").read_bytes()
    again = finetune(cli, corpus, out, tiny_model, *flags, "--lr", "1e-3")
    assert again.exit_code == 2
    assert f"Error: {out} holds the model of an earlier llmkit run" in again.stderr
    assert "--overwrite" in again.stderr
    assert (out / "model.safetensors").read_bytes() == before  # untouched
    # --overwrite starts over: the earlier run's files go (its plot too), the user's stay.
    fresh = finetune(cli, corpus, out, tiny_model, "--max-steps", "2", "--save-every", "0", "--overwrite")
    assert fresh.exit_code == 0, fresh.stderr
    assert not (out / "loss.png").exists() and not (out / "checkpoints").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert meta(out)["metrics"]["step"] == 2
    # An unfinished run (checkpoints, no model yet) is refused too, and resumes as ever.
    unfinished = tmp_path / "unfinished"
    assert finetune(cli, corpus, unfinished, tiny_model, *flags).exit_code == 0
    for name in ("config.json", "llmkit.json"):
        (unfinished / name).unlink()
    refused = finetune(cli, corpus, unfinished, tiny_model, *flags)
    assert refused.exit_code == 2 and "holds checkpoints of an earlier llmkit run" in refused.stderr
    assert "--resume" in refused.stderr
    resumed = finetune(cli, corpus, unfinished, tiny_model, *flags, "--resume")
    assert resumed.exit_code == 0 and "resuming from" in resumed.stderr
