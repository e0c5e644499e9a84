"""Prompt/completion records: read from JSONL, packed whole into blocks, trained on the completion only.

A record is ids(prompt) + ids(completion) + EOS, the two texts tokenized apart (so the boundary between
them is exact) with a learn mask that is 0 on the prompt's ids and 1 on the completion's and the EOS.
The cache stores the ids, the mask (`<fingerprint>.mask`, one byte per id) and a record table
(`<fingerprint>.rec`: length, input index and line number per record).

Records are packed whole into blocks, never split: a completion learnt without its prompt would teach
the model to answer a question it was never asked. Packing is best-fit decreasing (longest record first,
each into the fullest block it still fits), deterministic, so every process packs alike; the rest of a
block is padding. Each record gets position ids from 0, which makes transformers' attention keep it to
itself, as at generation time: a record never sees the record before it in its block.
"""

from __future__ import annotations

import json
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkit.data.sources import ReadStats, _close, _json_lines, _open, _Source, _string_field
from llmkit.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from llmkit.data.cache import TokenData

DEFAULT_FIELDS = ("prompt", "completion")
LONG_RECORDS = ("error", "skip")
IGNORE = -100
"""The label that the model's loss skips: prompt ids and padding."""
PAD_ID = 0
"""The id that fills a block's end; it is never learnt and no record attends to it."""


# -- Which mode: text or prompt/completion -----------------------------------------------------------


def pair_fields(
    sources: Sequence[_Source], text_field: str, prompt_field: str | None, completion_field: str | None
) -> tuple[str, str] | None:
    """(prompt field, completion field) when the data is prompt/completion records, else None (text).

    Pairs when either field is given; else when the first record of the first JSONL input has both
    default fields ("prompt" and "completion") and no `text_field`.
    """
    if prompt_field is not None or completion_field is not None:
        return (prompt_field or DEFAULT_FIELDS[0], completion_field or DEFAULT_FIELDS[1])
    first = next((s for s in sources if s.jsonl and s.path is not None), None)
    record = _first_record(first) if first is not None else None
    if isinstance(record, dict) and all(f in record for f in DEFAULT_FIELDS) and text_field not in record:
        return DEFAULT_FIELDS
    return None


