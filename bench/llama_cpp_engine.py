"""What llama.cpp as `generate`'s engine would give (issue 19's fallback route), before building it.

The engine would keep llmkit's own sampling: llama.cpp computes each step's logits, llmkit reads them
into torch and picks the token. So each llama-cpp-python contender here decodes 128 greedy tokens one
`eval` at a time and reads the row of logits into a torch tensor and takes its argmax at every token
(and once without reading, to see what reading costs), on `llmkit export` files of GPT-2 small's shape
at f32, f16, q8_0 and q4_0. llmkit's own tiers are timed in the same process, runs alternated.

Needs llama-cpp-python (an optional source build, ~8 minutes on 2 cores):
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF" pip install llama-cpp-python==0.3.36
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import describe_machine, gpt2_small, save, table
from bench.runtimes import GGUF_TYPES, NEW_TOKENS, gguf_files, llmkit_contenders

ROUNDS = 3
THREADS = 2
OPEN: list[object] = []  # closed before exit: llama-cpp-python's __del__ fails at teardown


def llama_cpp_contender(path: Path, read_logits: bool) -> Callable[[], float]:
    """tokens/s of a greedy decode through llama-cpp-python, the logits read into torch or not."""
    import llama_cpp
    import numpy as np
    import torch

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    OPEN.append(llm)
    vocab = llm.n_vocab()

    def run() -> float:
        llm.reset()
        llm._ctx.kv_cache_clear()
        token = 100
        llm.eval([token])
        started = time.perf_counter()
        for _ in range(NEW_TOKENS):
            if read_logits:
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
                token = int(torch.from_numpy(row.copy()).argmax())
            llm.eval([token])
        return NEW_TOKENS / (time.perf_counter() - started)

    return run


def main() -> None:
    model = gpt2_small()
    files = gguf_files(model)
    contenders: dict[str, Callable[[], float]] = {}
    for type in GGUF_TYPES:
        contenders[f"llama-cpp-python {type}, logits into torch"] = llama_cpp_contender(files[type], True)
    contenders["llama-cpp-python q8_0, logits not read"] = llama_cpp_contender(files["q8_0"], False)
    for name, run in llmkit_contenders(model).items():
        if not name.endswith("torch's LM head"):
            contenders[name] = lambda run=run: NEW_TOKENS / run()[0]
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, run in contenders.items():
            rates[name].append(run())
    print(describe_machine())
    rows = [("contender", "tokens/s (median)", "runs")]
    for name, runs in rates.items():
        rows.append((name, f"{statistics.median(runs):.1f}", ", ".join(f"{r:.1f}" for r in runs)))
    print(table(rows))
    save("llama_cpp_engine", {"new_tokens": NEW_TOKENS, "threads": THREADS, "tokens_per_s": rates})
    for llm in OPEN:
        llm.close()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
