"""What each precision tier costs in perplexity, for both of `generate`'s engines: the built-in model
and GPT-2 small's shape (random weights: only the relative change means anything there).

Held-out text (the corpus's last 24,000 characters), cut into windows of the model's context (at most
512 tokens, 4 windows); the reference is the torch model in float32. llmkit's torch tiers score
each window in one forward pass; llama.cpp's (`generate --engine llama.cpp`'s GGUF files, through
llmkit/llamacpp/runtime.py) one token at a time, as it decodes. Needs llama-cpp-python.

    python -m bench.llama_cpp_perplexity            # a few minutes on 2 cores
"""

from __future__ import annotations

import math

from bench.common import corpus_text, describe_machine, gpt2_small, save, table

WINDOWS = 4
TORCH_TIERS = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "--quantize f16": {"quantize": "f16"},
    "--quantize int8": {"quantize": "int8"},
    "--quantize int4": {"quantize": "int4"},
}
GGUF_TIERS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def windows(tokenizer, context: int) -> list[list[int]]:
    ids = tokenizer(corpus_text()[-24_000:])["input_ids"]
    width = min(context, 512)
    return [ids[k * width : (k + 1) * width] for k in range(WINDOWS) if len(ids) >= (k + 1) * width]


def torch_perplexity(model: str, options: dict, chunks: list[list[int]]) -> float:
    import torch

    from llmkit.config import LoadConfig
    from llmkit.models import load

    lm = load(LoadConfig(model=model, **options))
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in chunks:
            batch = torch.tensor([ids], device=lm.device)
            loss = float(lm.model(input_ids=batch, labels=batch).loss)
            total, count = total + loss * (len(ids) - 1), count + len(ids) - 1
    return math.exp(total / count)


def llama_cpp_perplexity(model: str, kind: str, context: int, chunks: list[list[int]]) -> float:
    import torch

    from llmkit.llamacpp.files import gguf_for
    from llmkit.llamacpp.runtime import LlamaCpp
    from llmkit.models import resolve

    runtime = LlamaCpp(gguf_for(model, resolve(model), kind), context, torch.get_num_threads())
    total, count = 0.0, 0
    try:
        for ids in chunks:
            logits = runtime.start(ids[:1])
            for token in ids[1:]:
                total -= float(torch.log_softmax(logits.double(), -1)[token])
                count += 1
                logits = runtime.feed([token])
            runtime.start([ids[0] + 1])  # no prefix of the next window is reused
    finally:
        runtime.close()
    return math.exp(total / count)


def main() -> None:
    from transformers import AutoConfig

    from llmkit.models import context_length, load_tokenizer, resolve

    print(describe_machine())
    results: dict[str, dict[str, float]] = {}
    rows = [("model", "engine", "tier", "perplexity", "vs float32")]
    models = {"built-in tiny-shakespeare": "tiny-shakespeare", "GPT-2 small shape": str(gpt2_small())}
    for label, model in models.items():
        source = resolve(model)
        context = context_length(AutoConfig.from_pretrained(source.model_dir))
        chunks = windows(load_tokenizer(source.tokenizer_dir, model), context)
        got = {f"torch {tier}": torch_perplexity(model, opts, chunks) for tier, opts in TORCH_TIERS.items()}
        for kind in GGUF_TIERS:
            got[f"llama.cpp {kind}"] = llama_cpp_perplexity(model, kind, context, chunks)
        results[label] = got
        reference = got["torch float32"]
        for name, value in got.items():
            engine, tier = name.split(" ", 1)
            rows.append((label, engine, tier, f"{value:.4f}", f"{value / reference - 1:+.2%}"))
        print(f"{label}: {sum(len(c) for c in chunks)} tokens in {len(chunks)} windows", flush=True)
    print(table(rows))
    print(f"wrote {save('llama_cpp_perplexity', {'windows': WINDOWS, 'perplexity': results})}")


if __name__ == "__main__":
    main()
