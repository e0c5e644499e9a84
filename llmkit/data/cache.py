"""The token cache: inputs fingerprinted, tokenized once into a flat id file, found again by key."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llmkit.data.conversations import Render, chat_template, conversation_items, renderer, template_digest
from llmkit.data.encoder import _encoded, _tokenizer_spec, _TokenizerSpec
from llmkit.data.records import _check_sources, _pair_items
from llmkit.data.sources import STDIN, ReadStats, _check_options, _close, _items, _open, _resolve, _Source
from llmkit.errors import InputError, OutputError

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

ProgressFn = Callable[[int, int], None]

CACHE_VERSION = 1
"""Bump when the way ids are produced or stored changes, so older cache entries stop matching."""
BATCH_CHARS = 1 << 21
"""Characters per tokenizer batch (and per job sent to a worker process)."""
BATCH_ITEMS = 4096
"""At most this many pieces or records per batch."""
HASH_BYTES = 1 << 20


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
    fields: tuple[str, ...] | None = None
    """Prompt/completion records: their (prompt, completion) fields; conversation records: (messages
    field,); None for text documents."""
    sources: list[str] = field(default_factory=list)
    """The inputs' labels, in order (record tables name them by index)."""

    def array(self) -> np.memmap:
        """All ids, read-only, memory-mapped."""
        import numpy as np

        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def mask(self) -> np.memmap:
        """Prompt/completion data: per id, 1 where the loss learns it (completion, EOS), 0 on prompts."""
        import numpy as np

        return np.memmap(self.path.with_suffix(".mask"), dtype=np.uint8, mode="r", shape=(self.tokens,))

    def record_table(self) -> np.ndarray:
        """Prompt/completion data: per record, (length in ids, input index, line number), int64."""
        import numpy as np

        return np.fromfile(self.path.with_suffix(".rec"), dtype=np.int64).reshape(self.documents, 3)

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
    pairs: tuple[str, str] | None = None
    messages: str | None = None
    """Conversation records: the messages field."""

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
    pairs: tuple[str, str] | None = None,
    messages: tuple[str, str] | None = None,
) -> _Plan:
    sources = _resolve(paths, glob)
    if pairs is not None or messages is not None:
        sources = _check_sources(sources)
    for i, source in enumerate(sources):
        if source.path is None:  # stdin is read once, however often `-` is given
            if STDIN not in spooled:
                spooled[STDIN] = _spool_stdin(spool_dir)
            sources[i] = _Source(source.label, spooled[STDIN], source.jsonl)
    hashed = [_hash(source) for source in sources]
    key = {
        "version": CACHE_VERSION,
        "tokenizer": spec.digest,
        "eos": spec.eos,
        **({"bos": spec.bos} if spec.bos is not None else {}),  # GPT-2's fingerprints stay as they were
        "dtype": spec.dtype,
        "errors": errors,
        "text_field": text_field
        if any(s.jsonl for s in sources) and pairs is None and messages is None
        else None,
        "inputs": [
            ["jsonl" if s.jsonl else "text", size, digest]
            for s, (size, digest) in zip(sources, hashed, strict=True)
        ],
    }
    if pairs is not None:  # only here, so that text fingerprints stay what they were
        key["pairs"] = list(pairs)
    if messages is not None:  # the template decides both the ids and the mask
        key["messages"] = [messages[0], template_digest(messages[1])]
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    field = messages[0] if messages is not None else None
    return _Plan(sources, [size for size, _ in hashed], fingerprint, pairs, field)


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
        if (meta.get("pairs") or meta.get("messages")) and (
            path.with_suffix(".mask").stat().st_size != meta["tokens"]
            or path.with_suffix(".rec").stat().st_size != meta["documents"] * 3 * 8
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
            fields=tuple(meta["pairs"]) if meta.get("pairs") else _messages_fields(meta.get("messages")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _jobs(
    plan: _Plan,
    spec: _TokenizerSpec,
    text_field: str,
    errors: str,
    stats: ReadStats,
) -> Iterator[tuple[list[str], list[tuple[bool, bool]], int]]:
    """Batches of (pieces, (starts a document, ends one) per piece, bytes done)."""
    texts: list[str] = []
    bounds: list[tuple[bool, bool]] = []
    chars, starting = 0, True
    for source in plan.sources:
        for text, end in _items(
            source, text_field=text_field, errors=errors, stats=stats, whole=not spec.split
        ):
            texts.append(text)
            bounds.append((starting, end))
            starting = end
            chars += len(text)
            if chars >= BATCH_CHARS or len(texts) >= BATCH_ITEMS:
                yield texts, bounds, stats.bytes
                texts, bounds, chars = [], [], 0
    if texts:
        yield texts, bounds, stats.bytes


def _pair_jobs(
    plan: _Plan, errors: str, stats: ReadStats
) -> Iterator[tuple[list[str], list[str], tuple[int, list[tuple[int, int]]]]]:
    """Batches of (prompts, completions, (bytes done, [(input index, line)] per record))."""
    assert plan.pairs is not None
    prompts: list[str] = []
    completions: list[str] = []
    where: list[tuple[int, int]] = []
    chars = 0
    for index, source in enumerate(plan.sources):
        for prompt, completion, line in _pair_items(source, fields=plan.pairs, errors=errors, stats=stats):
            prompts.append(prompt)
            completions.append(completion)
            where.append((index, line))
            chars += len(prompt) + len(completion)
            if chars >= BATCH_CHARS or len(prompts) >= BATCH_ITEMS:
                yield prompts, completions, (stats.bytes, where)
                prompts, completions, where, chars = [], [], [], 0
    if prompts:
        yield prompts, completions, (stats.bytes, where)


def _conversation_jobs(
    plan: _Plan, errors: str, stats: ReadStats, render: Render
) -> Iterator[tuple[list[str], list, tuple[int, list[tuple[int, int]]]]]:
    """Batches of (rendered texts, assistant spans, (bytes done, [(input index, line)] per record))."""
    assert plan.messages is not None
    texts: list[str] = []
    spans: list = []
    where: list[tuple[int, int]] = []
    chars = 0
    for index, source in enumerate(plan.sources):
        items = conversation_items(source, field=plan.messages, errors=errors, stats=stats, render=render)
        for text, record, line in items:
            texts.append(text)
            spans.append(record)
            where.append((index, line))
            chars += len(text)
            if chars >= BATCH_CHARS or len(texts) >= BATCH_ITEMS:
                yield texts, spans, (stats.bytes, where)
                texts, spans, where, chars = [], [], [], 0
    if texts:
        yield texts, spans, (stats.bytes, where)


def _messages_fields(field: str | None) -> tuple[str, ...] | None:
    return (field,) if field else None


def _write_pairs(
    plan: _Plan,
    spec: _TokenizerSpec,
    out: IO[bytes],
    directory: Path,
    errors: str,
    num_proc: int,
    progress: Callable[[int], None],
    render: Render | None = None,
) -> tuple[int, ReadStats, list[Path]]:
    """Tokenize `plan`'s records: ids into `out`; the mask and the record table into temporary files
    in `directory`. Returns (ids written, what reading found, [mask file, record table file])."""
    import numpy as np

    stats, tokens = ReadStats(), 0
    opened = [tempfile.mkstemp(prefix=f"{plan.fingerprint}.", suffix=".tmp", dir=directory) for _ in "mr"]
    files = [Path(name) for _, name in opened]
    try:
        with os.fdopen(opened[0][0], "wb") as mask_out, os.fdopen(opened[1][0], "wb") as table_out:
            if plan.messages is not None:
                assert render is not None
                jobs = _conversation_jobs(plan, errors, stats, render)
            else:
                jobs = _pair_jobs(plan, errors, stats)
            encoded = _encoded(jobs, spec, num_proc, pairs=True, conversations=plan.messages is not None)
            for (ids, mask, lengths), (done, where) in encoded:
                out.write(ids.tobytes())
                mask_out.write(mask.tobytes())
                table = np.column_stack([lengths, np.array(where, dtype=np.int64).reshape(-1, 2)])
                table_out.write(table.astype(np.int64).tobytes())
                tokens += len(ids)
                progress(done)
            for f in (mask_out, table_out):
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for f in files:
            f.unlink(missing_ok=True)
        raise
    return tokens, stats, files


def _write(
    plan: _Plan,
    spec: _TokenizerSpec,
    directory: Path,
    *,
    text_field: str,
    errors: str,
    num_proc: int,
    progress: Callable[[int], None],
    render: Render | None = None,
) -> TokenData:
    """Tokenize `plan` into `directory`/<fingerprint>.bin (+ .json), atomically."""
    stats, tokens = ReadStats(), 0
    path = directory / f"{plan.fingerprint}.bin"
    sidecar = directory / f"{plan.fingerprint}.json"
    fd, tmp_name = tempfile.mkstemp(prefix=f"{plan.fingerprint}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    side: list[Path] = []  # prompt/completion data: the mask and record table, until renamed into place
    try:
        with os.fdopen(fd, "wb") as out:
            if plan.pairs is not None or plan.messages is not None:
                tokens, stats, side = _write_pairs(
                    plan, spec, out, directory, errors, num_proc, progress, render
                )
            else:
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
        for file, suffix in zip(side, (".mask", ".rec"), strict=False):
            os.replace(file, path.with_suffix(suffix))
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
        if plan.pairs is not None:
            meta["pairs"] = list(plan.pairs)
        if plan.messages is not None:
            meta["messages"] = plan.messages
        fd, tmp_name = tempfile.mkstemp(prefix=f"{plan.fingerprint}.", suffix=".tmp", dir=directory)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
        for file in side:
            file.unlink(missing_ok=True)
    return TokenData(
        path,
        spec.dtype,
        tokens,
        stats.documents,
        stats.bytes,
        stats.invalid_bytes,
        plan.fingerprint,
        cache_hit=False,
        fields=plan.pairs or _messages_fields(plan.messages),
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


def _remove_temporary(path: Path) -> None:
    for suffix in (".bin", ".json", ".mask", ".rec"):
        path.with_suffix(suffix).unlink(missing_ok=True)
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
        pairs: tuple[str, str] | None = None,
        messages_field: str | None = None,
    ) -> None:
        self.spec = _tokenizer_spec(tokenizer)
        self.messages: tuple[str, str] | None = None
        self.render: Render | None = None
        if messages_field is not None:
            template = chat_template(tokenizer)
            self.messages = (messages_field, template)
            self.render = renderer(tokenizer, template)
        self.directory, self.temporary = _work_dir(cache_dir, no_cache)
        self.on_progress = on_progress
        self.options = {"text_field": text_field, "errors": errors}
        self.pairs = pairs
        self.spooled: dict[str, Path] = {}

    def plan(self, paths: str | Sequence[str], glob: str | Sequence[str] | None) -> _Plan:
        return _plan(
            paths,
            self.spec,
            glob=glob,
            spool_dir=self.directory,
            spooled=self.spooled,
            pairs=self.pairs,
            messages=self.messages,
            **self.options,
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
                    plan,
                    self.spec,
                    self.directory,
                    num_proc=num_proc,
                    progress=progress,
                    render=self.render,
                    **self.options,
                )
                done_before += plan.bytes
                if self.temporary:  # the file lives as long as its TokenData, or until close()
                    hit.temporary = True
                    weakref.finalize(hit, _remove_temporary, hit.path)
            hit.sources = [s.label for s in plan.sources]
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
    pairs: tuple[str, str] | None = None,
    messages_field: str | None = None,
) -> list[TokenData]:
    """TokenData for `paths`, then for each path in `extra` (each its own corpus); with `pairs`
    (prompt field, completion field) as prompt/completion records, with `messages_field` as
    conversation records rendered through the tokenizer's chat template."""
    run = _Run(
        tokenizer,
        cache_dir,
        no_cache,
        on_progress,
        text_field=text_field,
        errors=errors,
        pairs=pairs,
        messages_field=messages_field,
    )
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
