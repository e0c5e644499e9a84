"""The engine's KV cache: transformers' DynamicCache, with room to grow instead of a copy per token.

A DynamicLayer appends each step's keys and values with `torch.cat`, copying the whole cache of every
layer on every decoding step; with 16 sequences of GPT-2 small that is ~100 MB per step. Here each
layer keeps a buffer with spare columns: a step writes its one column in place, and the cache is
copied only when the buffer is full (doubling it) or the batch changes (rows leave or join). The model
sees the same `keys`/`values` tensors as before, as views of the buffer.

A cache may also keep its keys and values in another precision than the model's: float32 for a
half-precision model on the CPU, whose attention is faster in float32 (llmkit/attention.py).

The buffers also have room for rows: up to the engine's batch size. Sequences that join write only
their own rows (`add_rows`) and sequences that leave move only the rows after them (`keep_rows`), where
a fresh buffer and a copy of every row would otherwise be made at each arrival and each departure (16
clients streaming 64 tokens: one of each every 4 steps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SPARE = 64  # columns added beyond what is needed when a buffer is (re)allocated, at least


def _layer_class(store: torch.dtype | None, rows_room: int) -> type:
    import torch
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """Keys and values are rows [0, n) and columns [start, end) of buffers shaped [rows, heads,
        columns, dim] with at least `rows_room` rows, in `store` precision (None: the model's)."""

        def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
            super().__init__()
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None
            self._end = 0
            if keys is not None and values is not None:
                self.lazy_initialization(keys, values)
                self._adopt(keys, values, keys.shape[-2])

        def _adopt(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
            """Copy `keys`/`values` into new buffers with `room` columns beyond them."""
            used = keys.shape[-2]
            shape = (max(keys.shape[0], rows_room), *keys.shape[1:-2], used + room, keys.shape[-1])
            self._k = keys.new_empty(shape, dtype=store or keys.dtype)
            self._v = values.new_empty(shape, dtype=store or values.dtype)
            rows = keys.shape[0]
            self._k[:rows, ..., :used, :] = keys
            self._v[:rows, ..., :used, :] = values
            self._end = used
            self.keys, self.values = self._k[:rows, ..., :used, :], self._v[:rows, ..., :used, :]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            add = key_states.shape[-2]
            if self._k is None or self._v is None:
                self._adopt(key_states, value_states, max(SPARE, add))
                return self.keys, self.values
            start = self._end - self.keys.shape[-2]
            if self._end + add > self._k.shape[-2]:
                used = self.keys.shape[-2]
                self._adopt(self.keys, self.values, max(SPARE, used + add))
                start = 0
            rows = self.keys.shape[0]
            self._k[:rows, ..., self._end : self._end + add, :] = key_states
            self._v[:rows, ..., self._end : self._end + add, :] = value_states
            self._end += add
            self._view(rows, start)
            return self.keys, self.values

        def _view(self, rows: int, start: int) -> None:
            assert self._k is not None and self._v is not None
            self.keys = self._k[:rows, ..., start : self._end, :]
            self.values = self._v[:rows, ..., start : self._end, :]

        def can_add(self, rows: int, width: int) -> bool:
            """Whether `rows` more rows of `width` columns fit in place."""
            # Columns left of the batch's first one are free (trimmed padding): they take new padding.
            return (
                self._k is not None and self.keys.shape[0] + rows <= self._k.shape[0] and width <= self._end
            )

        def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Append rows whose newest column is the batch's newest too; both sides padded with zeros
            on the left to the wider one (the engine pads the attention mask alike)."""
            assert self._k is not None and self._v is not None
            rows, width = self.keys.shape[0], max(self.keys.shape[-2], keys.shape[-2])
            start, end, add = self._end - width, self._end, keys.shape[0]
            old = self._end - self.keys.shape[-2]
            if start < old:  # the batch's own rows get zero padding where the new rows are longer
                self._k[:rows, ..., start:old, :] = 0
                self._v[:rows, ..., start:old, :] = 0
            begin = end - keys.shape[-2]
            self._k[rows : rows + add, ..., start:begin, :] = 0
            self._v[rows : rows + add, ..., start:begin, :] = 0
            self._k[rows : rows + add, ..., begin:end, :] = keys
            self._v[rows : rows + add, ..., begin:end, :] = values
            self._view(rows + add, start)

        def keep_rows(self, keep: list[int]) -> None:
            """Only these rows stay, in this order; rows after a gap move up into it."""
            assert self._k is not None and self._v is not None
            start = self._end - self.keys.shape[-2]
            if keep != list(range(len(keep))):
                index = torch.tensor(keep, device=self._k.device)
                self._k[: len(keep), ..., start : self._end, :] = self.keys.index_select(0, index)
                self._v[: len(keep), ..., start : self._end, :] = self.values.index_select(0, index)
            self._view(len(keep), start)

        def trim(self, first: int) -> None:
            """Forget the first `first` columns (padding in every row); no copy."""
            self.keys, self.values = self.keys[..., first:, :], self.values[..., first:, :]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.get_seq_length() > 0:
                self.keep_rows([int(i) for i in indices])

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            if self._k is not None:
                self._adopt(self.keys, self.values, SPARE)

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            if self._k is not None:
                self._adopt(self.keys, self.values, SPARE)

        def reset(self) -> None:
            self._k = self._v = None
            self._end = 0
            super().reset()

    return RoomyLayer


_LAYERS: dict[Any, type] = {}


def layer_class(store: torch.dtype | None = None, rows: int = 1) -> type:
    if (store, rows) not in _LAYERS:
        _LAYERS[store, rows] = _layer_class(store, rows)
    return _LAYERS[store, rows]


def new_cache(
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    store: torch.dtype | None = None,
    rows: int = 1,
) -> Any:
    """A DynamicCache of roomy layers: empty (the model fills it) or holding `layers`' keys and values;
    `store`: the precision they are kept in (None: as given); `rows`: the rows the buffers have room
    for (more are taken when given)."""
    from transformers import DynamicCache

    cls = layer_class(store, rows)
    cache = DynamicCache()
    cache.layer_class_to_replicate = cls  # layers the model adds on its first pass are roomy too
    if layers is not None:
        cache.layers = [cls(keys, values) for keys, values in layers]
    return cache
