"""Text → ids: the tokenizer as the cache sees it, encoded here or in a pool of worker processes."""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.errors import ModelError
from llmkit.special import bos_id
from llmkit.tokens import splits_safely

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase


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
    bos: int | None = None
    """Put before each document and record when the tokenizer puts a BOS before text (llmkit.special)."""


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
        text,
        hashlib.sha256(text.encode()).hexdigest(),
        eos,
        token_dtype(size),
        splits_safely(tokenizer),
        bos_id(tokenizer),
    )


class _Encoder:
    """Batches of text → one array of ids: EOS after each document's last piece, and the BOS before
    its first where the tokenizer uses one."""

    def __init__(self, tokenizer_json: str, eos: int, dtype: str, bos: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos, self.dtype, self.bos = eos, dtype, bos
        self.lead = [] if bos is None else [bos]

    def __call__(self, texts: list[str], bounds: list[tuple[bool, bool]]) -> np.ndarray:
        """`bounds`: (starts a document, ends one) for each piece."""
        import numpy as np

        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        ids: list[int] = []
        for encoding, (start, end) in zip(encode(texts, add_special_tokens=False), bounds, strict=True):
            if start:
                ids.extend(self.lead)
            ids.extend(encoding.ids)
            if end:
                ids.append(self.eos)
        return np.array(ids, dtype=self.dtype)

    def pairs(self, prompts: list[str], completions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, learn mask, record lengths) for prompt/completion records: each record is
        [BOS] + ids(prompt) + ids(completion) + EOS, tokenized apart so the boundary is exact (the BOS
        only where the tokenizer uses one); the mask is 0 on the BOS and the prompt's ids and 1 on the
        completion's and the EOS."""
        import numpy as np

        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encoded = encode(prompts + completions, add_special_tokens=False)
        ids: list[int] = []
        mask: list[int] = []
        lengths: list[int] = []
        for prompt, completion in zip(encoded[: len(prompts)], encoded[len(prompts) :], strict=True):
            ids += self.lead
            ids += prompt.ids
            ids += completion.ids
            ids.append(self.eos)
            mask += [0] * (len(self.lead) + len(prompt.ids))
            mask += [1] * (len(completion.ids) + 1)
            lengths.append(len(self.lead) + len(prompt.ids) + len(completion.ids) + 1)
        return np.array(ids, dtype=self.dtype), np.array(mask, dtype=np.uint8), np.array(lengths, np.int64)

    def conversations(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> tuple[Any, Any, Any]:
        """(ids, learn mask, record lengths) for rendered conversations: each text tokenized whole
        (the template's own special tokens parsed as such), the mask 1 on the ids whose characters
        overlap one of its spans (assistant content and end-of-turn marker). Overlap, not "starts
        inside": after a generation prompt ending in a space ("Assistant: "), the content's first id
        carries that space, and it is the id the turn must learn. The BOS goes first where the
        tokenizer uses one, unless the template already put it there."""
        import numpy as np

        ids: list[np.ndarray] = []
        mask: list[np.ndarray] = []
        lengths: list[int] = []
        # encode_batch, not encode_batch_fast: the fast one leaves the offsets out
        for encoding, record in zip(
            self.tokenizer.encode_batch(texts, add_special_tokens=False), spans, strict=True
        ):
            lead = self.lead if encoding.ids[:1] != self.lead else []
            offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            learn = np.zeros(len(offsets), dtype=bool)
            for start, end in record:
                learn |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
            ids.append(np.array(lead + encoding.ids, dtype=np.int64))
            mask.append(np.concatenate([np.zeros(len(lead), dtype=bool), learn]))
            lengths.append(len(lead) + len(encoding.ids))
        return (
            np.concatenate(ids).astype(self.dtype) if ids else np.zeros(0, self.dtype),
            np.concatenate(mask).astype(np.uint8) if mask else np.zeros(0, np.uint8),
            np.array(lengths, np.int64),
        )


_worker: _Encoder | None = None


def _init_worker(tokenizer_json: str, eos: int, dtype: str, bos: int | None) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker = _Encoder(tokenizer_json, eos, dtype, bos)


def _work(texts: list[str], bounds: list[tuple[bool, bool]]) -> np.ndarray:
    assert _worker is not None
    return _worker(texts, bounds)


def _work_pairs(prompts: list[str], completions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _worker is not None
    return _worker.pairs(prompts, completions)


def _work_conversations(texts: list[str], spans: list[list[tuple[int, int]]]) -> tuple[Any, Any, Any]:
    assert _worker is not None
    return _worker.conversations(texts, spans)


def _encoded(
    jobs: Iterator[tuple[list, list, Any]],
    spec: _TokenizerSpec,
    num_proc: int,
    pairs: bool = False,
    conversations: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """(result, tag) per job, in job order, encoded here or by `num_proc` worker processes.

    A job is (texts, bounds, tag) and its result the ids (`_Encoder.__call__`); with `pairs`, a job is
    (prompts, completions, tag) and its result (ids, mask, lengths) (`_Encoder.pairs`); with
    `conversations`, (texts, spans, tag) and (ids, mask, lengths) (`_Encoder.conversations`). The tag (bytes
    done, say) comes back untouched.
    """
    args = (spec.json, spec.eos, spec.dtype, spec.bos)
    if num_proc == 1:
        encoder = _Encoder(*args)
        call = encoder.conversations if conversations else encoder.pairs if pairs else encoder
        for first, second, done in jobs:
            yield call(first, second), done
        return
    import multiprocessing

    # spawn, not fork: the parent may hold torch or tokenizer threads that a fork would copy mid-flight.
    work = _work_conversations if conversations else _work_pairs if pairs else _work
    with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, args) as pool:
        pending: deque[tuple[Any, int]] = deque()  # a bounded window: the corpus never queues up whole
        for first, second, done in jobs:
            pending.append((pool.apply_async(work, (first, second)), done))
            if len(pending) >= 2 * num_proc:
                result, at = pending.popleft()
                yield result.get(), at
        while pending:
            result, at = pending.popleft()
            yield result.get(), at
