"""Packed blocks: a token cache cut into train and validation blocks, and batches for torch."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkit.data.cache import ProgressFn, TokenData, _tokenize_all
from llmkit.data.packing import LONG_RECORDS, Packing, RecordBlocks, packed
from llmkit.data.records import messages_field as _messages_field
from llmkit.data.records import pair_fields
from llmkit.data.sources import _check_options, _resolve
from llmkit.errors import InputError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerBase


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

    train: Blocks | RecordBlocks
    val: Blocks | RecordBlocks | None
    """None when val_split is 0, or there was a single block."""
    fingerprint: str
    """The data's identity (content + tokenizer, train and val_file); record it with the run."""
    val_split: float
    seed: int
    pairs: dict[str, Any] | None = None
    """Prompt/completion records (RecordBlocks): fields, records, skipped, padding; None for text."""

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
            **(self.pairs or {}),
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
    prompt_field: str | None = None,
    completion_field: str | None = None,
    long_records: str = "error",
    messages_field: str | None = None,
) -> PreparedData:
    """Tokenize (or find in the cache) and pack the training data, and set validation blocks apart.

    With `val_file` (a file, directory or `-`), it is tokenized the same way and all its blocks
    validate; `val_split` is then unused. Else `val_split` of the training blocks are held out (see
    `split_blocks`). The other options are those of `tokenize`. Raises InputError for unusable data,
    less than one block included, and UsageError for bad options.

    Prompt/completion records (see `llmkit.data.records`) when `prompt_field` or `completion_field` is
    given, or when the first JSONL record has "prompt" and "completion" and no `text_field`: then
    train and val are RecordBlocks, and a record longer than a block raises InputError, or with
    `long_records="skip"` is left out.

    Conversation records (see `llmkit.data.conversations`) when `messages_field` is given, or when the
    first JSONL record has a "messages" list and no `text_field`, prompt or completion: rendered
    through the tokenizer's chat template and learnt on the assistant turns, packed the same way.
    """
    import numpy as np

    _check_options(
        errors=errors, text_field=text_field, num_proc=num_proc, block_size=block_size, val_split=val_split
    )
    if long_records not in LONG_RECORDS:
        raise UsageError(f"unknown --long-records {long_records!r}", "use error or skip")
    sources = _resolve(paths, glob)
    if messages_field is not None and (prompt_field is not None or completion_field is not None):
        raise UsageError(
            "--messages-field and --prompt-field/--completion-field select different kinds of record",
            "give one: conversations (messages) or prompt/completion records",
        )
    if messages_field is not None and not messages_field:
        raise UsageError("the messages field must be a non-empty name")
    messages = _messages_field(sources, text_field, prompt_field, completion_field, messages_field)
    pairs = None if messages is not None else pair_fields(sources, text_field, prompt_field, completion_field)
    if pairs is not None and (not all(pairs) or pairs[0] == pairs[1]):
        raise UsageError("the prompt and completion fields must be two different, non-empty names")
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
        pairs=pairs,
        messages_field=messages,
    )
    train_data = corpora[0]
    try:
        if pairs is not None or messages is not None:
            return _prepare_pairs(corpora, block_size, val_file, val_split, seed, long_records)
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


def _prepare_pairs(
    corpora: list[TokenData],
    block_size: int,
    val_file: str | None,
    val_split: float,
    seed: int,
    long_records: str,
) -> PreparedData:
    """Prompt/completion records packed into blocks, some held out as `prepare` does for text."""
    import numpy as np

    train_data = corpora[0]
    train_packing = packed(train_data, block_size, long_records)
    packings: list[Packing] = [train_packing]
    if val_file is not None:
        val_data = corpora[1]
        val_packing = packed(val_data, block_size, long_records)
        packings.append(val_packing)
        train = RecordBlocks(train_data, train_packing, np.arange(train_packing.blocks))
        val: RecordBlocks | None = RecordBlocks(val_data, val_packing, np.arange(val_packing.blocks))
        fingerprint = hashlib.sha256(f"{train_data.fingerprint}+{val_data.fingerprint}".encode())
        fingerprint_text = fingerprint.hexdigest()[:32]
    else:
        train_index, val_index = split_blocks(train_packing.blocks, val_split, seed)
        train = RecordBlocks(train_data, train_packing, train_index)
        val = RecordBlocks(train_data, train_packing, val_index) if len(val_index) else None
        fingerprint_text = train_data.fingerprint
    blocks = sum(p.blocks for p in packings)
    assert train_data.fields is not None
    if len(train_data.fields) == 1:
        fields: dict[str, Any] = {"messages_field": train_data.fields[0]}
    else:
        fields = {"prompt_field": train_data.fields[0], "completion_field": train_data.fields[1]}
    summary = {
        **fields,
        "records": sum(len(p.members) for p in packings),
        "skipped_records": sum(p.skipped for p in packings),
        "learnt_tokens": int(sum(p.targets.sum() for p in packings)),
        "padding": round(sum(p.padding for p in packings) / (blocks * block_size), 6),
    }
    return PreparedData(train, val, fingerprint_text, val_split, seed, summary)
