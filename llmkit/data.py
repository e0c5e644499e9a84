"""Fine-tuning data: files → documents → a token cache on disk → packed blocks.

Inputs are files (UTF-8 text of any kind; `.jsonl` with one JSON object per line, its text in
`text_field`), directories (searched recursively for `glob`, files sorted by path) and `-` for stdin.
Every file, and every JSONL record with non-empty text, is one document. Documents are tokenized
without special tokens and each one is followed by the tokenizer's EOS id; the ids go, streamed and
in order, into a flat numpy file under the cache directory, which is then cut into blocks of
`block_size` ids (no padding; a last partial block is dropped).

The cache is keyed by a fingerprint of what determines the ids: the content of the inputs in order
(never their paths), the options that change tokenization (`text_field`, `errors`) and the tokenizer
(its backend JSON and EOS id). A cache entry is `<fingerprint>.bin` plus a `<fingerprint>.json`
sidecar written last, both by atomic rename, so a half-written entry is never read back.

Nothing here prints: progress goes to an optional `on_progress(bytes_done, bytes_total)` callback and
problems with the data raise `InputError` with a hint. Importing this module loads only the standard
library; numpy, tokenizers and torch are imported when first needed.

    data = prepare(["corpus/"], tokenizer, block_size=512)
    data.train[0]           # np.ndarray of 512 int64 ids
    data.fingerprint        # record it with the run
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llmkit.errors import InputError, ModelError, OutputError, UsageError
from llmkit.tokens import CHUNK_CHARS, iter_pieces, splits_safely

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerBase

ProgressFn = Callable[[int, int], None]

DEFAULT_GLOB = ("*.txt", "*.md", "*.rst", "*.text", "*.jsonl")
CACHE_VERSION = 1
"""Bump when the way ids are produced or stored changes, so older cache entries stop matching."""
PIECE_CHARS = CHUNK_CHARS
"""Characters read at a time from a plain-text document (pieces are cut where ids stay unchanged)."""
BATCH_CHARS = 1 << 21
"""Characters per tokenizer batch (and per job sent to a worker process)."""
BATCH_ITEMS = 4096
"""At most this many pieces or records per batch."""
HASH_BYTES = 1 << 20
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
        if text_field not in obj:
            raise InputError(f'{label}:{number}: no "{text_field}" field', hint)
        value = obj[text_field]
        if not isinstance(value, str):
            kind = type(value).__name__
            raise InputError(f'{label}:{number}: "{text_field}" is {kind}, not a string', hint)
        if "\\u" in text:  # a JSON escape can make a lone surrogate, which is not text
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                if errors == "strict":
                    raise InputError(
                        f'{label}:{number}: "{text_field}" has a lone surrogate (character {exc.start})',
                        "fix the \\u escape",
                    ) from None
                value = _decode(value.encode("utf-8", "surrogatepass"), _COUNTING, stats)
        if value:
            yield value
    if not records:
        raise InputError(f"{label}: no JSON records", hint)


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


# -- The tokenizer, seen from the cache's side -----------------------------------------------------


def token_dtype(vocab_size: int) -> str:
    """The numpy dtype that stores ids below `vocab_size`: uint16 up to 65535 entries, else uint32."""
    return "uint16" if vocab_size <= 65535 else "uint32"


@dataclass(frozen=True)
class _TokenizerSpec:
    json: str
    """The backend tokenizer as JSON, with per-call truncation and padding removed."""
    digest: str
    eos: int
    dtype: str
    split: bool
    """Whether plain text may be tokenized in pieces (see llmkit.tokens.splits_safely)."""


def _tokenizer_spec(tokenizer: PreTrainedTokenizerBase) -> _TokenizerSpec:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            "preparing data needs a fast tokenizer (one with a tokenizer.json)",
            "save the tokenizer with a recent transformers, or train one with llmkit",
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(
            "the tokenizer has no end-of-text token to put between documents",
            "set tokenizer.eos_token, e.g. <|endoftext|>",
        )
    spec = json.loads(backend.to_str())
    spec["truncation"] = spec["padding"] = None
    text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(len(tokenizer), max(vocab.values(), default=0) + 1, eos + 1)
    return _TokenizerSpec(
        text, hashlib.sha256(text.encode()).hexdigest(), eos, token_dtype(size), splits_safely(tokenizer)
    )


class _Encoder:
    """Batches of text → one array of ids, EOS after each document's last piece."""

    def __init__(self, tokenizer_json: str, eos: int, dtype: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos, self.dtype = eos, dtype

    def __call__(self, texts: list[str], ends: list[bool]) -> np.ndarray:
        import numpy as np

        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        ids: list[int] = []
        for encoding, end in zip(encode(texts, add_special_tokens=False), ends, strict=True):
            ids.extend(encoding.ids)
            if end:
                ids.append(self.eos)
        return np.array(ids, dtype=self.dtype)


_worker: _Encoder | None = None


def _init_worker(tokenizer_json: str, eos: int, dtype: str) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker = _Encoder(tokenizer_json, eos, dtype)


def _work(texts: list[str], ends: list[bool]) -> np.ndarray:
    assert _worker is not None
    return _worker(texts, ends)


def _encoded(
    jobs: Iterator[tuple[list[str], list[bool], int]],
    spec: _TokenizerSpec,
    num_proc: int,
) -> Iterator[tuple[np.ndarray, int]]:
    """(ids, bytes done) per job, in job order, encoded here or by `num_proc` worker processes."""
    args = (spec.json, spec.eos, spec.dtype)
    if num_proc == 1:
        encoder = _Encoder(*args)
        for texts, ends, done in jobs:
            yield encoder(texts, ends), done
        return
    import multiprocessing

    # spawn, not fork: the parent may hold torch or tokenizer threads that a fork would copy mid-flight.
    with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, args) as pool:
        pending: deque[tuple[Any, int]] = deque()  # a bounded window: the corpus never queues up whole
        for texts, ends, done in jobs:
            pending.append((pool.apply_async(_work, (texts, ends)), done))
            if len(pending) >= 2 * num_proc:
                result, at = pending.popleft()
                yield result.get(), at
        while pending:
            result, at = pending.popleft()
            yield result.get(), at


