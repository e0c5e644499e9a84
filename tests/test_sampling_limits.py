"""Sampling values that can't be sampled are normalised or refused, in `generate` as in `serve`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_a_temperature_too_small_to_divide_by_is_greedy(cli, tiny_model: Path) -> None:
    args = ["generate", "-m", tiny_model, "The cat", "-n", "12", "--format", "jsonl"]
    tiny = cli(*args, "--temperature", "1e-300")
    assert tiny.exit_code == 0, tiny.stderr
    greedy = cli(*args, "--greedy")
    assert greedy.exit_code == 0, greedy.stderr
    assert json.loads(tiny.stdout)["completion"] == json.loads(greedy.stdout)["completion"]


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--repetition-penalty", "5e-324", "--repetition-penalty must be in [0.01, 100]"),
        ("--repetition-penalty", "1e300", "--repetition-penalty must be in [0.01, 100]"),
        ("--temperature", "inf", "--temperature must be a finite number"),
        ("--temperature", "nan", "--temperature must be a finite number"),
        ("--top-p", "nan", "--top-p must be in (0, 1]"),
        ("--seed", str(2**70), "--seed must be in"),
    ],
)
def test_values_outside_a_finite_range_are_usage_errors(cli, tiny_model: Path, flag, value, words) -> None:
    result = cli("generate", "-m", tiny_model, "x", "-n", "5", flag, value)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert words in result.stderr
    assert "Traceback" not in result.stderr and "bug in llmkit" not in result.stderr
