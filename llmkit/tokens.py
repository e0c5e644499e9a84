"""Tokenizing text streams of any size without holding them as one string."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHUNK_CHARS = 1 << 20
BATCH_CHUNKS = 8
# `tokenize` holds nothing but the answer, so its pieces are smaller: 8 of 1M characters in one
# batch peaked at 1.0 GB RSS for a 9 MB file (the Rust encodings of 8 MB of text, then as many Python
# ints); 8 of 128K peak ~80 MB above the loaded tokenizer, at the same speed.
SMALL_CHUNK_CHARS = 1 << 17


def splits_safely(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether cutting text just before a whitespace run that follows a non-space character leaves the
    ids unchanged.

    True for GPT-2's byte-level pre-tokenizer: no pre-token of its regex holds a non-space character
    followed by whitespace (a space only ever leads one), and matching from a position only looks
    forward. For anything else we don't know the rules, so the text is tokenized whole.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return False
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    return kinds == ["ByteLevel"] and pre.get("use_regex", True) in (True, None)


_BOUNDARY = re.compile(r"(?<=\S)\s")
TAIL = 1 << 16


def _cut(text: str) -> int:
    """The last offset where a chunk may end: at whitespace that follows a non-space character."""
    for start in (max(0, len(text) - TAIL), 0):
        matches = list(_BOUNDARY.finditer(text, start))
        if matches:
            return matches[-1].start()
    return -1


def iter_pieces(stream: TextIO, chunk_chars: int = CHUNK_CHARS, whole: bool = False) -> Iterator[str]:
    """Consecutive pieces of `stream` that tokenize, one by one, exactly like the whole text."""
    pending = ""
    while True:
        block = stream.read(chunk_chars)
        if not block:
            break
        pending += block
        if whole or len(pending) < chunk_chars:
            continue
        cut = _cut(pending)
        if cut > 0:
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def iter_ids(
    tokenizer: PreTrainedTokenizerBase,
    stream: TextIO,
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[tuple[list[int], str]]:
    """(ids, text) per piece of the stream, tokenized in batches through the fast tokenizer."""
    whole = not splits_safely(tokenizer)
    batch: list[str] = []
    for piece in iter_pieces(stream, chunk_chars, whole=whole):
        batch.append(piece)
        if len(batch) >= BATCH_CHUNKS:
            yield from _encode(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer: PreTrainedTokenizerBase, batch: list[str]) -> Iterator[tuple[list[int], str]]:
    encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
    yield from zip(encoded, batch, strict=True)


def count_tokens(
    tokenizer: PreTrainedTokenizerBase, stream: TextIO, chunk_chars: int = SMALL_CHUNK_CHARS
) -> int:
    """Tokens in a stream of any size, in memory bounded by the piece size.

    Through the Rust tokenizer's `encode_batch_fast` (no offsets, no Python lists of ids) where the
    tokenizer has one with no truncation or padding set, else through `iter_ids`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return sum(len(ids) for ids, _ in iter_ids(tokenizer, stream, chunk_chars))
    total, batch = 0, []
    for piece in iter_pieces(stream, chunk_chars, whole=not splits_safely(tokenizer)):
        batch.append(piece)
        if len(batch) >= BATCH_CHUNKS:
            total += sum(len(e) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
            batch = []
    if batch:
        total += sum(len(e) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
    return total