# -- The token cache ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$LLMKIT_CACHE/tokens`, else `$XDG_CACHE_HOME/llmkit/tokens`, else `~/.cache/llmkit/tokens`."""
    if os.environ.get("LLMKIT_CACHE"):
        return Path(os.environ["LLMKIT_CACHE"]).expanduser() / "tokens"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llmkit" / "tokens"


@dataclass(eq=False)
class TokenData:
    """One tokenized corpus on disk: `tokens` ids of `dtype` in the flat file `path`."""

    path: Path
    dtype: str
    tokens: int
    documents: int
    bytes: int
    """Input bytes tokenized."""
    invalid_bytes: int
    """Invalid UTF-8 bytes that were replaced with U+FFFD."""
    fingerprint: str
    """Content, tokenization options and tokenizer; the cache key."""
    cache_hit: bool
    """True when the ids came from the cache and nothing was tokenized."""
    temporary: bool = False
    """The file lives only for this run (no_cache); `close()` removes it."""

    def array(self) -> np.memmap:
        """All ids, read-only, memory-mapped."""
        import numpy as np

        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def blocks(self, block_size: int) -> int:
        """How many whole blocks of `block_size` the ids make (a shorter tail is dropped)."""
        return self.tokens // block_size

    def close(self) -> None:
        """Remove the file if it is temporary; cached files stay."""
        if self.temporary:
            _remove_temporary(self.path)


@dataclass
class _Plan:
    """Inputs found and fingerprinted, not yet tokenized."""

    sources: list[_Source]
    sizes: list[int]
    fingerprint: str

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


