"""FSDP through `accelerate launch`: a complete OUT and resumable checkpoints, with 2 CPU processes.

accelerate applies FSDP on accelerators only; `fsdp_cpu.py` (see its docstring) lets its FSDP path
run on the CPU, so these tests run llmkit's FSDP saving and resuming for real, on gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import finetune_args, run_torchrun
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: GPT2Block
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""
SHIM = Path(__file__).with_name("fsdp_cpu.py")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    steps = [
        "--batch-size",
        "4",
        "--max-steps",
        "10",
        "--save-every",
        "5",
        "--log-every",
        "5",
        "--lr",
        "1e-3",
    ]
    return finetune_args(corpus, out, model, *steps, *extra)


def launch(
    config: Path, *argv: str, script: Path | None = SHIM, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --config_file CONFIG` with 2 processes, through the shim or as `-m llmkit`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = [str(script)] if script is not None else ["-m", "llmkit"]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            *target,
            *argv,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD, **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accelerate") / "fsdp.yaml"
    path.write_text(FSDP_CONFIG)
    return path


def test_fsdp_saves_the_whole_model_and_resumes_exactly(
    config: Path, tiny_model_nodrop: Path, sentence_corpus: Path, tmp_path: Path
) -> None:
    fsdp = launch(config, *args(tiny_model_nodrop, sentence_corpus, tmp_path / "fsdp"))
    assert fsdp.returncode == 0, fsdp.stderr
    assert "FSDP is not used" not in fsdp.stderr
    # accelerate's FSDP checkpoint format: the model as a sharded (DCP) directory, not model.safetensors.
    assert (tmp_path / "fsdp" / "checkpoints" / "step-10" / "pytorch_model_fsdp_0").is_dir()

    # The same run as plain data parallel: every process holds the whole model, so its OUT is the answer.
    ddp = run_torchrun(*args(tiny_model_nodrop, sentence_corpus, tmp_path / "ddp"), env=ONE_THREAD)
    assert ddp.returncode == 0, ddp.stderr
    got, want = (
        load_file(tmp_path / "fsdp" / "model.safetensors"),
        load_file(tmp_path / "ddp" / "model.safetensors"),
    )
    assert sorted(got) == sorted(want)  # every weight, and the tied head only once
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)

    # OUT is a plain transformers model, with the trained weights.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    trained = model.state_dict()
    for name, tensor in got.items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=0)

    # Killed while writing the step-10 checkpoint: step 5 (sharded) is what a resume starts from.
    out = tmp_path / "killed"
    killed = launch(
        config, *args(tiny_model_nodrop, sentence_corpus, out), env={"LLMKIT_FAULT": "checkpoint-write@10"}
    )
    assert killed.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-5"]
    assert not (out / "config.json").exists()
    resumed = launch(config, *args(tiny_model_nodrop, sentence_corpus, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "at step 5/10" in resumed.stderr
    again = load_file(out / "model.safetensors")
    assert sorted(again) == sorted(got)
    for name in got:
        torch.testing.assert_close(again[name], got[name], rtol=0, atol=0)


def test_fsdp_refuses_merge_before_training(
    config: Path, tiny_model: Path, sentence_corpus: Path, tmp_path: Path
) -> None:
    result = launch(config, *args(tiny_model, sentence_corpus, tmp_path / "merged"), "--lora", "--merge")
    assert result.returncode != 0
    assert "--merge is not supported under FSDP" in result.stderr
    assert not (tmp_path / "merged" / "checkpoints").exists()


def test_fsdp_config_on_the_cpu_says_it_is_plain_data_parallel(
    config: Path, tiny_model: Path, sentence_corpus: Path, tmp_path: Path
) -> None:
    """Without the shim, as a user runs it: accelerate ignores FSDP on the CPU, and llmkit says so."""
    out = tmp_path / "cpu"
    result = launch(config, *args(tiny_model, sentence_corpus, out), script=None)
    assert result.returncode == 0, result.stderr
    assert "FSDP is not used on cpu" in result.stderr
    assert (out / "config.json").is_file()
    assert (out / "checkpoints" / "step-10" / "model.safetensors").is_file()  # accelerate's usual format
