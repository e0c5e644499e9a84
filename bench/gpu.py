"""GPU checks (only where a GPU exists): GPT-2-small fine-tuning MFU and batch-1 decode speed.

`python -m bench.gpu` (or `make bench-gpu`) on a CUDA machine; it finishes in a few minutes. On a
machine without CUDA it says so and exits 0; `python -m bench.gpu --cpu-smoke` runs the whole script
on the CPU on the test suite's tiny model (2 layers, 64 wide) and 20 KB of text: a check of the
script, not a measurement (about a minute on 2 CPU cores, most of it compiling); it writes no results.
Writes bench/results/gpu.json.

1. Fine-tuning: llmkit's own training loop (bf16 autocast, fused AdamW, SDPA attention — llmkit's
   defaults on a bf16 GPU), and the same with `--compile`, on GPT-2 small's shape, block 1024.
   MFU = achieved model FLOPs / the GPU's peak dense bf16 FLOPs, with the PaLM count of
   6N + 12·L·d·T FLOPs per token. Next to it, a bare loop over the same model with `torch.compile`,
   as the ceiling the training loop could reach.
2. Decoding one prompt: plain `model.generate` (bf16) vs llmkit's path vs llmkit `--compile` (static
   KV cache + CUDA graphs via transformers' compiled decoding step).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import BUILD, corpus_text, gpt2_small, save, table

# Peak dense bf16 tensor FLOP/s by GPU name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
SIZES = {"train_steps": 40, "log_every": 5, "batch": 16, "block": 1024, "new_tokens": 128, "repeats": 5}
SIZES["text_bytes"] = 6_000_000  # enough for 40 steps without an epoch boundary (each writes a checkpoint)
SMOKE = {"train_steps": 4, "log_every": 2, "batch": 1, "block": 32, "new_tokens": 4, "repeats": 1}
SMOKE["text_bytes"] = 20_000


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def training_text(where: Path, size: int) -> Path:
    """About `size` bytes of the corpus (repeated, or cut at a line end)."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "train.txt"
    text = corpus_text()
    text = text * max(1, size // len(text)) if size >= len(text) else text[: text.rfind("\n", 0, size) + 1]
    path.write_text(text, encoding="utf-8")
    return path


def smoke_model(path: Path = BUILD / "gpu-smoke-tiny") -> Path:
    """The test suite's tiny GPT-2 (2 layers, 64 wide, ~400 tokens), built once."""
    from llmkit.testing import build_tiny_model

    return path if (path / "config.json").is_file() else build_tiny_model(path)


def flops_per_token(model: Any, block: int) -> float:
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n)
    return 6 * params + 12 * cfg.n_layer * cfg.n_embd * block


def llmkit_training(
    model_dir: Path, text: Path, z: dict[str, int], device: str, compile: bool = False
) -> list[float]:
    """Tokens/s of each logging interval after the first (start-up and the first steps excluded)."""
    from llmkit.config import TrainConfig
    from llmkit.training import Metrics, Trainer

    cfg = TrainConfig(
        model=str(model_dir),
        data=[str(text)],
        output=str(BUILD / "gpu-ft-out"),
        overwrite=True,
        block_size=z["block"],
        batch_size=z["batch"],
        max_steps=z["train_steps"],
        lr=1e-4,
        val_split=0.0,
        log_every=z["log_every"],
        device=device,
        compile=compile,
        save_every=0,
        cache_dir=str(BUILD / "gpu-cache"),
    )
    rates = [e.tokens_per_second for e in Trainer(cfg).events() if isinstance(e, Metrics)]
    return rates[1:]


