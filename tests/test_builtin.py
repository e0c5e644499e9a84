"""The built-in `tiny-shakespeare` model: offline, from any directory, for every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.models import BUILTIN_DIR

MODEL = "tiny-shakespeare"
# Held-out lines: from the last 10% of the corpus, which neither the tokenizer nor the model saw.
HELD_OUT = """PETRUCHIO:
I pray you do.
I will attend her here,
And woo her with some spirit when she comes.
Say that she rail; why then I'll tell her plain
She sings as sweetly as a nightingale:
Say that she frown, I'll say she looks as clear
As morning roses newly wash'd with dew:
Say she be mute and will not speak a word;
Then I'll commend her volubility,
And say she uttereth piercing eloquence:
"""
# The model scores 2.185 bits per byte on the whole held-out split and 2.00 on these lines; a broken
# loader, tokenizer or weight file lands far above (random weights give ~11).
BITS_PER_BYTE_BOUND = 2.6

pytestmark = pytest.mark.skipif(
    not (BUILTIN_DIR / MODEL / "config.json").is_file(),
    reason="the built-in model is not built (make tiny-shakespeare)",
)


def test_loads_offline_from_another_directory(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "llmkit", "info", "-m", MODEL, "--format", "json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["source"] == "built-in" and info["stored_dtype"] == "bfloat16"
    assert (BUILTIN_DIR / MODEL / "model.safetensors").stat().st_size <= 10 * 2**20


def test_seeded_generation_is_reproducible(cli) -> None:
    args = ["generate", "-m", MODEL, "ROMEO:", "-n", "40", "--seed", "3", "--no-stream"]
    first, again = cli(*args), cli(*args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout == again.stdout and len(first.stdout.strip()) > 40


def test_held_out_perplexity_stays_under_a_bound(cli) -> None:
    result = cli("perplexity", "-m", MODEL, "-", "--format", "json", input=HELD_OUT)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["bits_per_byte"] < BITS_PER_BYTE_BOUND


def test_tokenize(cli) -> None:
    ids = cli("tokenize", "-m", MODEL, "ROMEO: What light")
    assert cli("tokenize", "-m", MODEL, "-d", input=ids.stdout).stdout == "ROMEO: What light\n"


def test_finetunes_as_a_base_model(cli, tmp_path: Path) -> None:
    data = tmp_path / "lines.txt"
    data.write_text(HELD_OUT * 20)
    out = tmp_path / "more-petruchio"
    result = cli(
        "finetune",
        data,
        "-o",
        out,
        "-m",
        MODEL,
        "--block-size",
        "64",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert result.exit_code == 0, result.stderr
    assert cli("generate", "-m", out, "PETRUCHIO:", "-n", "5", "--seed", "1").exit_code == 0