def _hash(source: _Source) -> tuple[int, str]:
    """(size, sha256) of a file, read in chunks; also checks it can be used."""
    digest, size = hashlib.sha256(), 0
    raw = _open(source)
    try:
        while chunk := raw.read(HASH_BYTES):
            digest.update(chunk)
            size += len(chunk)
    except OSError as exc:
        raise InputError(f"{source.label}: cannot read: {exc.strerror or exc}") from None
    finally:
        _close(raw, source)
    return size, digest.hexdigest()


def _spool_stdin(directory: Path) -> Path:
    """Copy stdin to a file, so it can be fingerprinted and read twice like any input."""
    raw = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else io.BytesIO(sys.stdin.read().encode())
    fd, name = tempfile.mkstemp(prefix="stdin-", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(raw, out, HASH_BYTES)
    return Path(name)


def _plan(
    paths: str | Sequence[str],
    spec: _TokenizerSpec,
    *,
    text_field: str,
    glob: Any,
    errors: str,
    spool_dir: Path,
    spooled: dict[str, Path],
) -> _Plan:
    sources = _resolve(paths, glob)
    for i, source in enumerate(sources):
        if source.path is None:  # stdin is read once, however often `-` is given
            if STDIN not in spooled:
                spooled[STDIN] = _spool_stdin(spool_dir)
            sources[i] = _Source(source.label, spooled[STDIN], False)
    hashed = [_hash(source) for source in sources]
    key = {
        "version": CACHE_VERSION,
        "tokenizer": spec.digest,
        "eos": spec.eos,
        "dtype": spec.dtype,
        "errors": errors,
        "text_field": text_field if any(s.jsonl for s in sources) else None,
        "inputs": [
            ["jsonl" if s.jsonl else "text", size, digest]
            for s, (size, digest) in zip(sources, hashed, strict=True)
        ],
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return _Plan(sources, [size for size, _ in hashed], fingerprint)


def _load_cached(directory: Path, fingerprint: str) -> TokenData | None:
    """The cache entry for `fingerprint`, if its sidecar is there and agrees with its file."""
    import numpy as np

    try:
        meta = json.loads((directory / f"{fingerprint}.json").read_text(encoding="utf-8"))
        path = directory / f"{fingerprint}.bin"
        if (
            meta.get("version") != CACHE_VERSION
            or meta.get("fingerprint") != fingerprint
            or path.stat().st_size != meta["tokens"] * np.dtype(meta["dtype"]).itemsize
            or meta["tokens"] <= 0
        ):
            return None
        return TokenData(
            path,
            meta["dtype"],
            meta["tokens"],
            meta["documents"],
            meta["bytes"],
            meta["invalid_bytes"],
            fingerprint,
            cache_hit=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _jobs(
    plan: _Plan,
    spec: _TokenizerSpec,
    text_field: str,
    errors: str,
    stats: ReadStats,
) -> Iterator[tuple[list[str], list[bool], int]]:
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for source in plan.sources:
        for text, end in _items(
            source, text_field=text_field, errors=errors, stats=stats, whole=not spec.split
        ):
            texts.append(text)
            ends.append(end)
            chars += len(text)
            if chars >= BATCH_CHARS or len(texts) >= BATCH_ITEMS:
                yield texts, ends, stats.bytes
                texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends, stats.bytes


def _write(
    plan: _Plan,
    spec: _TokenizerSpec,
    directory: Path,
    *,
    text_field: str,
    errors: str,
    num_proc: int,
    progress: Callable[[int], None],
) -> TokenData:
    """Tokenize `plan` into `directory`/<fingerprint>.bin (+ .json), atomically."""
    stats, tokens = ReadStats(), 0
    path = directory / f"{plan.fingerprint}.bin"
    sidecar = directory / f"{plan.fingerprint}.json"
    fd, tmp_name = tempfile.mkstemp(prefix=f"{plan.fingerprint}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for ids, done in _encoded(_jobs(plan, spec, text_field, errors, stats), spec, num_proc):
                out.write(ids.tobytes())
                tokens += len(ids)
                progress(done)
            out.flush()
            os.fsync(out.fileno())
        if stats.documents == 0:
            labels = ", ".join(s.label for s in plan.sources[:3]) + (", …" if len(plan.sources) > 3 else "")
            raise InputError(f"no text in {labels}", "every JSONL record's text is empty")
        sidecar.unlink(missing_ok=True)
        os.replace(tmp, path)
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": plan.fingerprint,
            "dtype": spec.dtype,
            "tokens": tokens,
            "documents": stats.documents,
            "bytes": stats.bytes,
            "invalid_bytes": stats.invalid_bytes,
            "tokenizer": spec.digest,
            "eos": spec.eos,
        }
        fd, tmp_name = tempfile.mkstemp(prefix=f"{plan.fingerprint}.", suffix=".tmp", dir=directory)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
    return TokenData(
        path,
        spec.dtype,
        tokens,
        stats.documents,
        stats.bytes,
        stats.invalid_bytes,
        plan.fingerprint,
        cache_hit=False,
    )


def _work_dir(cache_dir: str | os.PathLike | None, no_cache: bool) -> tuple[Path, bool]:
    """(directory to write into, whether it is a temporary one of our own)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else None
    try:
        if no_cache:
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="llmkit-tokens-", dir=base)), True
        base = base if base is not None else default_cache_dir()
        base.mkdir(parents=True, exist_ok=True)
        return base, False
    except OSError as exc:
        raise OutputError(
            f"cannot create the token cache {base}: {exc.strerror or exc}",
            "pass another cache directory, or set LLMKIT_CACHE",
        ) from None


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


def _remove_temporary(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # another corpus of the same run may still be there
        path.parent.rmdir()


class _Run:
    """Where one call writes, the stdin it spooled, and one progress total over all it tokenizes."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        cache_dir: str | os.PathLike | None,
        no_cache: bool,
        on_progress: ProgressFn | None,
        *,
        text_field: str,
        errors: str,
    ) -> None:
        self.spec = _tokenizer_spec(tokenizer)
        self.directory, self.temporary = _work_dir(cache_dir, no_cache)
        self.on_progress = on_progress
        self.options = {"text_field": text_field, "errors": errors}
        self.spooled: dict[str, Path] = {}

    def plan(self, paths: str | Sequence[str], glob: str | Sequence[str] | None) -> _Plan:
        return _plan(
            paths, self.spec, glob=glob, spool_dir=self.directory, spooled=self.spooled, **self.options
        )

    def tokenize(self, plans: list[_Plan], num_proc: int) -> list[TokenData]:
        """Each plan's TokenData: from the cache when there, else tokenized now."""
        cached = [None if self.temporary else _load_cached(self.directory, p.fingerprint) for p in plans]
        total = sum(p.bytes for p, hit in zip(plans, cached, strict=True) if hit is None)
        done_before = 0

        def progress(done: int) -> None:
            if self.on_progress is not None:
                self.on_progress(done_before + done, total)

        if total:
            progress(0)
        results = []
        for plan, hit in zip(plans, cached, strict=True):
            if hit is None:
                hit = _write(
                    plan, self.spec, self.directory, num_proc=num_proc, progress=progress, **self.options
                )
                done_before += plan.bytes
                if self.temporary:  # the file lives as long as its TokenData, or until close()
                    hit.temporary = True
                    weakref.finalize(hit, _remove_temporary, hit.path)
            results.append(hit)
        return results

    def finish(self, ok: bool) -> None:
        for spool in self.spooled.values():
            spool.unlink(missing_ok=True)
        if self.temporary and not ok:
            shutil.rmtree(self.directory, ignore_errors=True)


def _tokenize_all(
    paths: str | Sequence[str],
    extra: list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str,
    glob: str | Sequence[str] | None,
    errors: str,
    num_proc: int,
    cache_dir: str | os.PathLike | None,
    no_cache: bool,
    on_progress: ProgressFn | None,
) -> list[TokenData]:
    """TokenData for `paths`, then for each path in `extra` (each its own corpus)."""
    run = _Run(tokenizer, cache_dir, no_cache, on_progress, text_field=text_field, errors=errors)
    ok = False
    try:
        plans = [run.plan(paths, glob)] + [run.plan([path], glob) for path in extra]
        corpora = run.tokenize(plans, num_proc)
        ok = True
        return corpora
    finally:
        run.finish(ok)


def tokenize(
    paths: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    glob: str | Sequence[str] | None = None,
    errors: str = "replace",
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    no_cache: bool = False,
    on_progress: ProgressFn | None = None,
) -> TokenData:
    """Tokenize `paths` into the cache (or find them there) and describe the ids.

    `errors="replace"` turns invalid UTF-8 into U+FFFD and counts the bytes; `"strict"` raises
    InputError with the file and byte offset. `num_proc` > 1 tokenizes in that many processes, with
    identical ids. `cache_dir` defaults to `default_cache_dir()`. `no_cache` neither reads nor writes
    the cache: the ids go to a temporary directory (inside `cache_dir` when given) that
    `TokenData.close()`, garbage collection or exit removes. `on_progress(bytes_done, bytes_total)` is
    called while tokenizing (not on a cache hit).
    """
    _check_options(errors=errors, text_field=text_field, num_proc=num_proc)
    return _tokenize_all(
        paths,
        [],
        tokenizer,
        text_field=text_field,
        glob=glob,
        errors=errors,
        num_proc=num_proc,
        cache_dir=cache_dir,
        no_cache=no_cache,
        on_progress=on_progress,
    )[0]


# -- Blocks ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Blocks:
    """Blocks of `block_size` ids over one TokenData: item i is ids[j*block_size : (j+1)*block_size]
    for j = indices[i]. A map-style dataset: works with torch's DataLoader as it is (see `collate`).
    """

    data: TokenData
    block_size: int
    indices: np.ndarray
    """Which of the data's blocks, in order."""
    _ids: Any = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        import numpy as np

        start = int(self.indices[i]) * self.block_size
        return np.array(self.ids()[start : start + self.block_size], dtype=np.int64)

    def batch(self, items: Sequence[int]) -> np.ndarray:
        """Blocks `items` stacked: int64, shape (len(items), block_size)."""
        import numpy as np

        out = np.empty((len(items), self.block_size), dtype=np.int64)
        for row, i in enumerate(items):
            out[row] = self[i]
        return out

    @property
    def tokens(self) -> int:
        return len(self) * self.block_size

    def ids(self) -> np.memmap:
        """The data's ids, memory-mapped once per process."""
        if self._ids is None:
            self._ids = self.data.array()
        return self._ids

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ids": None}  # a worker maps the file itself; never pickle the ids


def collate(blocks: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """`input_ids` and `labels` (the same ids; the model shifts them) as LongTensors for a batch."""
    import numpy as np
    import torch

    input_ids = torch.from_numpy(np.stack(blocks).astype(np.int64, copy=False))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


# -- Putting it together -----------------------------------------------------------------------------


@dataclass(eq=False)
class PreparedData:
    """Train and validation blocks, with what a run should record about them."""

    train: Blocks
    val: Blocks | None
    """None when val_split is 0, or there was a single block."""
    fingerprint: str
    """The data's identity (content + tokenizer, train and val_file); record it with the run."""
    val_split: float
    seed: int

    @property
    def block_size(self) -> int:
        return self.train.block_size

    @property
    def corpora(self) -> list[TokenData]:
        """The tokenized inputs: the training data, then the val_file's when there is one."""
        if self.val is None or self.val.data is self.train.data:
            return [self.train.data]
        return [self.train.data, self.val.data]

    @property
    def cache_hits(self) -> int:
        return sum(c.cache_hit for c in self.corpora)

    @property
    def invalid_bytes(self) -> int:
        return sum(c.invalid_bytes for c in self.corpora)

    def stats(self) -> dict[str, Any]:
        """A JSON-ready summary: for the run's metadata and a one-line report."""
        corpora = self.corpora
        return {
            "fingerprint": self.fingerprint,
            "documents": sum(c.documents for c in corpora),
            "tokens": sum(c.tokens for c in corpora),
            "bytes": sum(c.bytes for c in corpora),
            "invalid_bytes": self.invalid_bytes,
            "block_size": self.block_size,
            "train_blocks": len(self.train),
            "val_blocks": len(self.val) if self.val is not None else 0,
            "val_file": len(corpora) > 1,
            "val_split": self.val_split,
            "seed": self.seed,
            "dtype": self.train.data.dtype,
            "cache_hits": self.cache_hits,
        }

    def close(self) -> None:
        """Remove temporary token files (no_cache); a no-op for cached ones."""
        for corpus in self.corpora:
            corpus.close()


def split_blocks(n_blocks: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) block indices, each sorted: round(n * val_split) blocks held out, at least one
    when val_split > 0 and n >= 2, never all; chosen by a numpy permutation seeded with `seed`."""
    import numpy as np

    n_val = 0
    if val_split > 0 and n_blocks >= 2:
        n_val = min(max(1, round(n_blocks * val_split)), n_blocks - 1)
    order = np.random.default_rng(seed).permutation(n_blocks)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _too_small(what: str, data: TokenData, block_size: int) -> InputError:
    return InputError(
        f"{what} has {data.tokens} tokens, fewer than one block of {block_size}",
        f"lower --block-size (at most {data.tokens}), or add more text",
    )


def prepare(
    paths: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    val_file: str | None = None,
    val_split: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    glob: str | Sequence[str] | None = None,
    errors: str = "replace",
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    no_cache: bool = False,
    on_progress: ProgressFn | None = None,
) -> PreparedData:
    """Tokenize (or find in the cache) and pack the training data, and set validation blocks apart.

    With `val_file` (a file, directory or `-`), it is tokenized the same way and all its blocks
    validate; `val_split` is then unused. Else `val_split` of the training blocks are held out (see
    `split_blocks`). The other options are those of `tokenize`. Raises InputError for unusable data,
    less than one block included, and UsageError for bad options.
    """
    import numpy as np

    _check_options(
        errors=errors, text_field=text_field, num_proc=num_proc, block_size=block_size, val_split=val_split
    )
    corpora = _tokenize_all(
        paths,
        [val_file] if val_file is not None else [],
        tokenizer,
        text_field=text_field,
        glob=glob,
        errors=errors,
        num_proc=num_proc,
        cache_dir=cache_dir,
        no_cache=no_cache,
        on_progress=on_progress,
    )
    train_data = corpora[0]
    try:
        if train_data.blocks(block_size) == 0:
            raise _too_small("the training data", train_data, block_size)
        if val_file is not None:
            val_data = corpora[1]
            if val_data.blocks(block_size) == 0:
                raise _too_small(f"the validation data {val_file}", val_data, block_size)
            both = hashlib.sha256(f"{train_data.fingerprint}+{val_data.fingerprint}".encode())
            return PreparedData(
                Blocks(train_data, block_size, np.arange(train_data.blocks(block_size))),
                Blocks(val_data, block_size, np.arange(val_data.blocks(block_size))),
                both.hexdigest()[:32],
                val_split,
                seed,
            )
        train_index, val_index = split_blocks(train_data.blocks(block_size), val_split, seed)
        val = Blocks(train_data, block_size, val_index) if len(val_index) else None
        return PreparedData(
            Blocks(train_data, block_size, train_index), val, train_data.fingerprint, val_split, seed
        )
    except BaseException:
        for corpus in corpora:
            corpus.close()
        raise
