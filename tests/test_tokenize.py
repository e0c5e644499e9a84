"""`llmkit tokenize`: ids, strings, counts, decoding, and streaming that matches whole-text tokenization."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llmkit.testing import sentences
from llmkit.tokens import iter_ids, splits_safely


def messy_text(n: int = 600) -> str:
    rng = random.Random(1)
    ends = ["\n", " \n", "\n\n", "  ", "\n   ", "\r\n", " ", "\n\t", "\n\n\n", "  \n  "]
    return "".join(s + rng.choice(ends) for s in sentences(n)) + "Ünïcödé 🙂\n"


def test_ids_round_trip(cli, tiny_model: Path) -> None:
    text = "The old king sees the moon. Ünïcödé café 🙂"
    ids = cli("tokenize", "-m", tiny_model, text)
    assert ids.exit_code == 0, ids.stderr
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert [int(x) for x in ids.stdout.split()] == tok(text)["input_ids"]
    back = cli("tokenize", "-m", tiny_model, "--decode", input=ids.stdout)
    assert back.stdout == text + "\n"


def test_count_of_a_file_equals_the_tokenizer(cli, tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    text = messy_text()
    path.write_text(text, newline="")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    result = cli("tokenize", "-m", tiny_model, "--count", "--file", path)
    assert result.stdout == f"{len(tok(text)['input_ids'])}\n"
    piped = cli("tokenize", "-m", tiny_model, "-c", input=text)
    assert piped.stdout == result.stdout


@pytest.mark.parametrize("chunk_chars", [5, 64, 1000])
def test_streaming_pieces_tokenize_like_the_whole(tiny_model: Path, chunk_chars: int) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert splits_safely(tok)
    text = messy_text()
    pieces = list(iter_ids(tok, io.StringIO(text), chunk_chars))
    assert len(pieces) > 1 or chunk_chars >= len(text)
    assert "".join(t for _, t in pieces) == text
    assert [i for ids, _ in pieces for i in ids] == tok(text, add_special_tokens=False)["input_ids"]


def test_token_strings_and_json(cli, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "The cat sees the sea."
    strings = cli("tokenize", "-m", tiny_model, "--tokens", text)
    assert strings.stdout.split() == tok.tokenize(text)
    data = json.loads(cli("tokenize", "-m", tiny_model, "--tokens", "-f", "json", text).stdout)
    assert data == {"count": len(data["ids"]), "ids": tok(text)["input_ids"], "tokens": tok.tokenize(text)}
    assert json.loads(cli("tokenize", "-m", tiny_model, "-c", "-f", "json", text).stdout) == {
        "count": len(data["ids"])
    }


def test_decode_accepts_json_and_rejects_garbage(cli, tiny_model: Path) -> None:
    ok = cli("tokenize", "-m", tiny_model, "-d", "-f", "json", input="[50, 51]")
    assert json.loads(ok.stdout)["count"] == 2
    bad = cli("tokenize", "-m", tiny_model, "-d", input="12 abc")
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: --decode expects token ids")
    out_of_range = cli("tokenize", "-m", tiny_model, "-d", input="99999")
    assert out_of_range.exit_code == 1 and "outside the vocabulary" in out_of_range.stderr


def test_input_errors(cli, tiny_model: Path, tmp_path: Path) -> None:
    missing = cli("tokenize", "-m", tiny_model, "--file", tmp_path / "nope.txt")
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    assert "binary" in cli("tokenize", "-m", tiny_model, "--file", binary).stderr
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    result = cli("tokenize", "-m", tiny_model, "--file", latin1)
    assert result.exit_code == 1 and "not valid UTF-8" in result.stderr
    both = cli("tokenize", "-m", tiny_model, "--count", "--decode", "x")
    assert both.exit_code == 2