def _first_record(source: _Source) -> Any:
    """The first non-blank line of a JSONL file, parsed; None when there is none or it isn't JSON."""
    assert source.path is not None
    try:
        with open(source.path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (OSError, ValueError):
        pass
    return None


def _check_sources(sources: list[_Source]) -> list[_Source]:
    """The sources read as JSONL (stdin too); a plain-text file among them is refused."""
    for source in sources:
        if source.path is not None and not source.jsonl:
            raise InputError(
                f"{source.label} is not JSONL, and this run trains on prompt/completion records",
                "text and prompt/completion data can't be mixed in one run: pass only .jsonl files "
                "(--glob '*.jsonl' for directories), or plain text without --prompt-field/--completion-field",
            )
    return [_Source(s.label, s.path, True) for s in sources]


def _pair_items(
    source: _Source, *, fields: tuple[str, str], errors: str, stats: ReadStats
) -> Iterator[tuple[str, str, int]]:
    """(prompt, completion, line number) for each record of a JSONL source."""
    prompt_field, completion_field = fields
    hint = (
        f'each line must be a JSON object with "{prompt_field}" and "{completion_field}" strings '
        "(see --prompt-field, --completion-field)"
    )
    raw = _open(source)
    try:
        for number, obj, line in _json_lines(raw, source.label, errors, stats, hint):
            where = f"{source.label}:{number}"
            prompt = _string_field(obj, prompt_field, where, line, errors, stats, hint)
            completion = _string_field(obj, completion_field, where, line, errors, stats, hint)
            if not prompt:
                raise InputError(
                    f'{where}: "{prompt_field}" is empty',
                    "every completion needs a prompt to follow; text without one trains as plain text",
                )
            stats.documents += 1
            yield prompt, completion, number
    finally:
        _close(raw, source)


# -- Packing -----------------------------------------------------------------------------------------


def pack(lengths: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: (members, bounds), block b holding records members[bounds[b]:bounds[b+1]]
    in input order. Every length must be at most `block_size`. Deterministic: ties go by input order."""
    import numpy as np

    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    free: list[tuple[int, int]] = []  # (space left, block), sorted: the fullest block that fits is first
    blocks: list[list[int]] = []
    for record in order.tolist():
        length = int(lengths[record])
        at = bisect_left(free, (length, -1))
        if at == len(free):
            block, space = len(blocks), block_size
            blocks.append([])
        else:
            space, block = free.pop(at)
        blocks[block].append(record)
        if space - length > 0:
            insort(free, (space - length, block))
    members = np.array([r for b in blocks for r in sorted(b)], dtype=np.int64)
    bounds = np.cumsum([0] + [len(b) for b in blocks], dtype=np.int64)
    return members, bounds


@dataclass
class Packing:
    """One corpus's records packed into blocks, and what was left out."""

    members: np.ndarray
    bounds: np.ndarray
    starts: np.ndarray
    """Each record's first id in the corpus."""
    lengths: np.ndarray
    targets: np.ndarray
    """Per block: the ids the loss learns (completion ids and EOS)."""
    skipped: int
    block_size: int

    @property
    def blocks(self) -> int:
        return len(self.bounds) - 1

    @property
    def padding(self) -> int:
        """Padding ids over all blocks."""
        return self.blocks * self.block_size - int(self.lengths[self.members].sum())


def packed(data: TokenData, block_size: int, long_records: str) -> Packing:
    """Pack `data`'s records into blocks of `block_size`; a longer record raises InputError naming it,
    or with `long_records="skip"` is left out (and counted)."""
    import numpy as np

    table = data.record_table()
    lengths = table[:, 0]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    long = np.flatnonzero(lengths > block_size)
    if len(long) and long_records != "skip":
        first = int(long[0])
        source, line = int(table[first, 1]), int(table[first, 2])
        label = data.sources[source] if source < len(data.sources) else f"input {source + 1}"
        more = f" (and {len(long) - 1:,} more)" if len(long) > 1 else ""
        raise InputError(
            f"{label}:{line}: the record has {int(lengths[first]):,} tokens (prompt + completion + EOS), "
            f"more than a block of {block_size}{more}",
            "records are never split (a completion must see its whole prompt): raise --block-size (up "
            "to the model's context), shorten the record, or pass --long-records skip to leave such "
            "records out",
        )
    kept = np.flatnonzero(lengths <= block_size)
    if len(kept) == 0:
        raise InputError(
            f"all {len(lengths):,} records are longer than a block of {block_size}",
            "raise --block-size (up to the model's context)",
        )
    members, bounds = pack(lengths[kept], block_size)
    members = kept[members]
    learnt = np.add.reduceat(data.mask().astype(np.int64), starts) if len(starts) else starts
    per_block = np.add.reduceat(learnt[members], bounds[:-1]) if len(members) else bounds[:-1]
    return Packing(members, bounds, starts, lengths, per_block.astype(np.int64), len(long), block_size)


# -- Blocks of records -------------------------------------------------------------------------------


@dataclass(eq=False)
class RecordBlocks:
    """Packed blocks of whole records over one TokenData: item i is packed block indices[i]'s ids,
    padded to `block_size`. `arrays` adds the labels (-100 but on completion ids and EOS) and the
    position ids (from 0 in each record) that training uses."""

    data: TokenData
    packing: Packing
    indices: np.ndarray
    """Which packed blocks, in order."""
    _maps: Any = field(default=None, init=False, repr=False)

    @property
    def block_size(self) -> int:
        return self.packing.block_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays([i])[0][0]

    def batch(self, items: Sequence[int]) -> np.ndarray:
        """The blocks' ids stacked: int64, shape (len(items), block_size)."""
        return self.arrays(items)[0]

    def arrays(self, items: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, labels, position ids) of blocks `items`, each int64 (len(items), block_size)."""
        import numpy as np

        ids, mask = self._arrays()
        p = self.packing
        shape = (len(items), self.block_size)
        out_ids = np.full(shape, PAD_ID, dtype=np.int64)
        labels = np.full(shape, IGNORE, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        for row, i in enumerate(items):
            block = int(self.indices[i])
            at = 0
            for record in p.members[p.bounds[block] : p.bounds[block + 1]].tolist():
                start, length = int(p.starts[record]), int(p.lengths[record])
                piece = ids[start : start + length].astype(np.int64)
                out_ids[row, at : at + length] = piece
                labels[row, at : at + length] = np.where(mask[start : start + length] == 1, piece, IGNORE)
                positions[row, at : at + length] = np.arange(length)
                at += length
            positions[row, at:] = np.arange(self.block_size - at)  # the padding: a sequence of its own
        return out_ids, labels, positions

    def targets(self, items: Sequence[int]) -> int:
        """How many ids of blocks `items` the loss learns."""
        return int(self.packing.targets[self.indices[list(items)]].sum()) if len(items) else 0

    @property
    def tokens(self) -> int:
        return len(self) * self.block_size

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The data's ids and mask, memory-mapped once per process."""
        if self._maps is None:
            self._maps = (self.data.array(), self.data.mask())
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}
