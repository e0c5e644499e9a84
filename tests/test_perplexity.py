"""`llmkit perplexity` against an independent implementation of the sliding-window definition."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit.scoring import windows
from llmkit.testing import sentences


def reference_nll(model_dir: Path, text: str, context: int, stride: int) -> tuple[float, int]:
    """Token by token: each position t >= 1 gets exactly one score, from the window that first covers it.

    The window that first covers t is the first window (in stride steps) whose end is past t; its
    prediction for t sees tokens [begin, t). Written independently of llmkit.scoring.
    """
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    total, count = 0.0, 0
    starts = list(range(0, max(n - 1, 1), stride))
    cache: dict[int, torch.Tensor] = {}
    for t in range(1, n):
        begin = next(b for b in starts if b < t < min(b + context, n))
        if begin not in cache:
            with torch.no_grad():
                cache[begin] = torch.log_softmax(
                    model(torch.tensor([ids[begin : min(begin + context, n)]])).logits[0].double(), -1
                )
        total -= float(cache[begin][t - begin - 1, ids[t]])
        count += 1
    return total, count


@pytest.fixture(scope="module")
def long_text() -> str:
    return " ".join(sentences(90, seed=3)) + "\nÜnïcödé café 🙂\n"


def test_windows_score_every_token_once() -> None:
    for n, context, stride in [(10, 4, 2), (100, 16, 5), (17, 8, 7), (5, 8, 4), (2, 2, 1), (50, 10, 1)]:
        scored = [t for _, end, first in windows(n, context, stride) for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(
            begin < first < end <= begin + context for begin, end, first in windows(n, context, stride)
        )


@pytest.mark.parametrize(("context", "stride"), [(64, 16), (128, 64), (32, 31)])
def test_matches_independent_implementation(
    cli, tiny_model: Path, tmp_path: Path, long_text: str, context: int, stride: int
) -> None:
    path = tmp_path / "text.txt"
    path.write_text(long_text)
    result = cli(
        "perplexity",
        "-m",
        tiny_model,
        path,
        "--context",
        context,
        "--stride",
        stride,
        "--format",
        "json",
        "--batch-size",
        "3",
    )
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)
    assert set(got) == {"perplexity", "nll", "tokens", "bytes", "bits_per_byte"}
    total, count = reference_nll(tiny_model, long_text, context, stride)
    assert count > context  # the text is longer than one window
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["bytes"] == len(long_text.encode())
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / len(long_text.encode()), rel=1e-5)


def test_default_window_is_the_model_context(cli, tiny_model: Path, tmp_path: Path, long_text: str) -> None:
    path = tmp_path / "text.txt"
    path.write_text(long_text)
    default = json.loads(cli("perplexity", "-m", tiny_model, path, "-f", "json").stdout)
    explicit = json.loads(
        cli("perplexity", "-m", tiny_model, path, "-f", "json", "--context", "128", "--stride", "64").stdout
    )
    assert default == explicit


def test_several_files_and_stdin(cli, tiny_model: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(sentences(10, seed=1)))
    b.write_text(" ".join(sentences(12, seed=2)))
    both = json.loads(cli("perplexity", "-m", tiny_model, a, b, "-f", "json").stdout)
    one = json.loads(cli("perplexity", "-m", tiny_model, a, "-f", "json").stdout)
    piped = json.loads(cli("perplexity", "-m", tiny_model, "-", "-f", "json", input=a.read_text()).stdout)
    assert piped == one
    assert [f["file"] for f in both["files"]] == [str(a), str(b)]
    assert both["tokens"] == sum(f["tokens"] for f in both["files"])
    text = cli("perplexity", "-m", tiny_model, a, b).stdout.splitlines()
    assert len(text) == 3 and text[-1].startswith("total: perplexity")


def test_per_line_scores_each_line_alone(cli, tiny_model: Path, tmp_path: Path) -> None:
    lines = ["The cat sees the moon.", "x", "A small bird sings to the green hill and the sea."]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    rows = [
        json.loads(r)
        for r in cli(
            "perplexity", "-m", tiny_model, path, "--per-line", "--batch-size", "2"
        ).stdout.splitlines()
    ]
    assert [r["text"] for r in rows] == lines and [r["line"] for r in rows] == [1, 2, 3]
    for row, line in zip(rows, lines, strict=True):
        alone = tmp_path / "alone.txt"
        alone.write_text(line)
        ref = (
            json.loads(cli("perplexity", "-m", tiny_model, alone, "-f", "json").stdout)
            if len(line) > 1
            else {"tokens": 0, "nll": None}
        )
        assert row["tokens"] == ref["tokens"]
        if ref["nll"] is not None:
            assert row["nll"] == pytest.approx(ref["nll"], rel=1e-5)


def test_errors(cli, tiny_model: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("x")
    result = cli("perplexity", "-m", tiny_model, short)
    assert result.exit_code == 1 and "needs at least 2" in result.stderr
    assert cli("perplexity", "-m", tiny_model, tmp_path / "missing.txt").exit_code == 1
    assert cli("perplexity", "-m", tiny_model, short, "--context", "4096").exit_code == 2
    assert cli("perplexity", "-m", tiny_model, short, "--context", "8", "--stride", "9").exit_code == 2
    assert cli("perplexity", "-m", tiny_model, short, "--context", "8", "--stride", "8").exit_code == 2
    assert cli("perplexity", "-m", tiny_model, tmp_path).exit_code == 1


def test_per_line_scores_a_long_line_with_the_given_window(cli, tiny_model: Path, tmp_path: Path) -> None:
    line = " ".join(sentences(40, seed=5))  # far longer than the 128-token context
    path = tmp_path / "long.txt"
    path.write_text(line + "\n")
    args = ["-m", tiny_model, "--context", "64", "--stride", "16"]
    row = json.loads(cli("perplexity", path, "--per-line", *args).stdout)
    whole = tmp_path / "whole.txt"
    whole.write_text(line)
    ref = json.loads(cli("perplexity", whole, "-f", "json", *args).stdout)
    assert row["tokens"] == ref["tokens"] > 64
    assert row["nll"] == pytest.approx(ref["nll"], rel=1e-5)
