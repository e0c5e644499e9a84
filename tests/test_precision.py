"""Precision defaults follow what the CPU computes natively: both answers, on any machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit import hardware


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native", "words"),
    [
        (True, False, True, "avx512_bf16"),
        (False, True, True, "AMX"),
        (False, False, False, "no native bf16"),
    ],
)
def test_capability_comes_from_torch(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, native: bool, words: str
) -> None:
    monkeypatch.delenv(hardware.ENV)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    found = hardware.cpu_bf16()
    assert found.native is native and words in found.reason
    assert hardware.auto_dtype("cpu")[0] == ("bfloat16" if native else "float32")
    assert hardware.auto_mixed_precision("cpu")[0] == ("bf16" if native else "no")


def test_the_environment_overrides_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv(hardware.ENV, "0")
    assert hardware.cpu_bf16() == hardware.Bf16Support(False, "LLMKIT_CPU_BF16=0")
    monkeypatch.setenv(hardware.ENV, "1")
    assert hardware.cpu_bf16().native


@pytest.mark.parametrize(("flag", "dtype"), [("1", "bfloat16"), ("0", "float32")])
def test_auto_dtype_on_the_cpu(
    cli, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, flag: str, dtype: str
) -> None:
    monkeypatch.setenv(hardware.ENV, flag)
    info = cli("info", "-m", tiny_model, "--device", "cpu", "-f", "json")
    details = json.loads(info.stdout)
    assert details["dtype"] == dtype and details["dtype_reason"] == f"auto: LLMKIT_CPU_BF16={flag}"
    gen = cli("-v", "generate", "-m", tiny_model, "The cat", "-n", "3", "--greedy", "--device", "cpu")
    assert gen.exit_code == 0, gen.stderr
    assert f"on cpu, {dtype} (auto: LLMKIT_CPU_BF16={flag})" in gen.stderr
    # An explicit dtype wins whatever the CPU has.
    explicit = json.loads(cli("info", "-m", tiny_model, "--dtype", "float32", "-f", "json").stdout)
    assert explicit["dtype"] == "float32" and explicit["dtype_reason"] == "asked for"


def test_bf16_perplexity_is_close_to_float32(cli, tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    from llmkit.testing import sentences

    text = tmp_path / "t.txt"
    text.write_text("\n".join(sentences(40, seed=3)))
    fp32 = json.loads(cli("perplexity", "-m", tiny_model, text, "-f", "json").stdout)
    monkeypatch.setenv(hardware.ENV, "1")
    bf16 = json.loads(cli("perplexity", "-m", tiny_model, text, "-f", "json").stdout)
    assert bf16["tokens"] == fp32["tokens"]
    assert bf16["nll"] != fp32["nll"]  # really computed in bf16
    assert bf16["nll"] == pytest.approx(fp32["nll"], rel=2e-2)
