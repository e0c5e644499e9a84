"""The engine's KV cache: transformers' DynamicCache, with room to grow instead of a copy per token.

A DynamicLayer appends each step's keys and values with `torch.cat`, copying the whole cache of every
layer on every decoding step; with 16 sequences of GPT-2 small that is ~100 MB per step. Here each
layer keeps a buffer with spare columns: a step writes its one column in place, and the cache is
copied only when the buffer is full (doubling it) or the batch changes (rows leave or join). The model
sees the same `keys`/`values` tensors as before, as views of the buffer.

A cache may also keep its keys and values in another precision than the model's: float32 for a
half-precision model on the CPU, whose attention is faster in float32 (llmkit/attention.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SPARE = 64  # columns added beyond what is needed when a buffer is (re)allocated, at least


def _layer_class(store: torch.dtype | None) -> type:
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """Keys and values are the columns [start, end) of buffers shaped [batch, heads, capacity, dim],
        in `store` precision (None: the model's)."""

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
            shape = (*keys.shape[:-2], used + room, keys.shape[-1])
            self._k = keys.new_empty(shape, dtype=store or keys.dtype)
            self._v = values.new_empty(shape, dtype=store or values.dtype)
            self._k[..., :used, :] = keys
            self._v[..., :used, :] = values
            self._end = used
            self.keys, self.values = self._k[..., :used, :], self._v[..., :used, :]

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
            self._k[..., self._end : self._end + add, :] = key_states
            self._v[..., self._end : self._end + add, :] = value_states
            self._end += add
            self.keys, self.values = self._k[..., start : self._end, :], self._v[..., start : self._end, :]
            return self.keys, self.values

        def trim(self, first: int) -> None:
            """Forget the first `first` columns (padding in every row); no copy."""
            self.keys, self.values = self.keys[..., first:, :], self.values[..., first:, :]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.get_seq_length() > 0:
                self._adopt(self.keys[indices, ...], self.values[indices, ...], SPARE)

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


def layer_class(store: torch.dtype | None = None) -> type:
    if store not in _LAYERS:
        _LAYERS[store] = _layer_class(store)
    return _LAYERS[store]


def new_cache(
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None, store: torch.dtype | None = None
) -> Any:
    """A DynamicCache of roomy layers: empty (the model fills it) or holding `layers`' keys and values;
    `store`: the precision they are kept in (None: as given)."""
    from transformers import DynamicCache

    cls = layer_class(store)
    cache = DynamicCache()
    cache.layer_class_to_replicate = cls  # layers the model adds on its first pass are roomy too
    if layers is not None:
        cache.layers = [cls(keys, values) for keys, values in layers]
    return cache
