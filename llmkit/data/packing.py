"""Prompt/completion records packed whole into blocks, trained on the completion only.

Records are packed whole into blocks, never split: a completion learnt without its prompt would teach
the model to answer a question it was never asked. Packing is best-fit decreasing (longest record first,
each into the fullest block it still fits), deterministic, so every process packs alike; the rest of a
block is padding. Each record gets position ids from 0, which makes transformers' attention keep it to
itself, as at generation time: a record never sees the record before it in its block.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkit.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from llmkit.data.cache import TokenData

LONG_RECORDS = ("error", "skip")
IGNORE = -100
"""The label that the model's loss skips: prompt ids and padding."""
PAD_ID = 0
"""The id that fills a block's end; it is never learnt and no record attends to it."""


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
        chat = data.fields is not None and len(data.fields) == 1
        what = "the rendered conversation" if chat else "prompt + completion + EOS"
        why = (
            "an assistant turn must see the conversation before it"
            if chat
            else "a completion must see its whole prompt"
        )
        raise InputError(
            f"{label}:{line}: the record has {int(lengths[first]):,} tokens ({what}), "
            f"more than a block of {block_size}{more}",
            f"records are never split ({why}): raise --block-size (up "
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
