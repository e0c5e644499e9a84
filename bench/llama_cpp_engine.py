"""What llama.cpp as `generate`'s engine would give (issue 19's fallback route), before building it.

The engine would keep llmkit's own sampling: llama.cpp computes each step's logits, llmkit reads them
into torch and picks the token. So each llama-cpp-python contender here decodes 128 greedy tokens one
`eval` at a time and reads the row of logits into a torch tensor and takes its argmax at every token
(and once without reading, to see what reading costs), on `llmkit export` files of GPT-2 small's shape
at f32, f16, q8_0 and q4_0. llmkit's own tiers are timed in the same process, runs alternated.

Needs llama-cpp-python, an optional source build (483 s on 2 cores with these options):
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
  pip install llama-cpp-python==0.3.36
Threads: torch's count, as bench/runtimes.py gives llama.cpp.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import describe_machine, gpt2_small, save, table
from bench.runtimes import GGUF_TYPES, NEW_TOKENS, gguf_files, llmkit_contenders

ROUNDS = 3
OPEN: list[object] = []  # closed before exit: llama-cpp-python's __del__ fails at teardown


def llama_cpp_contenders(path: Path, threads: int) -> dict[str, Callable[[], float]]:
    """tokens/s of a greedy decode through llama-cpp-python: logits read into torch, and not read."""
    import llama_cpp
    import numpy as np
    import torch

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    OPEN.append(llm)
    vocab = llm.n_vocab()

    def run(read_logits: bool) -> float:
        llm.reset()
        llm._ctx.kv_cache_clear()  # the bindings' high-level API has no reset of the cache itself
        token = 100
        llm.eval([token])
        started = time.perf_counter()
        for _ in range(NEW_TOKENS):
            if read_logits:  # without logits_all, the last row is reachable only through the context
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
                token = int(torch.from_numpy(row.copy()).argmax())
            llm.eval([token])
        return NEW_TOKENS / (time.perf_counter() - started)

    return {"logits into torch": lambda: run(True), "logits not read": lambda: run(False)}


def main() -> None:
    import torch

    threads = torch.get_num_threads()
    model = gpt2_small()
    files = gguf_files(model)
    contenders: dict[str, Callable[[], float]] = {}
    for type in GGUF_TYPES:
        runs = llama_cpp_contenders(files[type], threads)
        contenders[f"llama-cpp-python {type}, logits into torch"] = runs["logits into torch"]
        if type == "q8_0":
            contenders["llama-cpp-python q8_0, logits not read"] = runs["logits not read"]
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
    save("llama_cpp_engine", {"new_tokens": NEW_TOKENS, "threads": threads, "tokens_per_s": rates})
    for llm in OPEN:
        llm.close()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
