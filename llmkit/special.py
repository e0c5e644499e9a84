"""What a model's tokenizer puts before text: a BOS token (Llama, Mistral, Gemma, Phi-3) or nothing
(GPT-2, Qwen2).

llmkit tokenizes text with `add_special_tokens=False` everywhere (pieces of a stream, prompts and
completions apart, so boundaries are exact) and adds the BOS itself where the tokenizer's own
convention wants one: before a prompt, a scored text, a training document or record.
"""

from __future__ import annotations

import contextlib
from typing import Any

_UNSET = object()


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts before text when asked to add special tokens; None if none."""
    cached = getattr(tokenizer, "_llmkit_bos", _UNSET)
    if cached is not _UNSET:
        return cached  # type: ignore[return-value]
    found: int | None = None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        special = tokenizer("a", add_special_tokens=True)["input_ids"]
        if special[:1] == [bos] and plain[:1] != [bos]:
            found = int(bos)
    with contextlib.suppress(AttributeError):  # one that refuses attributes is asked again next time
        tokenizer._llmkit_bos = found
    return found


def with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` with the tokenizer's BOS before them if it uses one: what `tokenizer(text)` gives."""
    bos = bos_id(tokenizer)
    return ids if bos is None else [bos, *ids]
