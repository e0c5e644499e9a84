"""finetune's training choices: mixed precision from the CPU, dropout, Muon, config-only shapes, trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import finetune_args, meta
from transformers import AutoConfig, AutoTokenizer

from llmkit.testing import sentences


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(sentences(1500, seed=7)))
    return path


def finetune(cli, corpus: Path, out: Path, model: Path | str, *flags: str):
    return cli(*finetune_args(corpus, out, model, "--max-steps", "6", "--lr", "1e-3", *flags))


@pytest.mark.parametrize(("flag", "precision"), [("1", "bf16"), ("0", "no")])
def test_mixed_precision_auto_follows_the_cpu(
    cli, corpus: Path, tiny_model: Path, tmp_path: Path, monkeypatch, flag: str, precision: str
) -> None:
    monkeypatch.setenv("LLMKIT_CPU_BF16", flag)
    out = tmp_path / "run"
    result = finetune(cli, corpus, out, tiny_model, "--save-every", "6")
    assert result.exit_code == 0, result.stderr
    assert f"precision {precision}," in result.stderr
    assert meta(out)["mixed_precision"] == precision
    state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["mixed_precision"] == precision


def test_bf16_autocast_really_runs_in_bf16(cli, corpus: Path, tiny_model: Path, tmp_path: Path, monkeypatch):
    from llmkit.training import Trainer

    seen: list[torch.dtype] = []
    real = Trainer._loss

    def spy(self, batch):
        hidden = self.model.transformer.wte(batch[:, :2])
        seen.append(torch.nn.functional.linear(hidden, hidden[0]).dtype)  # what autocast makes of a matmul
        return real(self, batch)

    monkeypatch.setattr(Trainer, "_loss", spy)
    monkeypatch.setenv("LLMKIT_CPU_BF16", "1")
    assert finetune(cli, corpus, tmp_path / "bf16", tiny_model).exit_code == 0
    monkeypatch.setenv("LLMKIT_CPU_BF16", "0")
    assert finetune(cli, corpus, tmp_path / "fp32", tiny_model).exit_code == 0
    assert seen[:6] == [torch.bfloat16] * 6 and seen[6:] == [torch.float32] * 6


def test_dropout_is_set_recorded_and_fixed_on_resume(cli, corpus: Path, tiny_model: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = finetune(cli, corpus, out, tiny_model, "--dropout", "0.3", "--save-every", "3")
    assert result.exit_code == 0, result.stderr
    config = AutoConfig.from_pretrained(out)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.3, 0.3, 0.3)
    assert meta(out)["config"]["dropout"] == 0.3
    again = finetune(cli, corpus, out, tiny_model, "--dropout", "0.1", "--save-every", "3", "--resume")
    assert again.exit_code == 2 and "dropout: 0.3 → 0.1" in again.stderr
    assert finetune(cli, corpus, tmp_path / "x", tiny_model, "--dropout", "1.5").exit_code == 2


def test_dropout_changes_training_and_zero_disables_it(cli, corpus: Path, tiny_model: Path, tmp_path: Path):
    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    runs = {}
    for p in ("0.0", "0.5"):
        out = tmp_path / p
        assert finetune(cli, corpus, out, tiny_model, "--dropout", p, "--log-every", "1").exit_code == 0
        runs[p] = losses(out)
    assert runs["0.0"] != runs["0.5"]
    assert runs["0.5"][-1] > runs["0.0"][-1]  # half the activations dropped: a worse fit


def test_from_scratch_with_a_config_only_shape(cli, corpus: Path, tiny_model: Path, tmp_path: Path) -> None:
    shape = tmp_path / "shape"
    shape.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps({**config, "n_layer": 3, "n_embd": 32, "n_head": 4}))
    out = tmp_path / "scratch"
    result = finetune(
        cli, corpus, out, shape, "--from-scratch", "--tokenizer", tiny_model, "--dropout", "0.0"
    )
    assert result.exit_code == 0, result.stderr
    made = AutoConfig.from_pretrained(out)
    assert (made.n_layer, made.n_embd, made.n_head, made.resid_pdrop) == (3, 32, 4, 0.0)
    assert made.vocab_size == len(AutoTokenizer.from_pretrained(tiny_model))
    assert "Muon lr 0.02 on the blocks' matrices" in result.stderr  # from scratch, Muon is the default
    assert meta(out)["optimizer"] == "muon"
    # Without --tokenizer, a shape directory still needs one of its own.
    bare = finetune(cli, corpus, tmp_path / "bare", shape, "--from-scratch")
    assert bare.exit_code == 1 and "no tokenizer files" in bare.stderr


def test_muon_trains_block_matrices_and_adamw_the_rest(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmkit.config import TrainConfig
    from llmkit.training import _optimizers

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = TrainConfig(data=["x"], output="o", from_scratch=True, weight_decay=0.1, muon_lr=0.03)
    adamw, muon = _optimizers(model, cfg, "cpu", cfg.optimizer_name)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert isinstance(muon, torch.optim.Muon) and muon.defaults["lr"] == 0.03
    assert on_muon == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert "transformer.wte.weight" in on_adamw and "transformer.h.0.ln_1.weight" in on_adamw
    assert on_muon.isdisjoint(on_adamw) and len(on_muon | on_adamw) == len(list(model.parameters()))
    fine_tune = TrainConfig(data=["x"], output="o")
    assert fine_tune.optimizer_name == "adamw" and len(_optimizers(model, fine_tune, "cpu", "adamw")) == 1


def test_muon_learns_faster_than_adamw_alone(cli, corpus: Path, tiny_model: Path, tmp_path: Path) -> None:
    val = {}
    for name in ("muon", "adamw"):
        out = tmp_path / name
        flags = ("--optimizer", name, "--max-steps", "30", "--eval-every", "30", "--log-every", "5")
        result = finetune(cli, corpus, out, tiny_model, *flags)
        assert result.exit_code == 0, result.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        val[name] = rows[-1]["val_loss"]
        assert val[name] < rows[0]["loss"] - 1.0
    assert val["muon"] < val["adamw"]  # same steps, same AdamW lr: Muon's blocks learn more per step
    flags = ("--optimizer", "muon", "--mixed-precision", "fp16")
    fp16 = finetune(cli, corpus, tmp_path / "x", tiny_model, *flags)
    assert fp16.exit_code == 2 and "fp16" in fp16.stderr


def test_report_to_a_missing_tracker_fails_fast(
    cli, corpus: Path, tiny_model: Path, tmp_path: Path, monkeypatch
):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    out = tmp_path / "run"
    result = finetune(cli, corpus, out, tiny_model, "--report-to", "wandb")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == (
        "Error: --report-to wandb needs the wandb package, which is not installed"
    )
    assert "pip install wandb" in result.stderr
    assert not (out / "metrics.jsonl").exists()  # refused before any training
    unknown = finetune(cli, corpus, tmp_path / "y", tiny_model, "--report-to", "nonesuch")
    assert unknown.exit_code == 2 and "tensorboard" in unknown.stderr


def test_report_to_tensorboard_logs_the_metrics(cli, corpus: Path, tiny_model: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = finetune(
        cli, corpus, out, tiny_model, "--report-to", "tensorboard", "--log-every", "2", "--eval-every", "3"
    )
    assert result.exit_code == 0, result.stderr
    events = sorted((out / "llmkit").glob("events.out.tfevents.*"))  # accelerate's project "llmkit"
    assert events, "no TensorBoard event file"
    logged = EventAccumulator(str(events[0])).Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {e.step: e.value for e in logged.Scalars("loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in rows})
    val = {e.step: e.value for e in logged.Scalars("val_loss")}
    assert val == pytest.approx({r["step"]: r["val_loss"] for r in rows if "val_loss" in r})
