"""One prompt, batch 1 (GPT-2 small's shape, CPU, float32): llmkit's generation path against plain
`model.generate` with identical settings. llmkit must cost nothing (ratio >= 0.98).

Runs alternate (plain, llmkit, plain, …) in one process so drift in the machine's speed hits both.
"""

from __future__ import annotations

import statistics
import time

from bench.common import gpt2_small, save, table

NEW_TOKENS = 64
REPEATS = 5
PROMPT = "the king and queen of a quiet river sing to her brother by the green hill " * 4


def main() -> None:
    import torch

    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.generation import Generator, Prompt
    from llmkit.models import load

    lm = load(LoadConfig(model=str(gpt2_small())))
    tok, model = lm.tokenizer, lm.model
    cfg = GenerateConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, seed=1, top_k=50, temperature=1.0
    )
    gen = Generator(lm, cfg)

    def plain() -> str:
        torch.manual_seed(1)
        ids = tok(PROMPT, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=True,
                top_k=50,
                temperature=1.0,
                pad_token_id=tok.eos_token_id,
            )
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def ours() -> str:
        return next(gen.run([Prompt(1, PROMPT)]))[0].completion

    plain(), ours()  # warm-up: first-call allocations and lazy imports
    times: dict[str, list[float]] = {"plain": [], "llmkit": []}
    texts = {}
    for _ in range(REPEATS):
        for name, fn in (("plain", plain), ("llmkit", ours)):
            start = time.perf_counter()
            texts[name] = fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["plain"] / med["llmkit"]
    print(
        table(
            [("", "median s", "tokens/s", "min s", "max s")]
            + [
                (k, f"{med[k]:.2f}", f"{NEW_TOKENS / med[k]:.1f}", f"{min(v):.2f}", f"{max(v):.2f}")
                for k, v in times.items()
            ]
        )
    )
    print(
        f"llmkit / plain speed: {ratio:.3f} (target >= 0.98); same text: {texts['plain'] == texts['llmkit']}"
    )
    save(
        "one_prompt",
        {
            "new_tokens": NEW_TOKENS,
            "times": times,
            "median": med,
            "ratio": ratio,
            "same_text": texts["plain"] == texts["llmkit"],
        },
    )


if __name__ == "__main__":
    main()
