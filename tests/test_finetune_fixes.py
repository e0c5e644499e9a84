"""finetune as a new user meets it (issue 16): dtypes from scratch, what the run says about itself, OUT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.testing import sentences


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(sentences(800, seed=3)))
    return path


def finetune(cli, corpus: Path, out: Path, model: Path | str, *flags: str):
    return cli(
        "finetune",
        corpus,
        "-o",
        out,
        "-m",
        model,
        "--block-size",
        "32",
        "--cache-dir",
        out.parent / "cache",
        *flags,
    )


def meta(out: Path) -> dict:
    return json.loads((out / "llmkit.json").read_text())


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
