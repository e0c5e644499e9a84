"""Many prompts: `generate --input` (batched, length-sorted) against a loop of single-prompt generate calls.

Same process, same model (GPT-2 small's shape), greedy, so the outputs must be identical too.
"""

from __future__ import annotations

import random

from bench.common import WORDS, gpt2_small, save, summary, table, timed

PROMPTS = 64
NEW_TOKENS = 16
REPEATS = 2


def main() -> None:
    import torch

    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.generation import Generator, Prompt
    from llmkit.models import load

    torch.manual_seed(0)
    lm = load(LoadConfig(model=str(gpt2_small()), dtype="float32"))  # equal settings: plain is float32
    rng = random.Random(0)
    prompts = [
        Prompt(i, " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60)))) for i in range(PROMPTS)
    ]
    cfg = GenerateConfig(greedy=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    outputs: dict[str, list[str]] = {}

    def baseline() -> None:
        # What a user's script does: one model.generate per prompt.
        tok, model = lm.tokenizer, lm.model
        texts = []
        for p in prompts:
            ids = tok(p.text, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(
                    **ids,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tok.eos_token_id,
                )
            texts.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
        outputs["loop"] = texts

    def ours() -> None:
        gen = Generator(lm, cfg)
        outputs["llmkit"] = [samples[0].completion for samples in gen.run(prompts)]

    loop_t, ours_t = summary(timed(baseline, REPEATS)), summary(timed(ours, REPEATS))
    tokens = PROMPTS * NEW_TOKENS
    ratio = loop_t["median"] / ours_t["median"]
    same = outputs["loop"] == outputs["llmkit"]
    print(
        table(
            [
                ("", "median s", "tokens/s"),
                ("loop of model.generate", f"{loop_t['median']:.2f}", f"{tokens / loop_t['median']:.1f}"),
                ("llmkit --input", f"{ours_t['median']:.2f}", f"{tokens / ours_t['median']:.1f}"),
            ]
        )
    )
    print(f"ratio {ratio:.2f}x (target >= 4x); identical greedy outputs: {same}")
    save(
        "many_prompts",
        {
            "prompts": PROMPTS,
            "new_tokens": NEW_TOKENS,
            "loop": loop_t,
            "llmkit": ours_t,
            "speedup": ratio,
            "identical_outputs": same,
        },
    )


if __name__ == "__main__":
    main()
