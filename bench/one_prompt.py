"""One prompt, batch 1 (GPT-2 small's shape, CPU): llmkit's generation path against plain float32
`model.generate` with identical settings. llmkit must cost nothing (ratio >= 0.98); `--compile`
(static KV cache + compiled decoding step) should beat it (target >= 1.5x); bf16 weights are timed too.
"llmkit (defaults)" is `--dtype auto` against plain at *its* default (float32): bf16 where the CPU
computes it natively (target >= 1.4x there), float32 elsewhere (parity).

Runs alternate (plain, llmkit, …) in one process so drift in the machine's speed hits all of them.
Decoding one sequence reads every weight once per token, so the machine's memory read bandwidth
divided by the weight bytes read per token bounds tokens/s; each contender's fraction is reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from bench.common import describe_machine, gpt2_small, save, table, timed

NEW_TOKENS = 64
REPEATS = 5
PROMPT = "the king and queen of a quiet river sing to her brother by the green hill " * 4


def main() -> None:
    import torch

    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.generation import Generator, Prompt
    from llmkit.models import load

    print(describe_machine())
    lm = load(LoadConfig(model=str(gpt2_small()), dtype="float32"))
    tok, model = lm.tokenizer, lm.model
    cfg = GenerateConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, seed=1, top_k=50, temperature=1.0
    )
    gen = Generator(lm, cfg)
    compiled = Generator(lm, replace(cfg, compile=True))
    gen16 = Generator(load(LoadConfig(model=str(gpt2_small()), dtype="bfloat16")), cfg)
    auto = load(LoadConfig(model=str(gpt2_small())))  # what a user gets without --dtype
    default_dtype = str(auto.dtype).removeprefix("torch.")
    gen_auto = Generator(auto, cfg)
    gen8 = Generator(load(LoadConfig(model=str(gpt2_small()), quantize="int8")), cfg)

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

    def ours(g: Generator = gen) -> str:
        return next(g.run([Prompt(1, PROMPT)]))[0].completion

    contenders = {
        "plain": plain,
        "llmkit": ours,
        "llmkit --compile": lambda: ours(compiled),
        "llmkit --dtype bfloat16": lambda: ours(gen16),
        "llmkit --quantize int8": lambda: ours(gen8),
        f"llmkit (defaults: {default_dtype})": lambda: ours(gen_auto),
    }
    start = time.perf_counter()
    for fn in contenders.values():
        fn()  # warm-up: first-call allocations, lazy imports, compiling
    warmup = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in contenders}
    texts = {}
    for _ in range(REPEATS):
        for name, fn in contenders.items():
            start = time.perf_counter()
            texts[name] = fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med["plain"] / med[k] for k in med}
    ratio = ratios["llmkit"]
    bandwidth = read_bandwidth()
    weight_bytes = bytes_per_token(model)
    bound = bandwidth / weight_bytes
    print(
        table(
            [("", "median s", "tokens/s", "min s", "max s", "vs plain", "of fp32 bound")]
            + [
                (
                    k,
                    f"{med[k]:.2f}",
                    f"{NEW_TOKENS / med[k]:.1f}",
                    f"{min(v):.2f}",
                    f"{max(v):.2f}",
                    f"{ratios[k]:.2f}x",
                    f"{NEW_TOKENS / med[k] / bound:.0%}",
                )
                for k, v in times.items()
            ]
        )
    )
    print(
        f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; float32 weights read per token "
        f"{weight_bytes / 1e6:.0f} MB; bound {bound:.1f} tokens/s; warm-up incl. compiling {warmup:.0f}s"
    )
    print(
        f"llmkit / plain speed: {ratio:.3f} (target >= 0.98); "
        f"same text: {texts['plain'] == texts['llmkit']}; "
        f"--compile: {ratios['llmkit --compile']:.2f}x; --quantize int8: "
        f"{ratios['llmkit --quantize int8']:.2f}x (target >= 1.5); at defaults ({default_dtype}, "
        f"{auto.dtype_reason}): {ratios[f'llmkit (defaults: {default_dtype})']:.2f}x plain at its defaults"
    )
    quality = perplexity_change()
    print(
        table(
            [("tiny-shakespeare, held-out text", "perplexity", "change")]
            + [(k, f"{v:.3f}", f"{v / quality['float32'] - 1:+.2%}") for k, v in quality.items()]
        )
    )
    save(
        "one_prompt",
        {
            "new_tokens": NEW_TOKENS,
            "times": times,
            "median": med,
            "ratio": ratio,
            "ratios_vs_plain": ratios,
            "default_dtype": default_dtype,
            "default_dtype_reason": auto.dtype_reason,
            "same_text": texts["plain"] == texts["llmkit"],
            "read_bandwidth_gb_s": bandwidth / 1e9,
            "weight_bytes_per_token": weight_bytes,
            "bound_tokens_per_s": bound,
            "warmup_s": warmup,
            "perplexity_builtin_heldout": quality,
        },
    )


def perplexity_change() -> dict[str, float]:
    """What the faster weights cost: the built-in (trained) model's perplexity on held-out text."""
    from bench.finetune import split_corpus
    from llmkit.config import LoadConfig, PerplexityConfig
    from llmkit.models import load
    from llmkit.scoring import perplexity

    _, heldout = split_corpus()
    text = heldout.read_text(encoding="utf-8")
    result = {}
    # One piece: the whole held-out text, tokenized at once.
    for name, load_cfg in (
        ("float32", LoadConfig(model="tiny-shakespeare", dtype="float32")),
        ("bfloat16", LoadConfig(model="tiny-shakespeare", dtype="bfloat16")),
        ("int8", LoadConfig(model="tiny-shakespeare", quantize="int8")),
    ):
        lm = load(load_cfg)
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        result[name] = perplexity(lm, [(ids, text)], PerplexityConfig()).perplexity
    return result


def read_bandwidth() -> float:
    """Bytes/s of reading a 1 GiB float32 tensor (median of 5), with torch's own threads."""
    import torch

    x = torch.ones(2**28)
    x.sum()
    return x.numel() * 4 / statistics.median(timed(x.sum, 5))


def bytes_per_token(model) -> int:
    """Weight bytes one decoding step reads: every parameter except the position table (one row)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wpe" not in n)


if __name__ == "__main__":
    main()
