"""llama-cpp-python, held to what the engine needs: feed token ids, read the last row of logits.

The bindings stay an optional extra: they build llama.cpp from source (about 8 minutes on 2 cores),
and `-DGGML_NATIVE=ON` builds it for the machine it is built on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import torch

INSTALL_HINT = (
    'install the bindings: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install "llmkit[llama-cpp]" (builds llama.cpp '
    "for this CPU, ~10 minutes), or use --engine torch"
)


def bindings() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlmkitError(f"--engine llama.cpp needs llama-cpp-python ({exc})", INSTALL_HINT) from None
    return llama_cpp


class LlamaCpp:
    """One llama.cpp model and context on the CPU; the KV cache keeps the longest prefix shared with
    the previous sequence, so samples of one prompt evaluate it once."""

    def __init__(self, path: Path, context: int, threads: int) -> None:
        llama_cpp = bindings()
        self._lib = llama_cpp
        try:
            self._llm = llama_cpp.Llama(
                str(path),
                n_ctx=context,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
        except ValueError as exc:  # the bindings' word for a file llama.cpp can't load
            raise LlmkitError(f"llama.cpp could not load {path}: {exc}", "use --engine torch") from None
        self.n_vocab = self._llm.n_vocab()
        self._tokens: list[int] = []  # what the KV cache holds, in order

    def start(self, ids: list[int]) -> torch.Tensor:
        """Begin a sequence with these ids; the logits after the last one."""
        keep = 0
        for old, new in zip(self._tokens, ids[:-1], strict=False):  # the last id is always evaluated
            if old != new:
                break
            keep += 1
        self._llm.n_tokens = keep  # eval drops the cache past n_tokens before it decodes
        self._tokens = self._tokens[:keep]
        return self.feed(ids[keep:])

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Append ids to the sequence; the logits after the last one (float32, a copy)."""
        import numpy as np
        import torch

        self._llm.eval(ids)
        self._tokens.extend(ids)
        row = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._llm.ctx, -1), shape=(self.n_vocab,))
        return torch.from_numpy(row.copy())

    def close(self) -> None:
        # Explicitly: the bindings' __del__ fails when left to interpreter teardown.
        self._llm.close()