def compiled_ceiling(model_dir: Path, z: dict[str, int], device: str) -> float:
    """A bare bf16 loop: compiled model, fused AdamW, random tokens. Tokens/s after warm-up."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = torch.compile(model)
    batch = torch.randint(0, model.config.vocab_size, (z["batch"], z["block"]), device=device)
    steps = max(2, z["train_steps"] // 2)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def one() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = step(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync()
    return steps * z["batch"] * z["block"] / (time.perf_counter() - start)


def decoding(model_dir: Path, z: dict[str, int], device: str) -> dict[str, float]:
    import torch

    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.generation import Generator, Prompt
    from llmkit.models import load

    lm = load(LoadConfig(model=str(model_dir), device=device, dtype="bfloat16"))
    new_tokens = z["new_tokens"]
    tok, model = lm.tokenizer, lm.model
    prompt = "the king and queen of a quiet river sing to her brother by the green hill " * 4
    cfg = GenerateConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=1)
    ours, compiled = Generator(lm, cfg), Generator(lm, replace(cfg, compile=True))

    def plain() -> None:
        ids = tok(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            model.generate(
                **ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                top_k=50,
                pad_token_id=tok.eos_token_id,
            )

    contenders = {
        "plain generate": plain,
        "llmkit": lambda: next(ours.run([Prompt(1, prompt)])),
        "llmkit --compile": lambda: next(compiled.run([Prompt(1, prompt)])),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        fn()
        fn()  # compile, capture graphs
    for _ in range(z["repeats"]):
        for name, fn in contenders.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {k: new_tokens / statistics.median(v) for k, v in times.items()}


def main() -> None:
    import torch

    smoke = "--cpu-smoke" in sys.argv
    if not torch.cuda.is_available() and not smoke:
        print("no CUDA GPU here: bench.gpu skipped (run it on a GPU machine)")
        return
    device, z = ("cpu", SMOKE) if smoke else ("cuda", SIZES)
    name = "CPU smoke run" if smoke else torch.cuda.get_device_name()
    peak = None if smoke else peak_flops(name)
    model_dir = smoke_model() if smoke else gpt2_small()
    from transformers import AutoModelForCausalLM

    fpt = flops_per_token(AutoModelForCausalLM.from_pretrained(model_dir), z["block"])
    text = training_text(BUILD / ("gpu-smoke-data" if smoke else "gpu-data"), z["text_bytes"])
    rates = llmkit_training(model_dir, text, z, device)
    train_rate = statistics.median(rates)
    compiled_rates = llmkit_training(model_dir, text, z, device, compile=True)
    compiled_rate = statistics.median(compiled_rates)
    ceiling = compiled_ceiling(model_dir, z, device)

    def mfu(rate: float) -> str:
        return f"{rate * fpt / peak:.1%}" if peak else "? (unknown peak)"

    print(
        f"{name}; {fpt / 1e9:.2f} GFLOP per token; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s"
    )
    print(
        table(
            [
                (f"training (batch {z['batch']} x {z['block']}, bf16)", "tokens/s", "MFU"),
                ("llmkit finetune", f"{train_rate:,.0f}", mfu(train_rate)),
                ("llmkit finetune --compile", f"{compiled_rate:,.0f}", mfu(compiled_rate)),
                ("bare compiled loop", f"{ceiling:,.0f}", mfu(ceiling)),
            ]
        )
    )
    decode = decoding(model_dir, z, device)
    base = decode["plain generate"]
    print(
        table(
            [("decode, batch 1, bf16", "tokens/s", "vs plain")]
            + [(k, f"{v:.1f}", f"{v / base:.2f}x") for k, v in decode.items()]
        )
    )
    if smoke:
        return
    save(
        "gpu",
        {
            "gpu": name,
            "peak_bf16_flops": peak,
            "flops_per_token": fpt,
            "train_tokens_per_s": rates,
            "train_mfu": train_rate * fpt / peak if peak else None,
            "train_compiled_tokens_per_s": compiled_rates,
            "train_compiled_mfu": compiled_rate * fpt / peak if peak else None,
            "compiled_ceiling_tokens_per_s": ceiling,
            "compiled_ceiling_mfu": ceiling * fpt / peak if peak else None,
            "decode_tokens_per_s": decode,
        },
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
