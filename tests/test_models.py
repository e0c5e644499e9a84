"""Model resolution: local directories, the hub cache offline, and every way it can go wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> Path:
    """Lay out a cache entry exactly as huggingface_hub writes it: blobs, snapshots/REV, refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def error_line(result) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    first, *rest = result.stderr.splitlines()
    assert first.startswith("Error: ")
    assert all(line.startswith("Hint: ") for line in rest), result.stderr
    return first


def test_hub_id_resolves_from_the_offline_cache(cli, tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    import huggingface_hub.constants

    # Read at import time, and this process imported it long ago; a fresh process reads the env.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    snapshot = hub_cache(hf_home, "someone/tiny-gpt2", tiny_model)
    result = cli("info", "-m", "someone/tiny-gpt2", "--format", "json")
    assert result.exit_code == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["source"] == "hub cache" and Path(details["path"]) == snapshot
    plain = cli("generate", "-m", tiny_model, "The cat", "--greedy", "-n", "6", "--no-stream").stdout
    cached = cli(
        "generate", "-m", "someone/tiny-gpt2", "The cat", "--greedy", "-n", "6", "--no-stream", "--offline"
    )
    assert cached.exit_code == 0, cached.stderr
    assert cached.stdout == plain


def test_uncached_hub_id_offline_says_what_to_do(cli) -> None:
    result = cli("info", "-m", "distilgpt2")
    assert result.exit_code == 1
    assert "not in the local cache and the hub can't be reached" in error_line(result)
    assert "--model" in result.stderr


def test_unreachable_hub_falls_back_to_the_same_message(cli, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    result = cli("info", "-m", "gpt2")
    assert result.exit_code == 1
    assert "can't be reached" in error_line(result)


def test_directory_that_is_not_a_model(cli, tmp_path: Path) -> None:
    result = cli("info", "-m", tmp_path)
    assert result.exit_code == 1
    assert "is not a model directory" in error_line(result)


def test_missing_path_like_name(cli, tmp_path: Path) -> None:
    result = cli("info", "-m", str(tmp_path / "nope" / "model"))
    assert result.exit_code == 1
    assert "no such directory" in error_line(result)


def test_model_that_is_not_a_causal_lm(cli, tiny_model: Path, tmp_path: Path) -> None:
    t5 = tmp_path / "t5"
    shutil.copytree(tiny_model, t5)
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    result = cli("generate", "-m", t5, "hi")
    assert result.exit_code == 1
    assert "not a causal language model" in error_line(result)


def test_missing_tokenizer(cli, tiny_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (bare / name).unlink(missing_ok=True)
    result = cli("tokenize", "-m", bare, "hi")
    assert result.exit_code == 1
    assert "no tokenizer files" in error_line(result)


def test_pickle_weights_refused_unless_allowed(cli, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    refused = cli("generate", "-m", pickled, "The cat", "-n", "3")
    assert refused.exit_code == 1
    assert "only pickle weights" in error_line(refused)
    assert "--allow-pickle" in refused.stderr
    allowed = cli(
        "generate", "-m", pickled, "The cat", "--greedy", "-n", "6", "--no-stream", "--allow-pickle"
    )
    assert allowed.exit_code == 0, allowed.stderr
    assert (
        allowed.stdout
        == cli("generate", "-m", tiny_model, "The cat", "--greedy", "-n", "6", "--no-stream").stdout
    )


def test_directory_without_weights(cli, tiny_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "noweights"
    shutil.copytree(tiny_model, empty)
    (empty / "model.safetensors").unlink()
    result = cli("info", "-m", empty)
    assert "has no weights" in error_line(result)


def test_model_from_environment_variable(cli, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMKIT_MODEL", str(tiny_model))
    result = cli("info", "--format", "json")
    assert json.loads(result.stdout)["path"] == str(tiny_model)


@pytest.mark.parametrize("flags", [["--device", "tpu"], ["--dtype", "int8"]])
def test_unknown_device_or_dtype(cli, tiny_model: Path, flags: list[str]) -> None:
    result = cli("info", "-m", tiny_model, *flags)
    assert result.exit_code == 2
    error_line(result)


def test_cuda_requested_without_cuda(cli, tiny_model: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("generate", "-m", tiny_model, "hi", "--device", "cuda")
    assert result.exit_code == 1
    assert "CUDA is not available" in error_line(result)


def test_dtype_choice_loads_weights_in_that_dtype(tiny_model: Path) -> None:
    import torch

    from llmkit.config import LoadConfig
    from llmkit.models import load

    assert load(LoadConfig(model=str(tiny_model))).model.dtype == torch.float32  # auto on CPU
    assert load(LoadConfig(model=str(tiny_model), dtype="bfloat16")).model.dtype == torch.bfloat16


def test_info_reports_the_model(cli, tiny_model: Path) -> None:
    result = cli("info", "-m", tiny_model, "--format", "json")
    details = json.loads(result.stdout)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert details["parameters"] == sum(p.numel() for p in model.parameters())
    assert (details["layers"], details["heads"], details["embedding_width"]) == (2, 2, 64)
    assert details["context"] == 128 and details["vocab_size"] == model.config.vocab_size
    assert details["source"] == "local directory" and details["device"] == "cpu"
    assert details["size_on_disk"] > 0 and details["stored_dtype"] == "float32"
    text = cli("info", "-m", tiny_model)
    assert "parameters" in text.stdout and "GPT2LMHeadModel" in text.stdout
