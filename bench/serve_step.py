"""Where one decoding step of `llmkit serve`'s engine goes, at 16 rows (GPT-2 small's shape, float32).

In-process, no HTTP: 16 sampled sequences (temperature 1, own seeds) decode 64 tokens together; each
step is split into the forward pass, sampling (every row's next token) and the rest (delivering
tokens: text, stop checks, chunks). Alternated with the same run sampling row by row with
torch.multinomial, as the engine did before sampling was batched, for the ratio; and with torch's own
x·Wᵀ products instead of the weight-left form products.py picks where the BLAS is faster so.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

from bench.common import describe_machine, gpt2_small, save, table
from bench.serve import prompt

ROWS = 16
TOKENS = 64
ROUNDS = 3


def row_by_row(samplers, logits, contexts, generated) -> list[Any]:
    """The engine's sampling before batching: each row alone, torch.multinomial on its generator."""
    import torch

    out: list[Any] = []
    for i, sampler in enumerate(samplers):
        scores = sampler.adjust(logits[i : i + 1], None, generated[i])
        warped = sampler.warpers(None, scores) if sampler.warpers else scores
        token = int(torch.multinomial(torch.softmax(warped[0], -1), 1, generator=sampler.generator))
        sampler.count(token)
        out.append(token)
    return out


def one_run(engine: Any, ids: list[list[int]], picker: Any) -> dict[str, float]:
    import torch

    from llmkit.serve import engine as engine_module
    from llmkit.serve.sampling import SamplingParams

    spent = {"forward": 0.0, "sampling": 0.0}
    real_model, real_pick = engine.model, engine_module.pick_batch

    def forward(**kwargs: Any) -> Any:
        started = time.perf_counter()
        out = real_model(**kwargs)
        spent["forward"] += time.perf_counter() - started
        return out

    def pick(*args: Any) -> Any:
        started = time.perf_counter()
        out = picker(*args)
        spent["sampling"] += time.perf_counter() - started
        return out

    done = threading.Semaphore(0)

    def deliver(chunk: Any) -> None:
        if chunk.finish_reason or chunk.error:
            done.release()

    params = SamplingParams(max_tokens=TOKENS, temperature=1.0)
    sequences = [engine.sequence(ids[i], params, deliver, seed=i) for i in range(ROWS)]
    engine.model, engine_module.pick_batch = forward, pick
    try:
        with torch.inference_mode():
            engine._step(sequences)  # prefill (not counted below)
            spent = {"forward": 0.0, "sampling": 0.0}
            steps, started = 0, time.perf_counter()
            while engine._rows:
                engine._step([])
                steps += 1
            total = time.perf_counter() - started
    finally:
        engine.model, engine_module.pick_batch = real_model, real_pick
    ms = 1000 / steps
    return {
        "steps": steps,
        "step_ms": total * ms,
        "forward_ms": spent["forward"] * ms,
        "sampling_ms": spent["sampling"] * ms,
        "rest_ms": (total - spent["forward"] - spent["sampling"]) * ms,
        "tokens_per_s": ROWS * steps / total,
    }


def main() -> None:
    print(describe_machine())
    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.products import ENV, weight_left_faster
    from llmkit.serve.engine import Engine
    from llmkit.serve.sampling import pick_batch

    config = LoadConfig(model=str(gpt2_small()), dtype="float32")
    engine = Engine(load(config), max_batch=ROWS)
    left = weight_left_faster()
    # The same engine with torch's own products (x·Wᵀ), for the ratio of products.py's choice.
    saved, os.environ[ENV] = os.environ.get(ENV), "0"
    try:
        torch_products = Engine(load(config), max_batch=ROWS)
    finally:
        if saved is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = saved
    ids = [engine.tokenizer(prompt(i), add_special_tokens=False)["input_ids"] for i in range(ROWS)]
    one_run(engine, ids, pick_batch)  # warm-up
    one_run(torch_products, ids, pick_batch)
    runs: dict[str, list[dict[str, float]]] = {"batched": [], "row by row": [], "torch's products": []}
    for _ in range(ROUNDS):  # alternated: the machine is noisy
        runs["batched"].append(one_run(engine, ids, pick_batch))
        runs["row by row"].append(one_run(engine, ids, row_by_row))
        runs["torch's products"].append(one_run(torch_products, ids, pick_batch))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    rows = [("sampling", "ms/step", "forward", "sampling", "rest", "tokens/s")]
    for name in runs:
        rows.append(
            (
                name,
                f"{med(name, 'step_ms'):.1f}",
                f"{med(name, 'forward_ms'):.1f}",
                f"{med(name, 'sampling_ms'):.1f}",
                f"{med(name, 'rest_ms'):.1f}",
                f"{med(name, 'tokens_per_s'):.1f}",
            )
        )
    print(table(rows))
    ratio = med("batched", "tokens_per_s") / med("row by row", "tokens_per_s")
    print(f"batched sampling vs row by row: {ratio:.2f}x tokens/s at {ROWS} rows (medians of {ROUNDS})")
    products = med("batched", "tokens_per_s") / med("torch's products", "tokens_per_s")
    print(
        f"products with the weight {'on the left' if left else 'on the right (measured faster here)'} "
        f"vs torch's x·Wᵀ: {products:.2f}x tokens/s"
    )
    save(
        "serve_step",
        {
            "rows": ROWS,
            "tokens": TOKENS,
            "runs": runs,
            "ratio": ratio,
            "weight_left": left,
            "products": products,
        },
    )


if __name__ == "__main__":
    main()
