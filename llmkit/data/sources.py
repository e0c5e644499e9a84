"""Reading the inputs: files, directories and stdin → documents, decoded as UTF-8."""

from __future__ import annotations

import codecs
import io
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from llmkit.errors import InputError, UsageError
from llmkit.tokens import CHUNK_CHARS, iter_pieces

DEFAULT_GLOB = ("*.txt", "*.md", "*.rst", "*.text", "*.jsonl")
PIECE_CHARS = CHUNK_CHARS
"""Characters read at a time from a plain-text document (pieces are cut where ids stay unchanged)."""
SNIFF_BYTES = 8192
STDIN = "-"
_BOM = codecs.BOM_UTF8
_COUNTING = "llmkit.count-invalid"


# -- Decoding: UTF-8 with invalid bytes replaced and counted, or refused with their offset ---------

_invalid = threading.local()


def _count_invalid(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _invalid.count = getattr(_invalid, "count", 0) + exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error(_COUNTING, _count_invalid)


@dataclass
class ReadStats:
    """What reading the inputs found; filled in as documents are read."""

    documents: int = 0
    bytes: int = 0
    """Input bytes read."""
    invalid_bytes: int = 0
    """Bytes that were not valid UTF-8 and became U+FFFD (errors="replace")."""


def _invalid_so_far() -> int:
    return getattr(_invalid, "count", 0)


def _decode(data: bytes, errors: str, stats: ReadStats) -> str:
    """`data` as UTF-8; errors is "strict" or the counting replacement handler."""
    before = _invalid_so_far()
    text = data.decode("utf-8", errors)
    stats.invalid_bytes += _invalid_so_far() - before
    return text


def _strict_error(label: str, offset: int) -> InputError:
    return InputError(
        f"{label}: invalid UTF-8 at byte {offset}",
        "convert the file to UTF-8, or let invalid bytes be replaced (the default)",
    )


class _TextReader:
    """`read(n)` over a binary stream: its UTF-8 text, decoded n bytes at a time."""

    def __init__(self, raw: IO[bytes], label: str, errors: str, stats: ReadStats) -> None:
        self.raw, self.label, self.stats = raw, label, stats
        self.strict = errors == "strict"
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict" if self.strict else _COUNTING)
        self.offset = 0
        """Bytes taken from `raw` so far."""

    def read(self, size: int) -> str:
        while True:
            data = self.raw.read(max(size, 4))
            self.stats.bytes += len(data)
            if self.offset == 0 and data.startswith(_BOM):
                data, self.offset = data[len(_BOM) :], len(_BOM)
            buffered = len(self.decoder.getstate()[0])
            before = _invalid_so_far()
            try:
                text = self.decoder.decode(data, not data)
            except UnicodeDecodeError as exc:
                raise _strict_error(self.label, self.offset - buffered + exc.start) from None
            self.stats.invalid_bytes += _invalid_so_far() - before
            self.offset += len(data)
            if text or not data:
                return text


# -- Finding the inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    label: str
    """How messages name it: the path as given or found, or <stdin>."""
    path: Path | None
    """None: read sys.stdin as it comes (read_documents only; tokenizing spools it to a file first)."""
    jsonl: bool


def _patterns(glob: str | Sequence[str] | None) -> tuple[str, ...]:
    if glob is None:
        return DEFAULT_GLOB
    return (glob,) if isinstance(glob, str) else tuple(glob)


def _resolve(
    paths: str | os.PathLike | Sequence[str | os.PathLike], glob: str | Sequence[str] | None
) -> list[_Source]:
    """The input files, in order: each path as given, each directory's matching files sorted by path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UsageError("no data given", "pass text or JSONL files, directories, or - for stdin")
    sources: list[_Source] = []
    for given in map(str, paths):
        if given == STDIN:
            sources.append(_Source("<stdin>", None, False))
            continue
        path = Path(given)
        if path.is_dir():
            patterns = _patterns(glob)
            found = {
                f
                for pattern in patterns
                for f in (path.glob(pattern) if "/" in pattern else path.rglob(pattern))
            }
            # An empty file found in a directory is skipped; one named explicitly is an error.
            files = sorted(
                (f for f in found if f.is_file() and f.stat().st_size > 0),
                key=lambda f: f.relative_to(path).as_posix(),
            )
            if not files:
                raise InputError(
                    f"{given}: no text files matching {' '.join(patterns)}",
                    "pass the files themselves, or a glob pattern that matches them",
                )
            sources += [_Source(str(f), f, f.suffix.lower() == ".jsonl") for f in files]
        elif path.exists():
            sources.append(_Source(given, path, path.suffix.lower() == ".jsonl"))
        else:
            raise InputError(f"{given}: no such file or directory", "check the path")
    return sources


def _open(source: _Source) -> IO[bytes]:
    """The source's bytes, checked to be readable, non-empty and not binary."""
    if source.path is None:
        raw = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else io.BytesIO(sys.stdin.read().encode())
        raw = raw if hasattr(raw, "peek") else io.BufferedReader(raw)  # type: ignore[arg-type]
    else:
        try:
            raw = open(source.path, "rb")  # noqa: SIM115 - closed by the caller
        except PermissionError:
            raise InputError(f"{source.label}: permission denied", "check the file's permissions") from None
        except OSError as exc:
            raise InputError(f"{source.label}: cannot open: {exc.strerror or exc}") from None
    try:
        head = raw.peek(SNIFF_BYTES)[:SNIFF_BYTES]  # type: ignore[attr-defined]
    except OSError as exc:
        raw.close()
        raise InputError(f"{source.label}: cannot read: {exc.strerror or exc}") from None
    problem = "" if b"\0" not in head else "looks like a binary file (it has NUL bytes)"
    if problem or not head:
        if source.path is not None:
            raw.close()
        raise InputError(f"{source.label} {problem or 'is empty'}", "pass UTF-8 text or JSONL files")
    return raw


def _close(raw: IO[bytes], source: _Source) -> None:
    if source.path is not None:
        raw.close()


# -- Reading documents -----------------------------------------------------------------------------


def _items(
    source: _Source,
    *,
    text_field: str,
    errors: str,
    stats: ReadStats,
    whole: bool = False,
) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) for each piece of a plain-text source, or each record of a JSONL one."""
    raw = _open(source)
    try:
        if source.jsonl:
            for text in _records(raw, source.label, text_field, errors, stats):
                stats.documents += 1
                yield text, True
            return
        reader = _TextReader(raw, source.label, errors, stats)
        previous: str | None = None
        for piece in iter_pieces(reader, PIECE_CHARS, whole=whole):  # type: ignore[arg-type]
            if previous is not None:
                yield previous, False
            previous = piece
        stats.documents += 1
        yield previous or "", True
    finally:
        _close(raw, source)


def _records(raw: IO[bytes], label: str, text_field: str, errors: str, stats: ReadStats) -> Iterator[str]:
    """The non-empty `text_field` strings of a JSONL stream, one line at a time."""
    hint = f'each line must be a JSON object with a "{text_field}" string (see --text-field)'
    for number, obj, line in _json_lines(raw, label, errors, stats, hint):
        value = _string_field(obj, text_field, f"{label}:{number}", line, errors, stats, hint)
        if value:
            yield value


def _json_lines(
    raw: IO[bytes], label: str, errors: str, stats: ReadStats, hint: str
) -> Iterator[tuple[int, dict, str]]:
    """(line number, object, line) for each non-blank line of a JSONL stream; InputError at file:line."""
    offset, records = 0, 0
    for number, line in enumerate(raw, start=1):
        start = offset
        offset += len(line)
        stats.bytes += len(line)
        if number == 1 and line.startswith(_BOM):
            line, start = line[len(_BOM) :], start + len(_BOM)
        try:
            text = _decode(line, "strict" if errors == "strict" else _COUNTING, stats)
        except UnicodeDecodeError as exc:
            raise _strict_error(f"{label}:{number}", start + exc.start) from None
        if not text.strip():
            continue
        records += 1
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{label}:{number}: invalid JSON: {getattr(exc, 'msg', exc)}", hint) from None
        if not isinstance(obj, dict):
            raise InputError(f"{label}:{number}: expected a JSON object, got {type(obj).__name__}", hint)
        yield number, obj, text
    if not records:
        raise InputError(f"{label}: no JSON records", hint)


def _string_field(
    obj: dict, name: str, where: str, line: str, errors: str, stats: ReadStats, hint: str
) -> str:
    """obj[name], checked to be there and a string (`where` is file:line for messages)."""
    if name not in obj:
        raise InputError(f'{where}: no "{name}" field', hint)
    value = obj[name]
    if not isinstance(value, str):
        raise InputError(f'{where}: "{name}" is {type(value).__name__}, not a string', hint)
    if "\\u" in line:  # a JSON escape can make a lone surrogate, which is not text
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            if errors == "strict":
                raise InputError(
                    f'{where}: "{name}" has a lone surrogate (character {exc.start})', "fix the \\u escape"
                ) from None
            value = _decode(value.encode("utf-8", "surrogatepass"), _COUNTING, stats)
    return value


def read_documents(
    paths: str | Sequence[str],
    *,
    text_field: str = "text",
    glob: str | Sequence[str] | None = None,
    errors: str = "replace",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """The texts of the documents in `paths`, in the order `prepare` uses (e.g. to train a BPE on them).

    A JSONL record comes whole; a plain-text file may come as several consecutive pieces, cut at line
    breaks, so that a large file never sits in memory at once. Pass `stats` to learn how many
    documents, bytes and invalid bytes were read. Raises InputError as `prepare` does.
    """
    _check_options(errors=errors, text_field=text_field)
    stats = stats if stats is not None else ReadStats()
    for source in _resolve(paths, glob):
        for text, _ in _items(source, text_field=text_field, errors=errors, stats=stats):
            if text:
                yield text


# -- Options, checked alike by every entry point ---------------------------------------------------


def _check_options(
    *, errors: str, text_field: str, num_proc: int = 1, block_size: int = 1, val_split: float = 0.0
) -> None:
    def check(ok: bool, message: str, hint: str | None = None) -> None:
        if not ok:
            raise UsageError(message, hint)

    check(errors in ("replace", "strict"), f"unknown errors mode {errors!r}", "use replace or strict")
    check(bool(text_field), "the text field cannot be empty")
    check(num_proc >= 1, "--num-proc must be at least 1")
    check(block_size >= 1, "--block-size must be at least 1")
    check(0 <= val_split < 1, "--val-split must be in [0, 1)", "0 holds out nothing")
