"""Where one batch-1 decoding step's time goes, tier by tier: measured before building (issue 19).

For GPT-2 small's shape it times, in one process, alternated rounds:
- the step's weight products alone (every Linear of the 12 blocks and the LM head, one row in), with
  each kernel torch offers for that tier: float32 `F.linear` (and with the weight stored transposed),
  bf16 and f16 `F.linear`, fbgemm's dynamic int8 (what `--quantize int8` runs), weight-only int8
  (`_weight_int8pack_mm`) and weight-only int4 in groups of 32 (`_weight_int4pack_mm_for_cpu`);
- the model's whole forward step with a KV cache (float32, bf16), so the difference is what runs
  between the products (norms, attention, Python between modules);
- llmkit's own `generate` per token (float32, defaults, int8) for the loop's share.

The products alone are the ceiling a leaner loop could reach with today's kernels.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

from bench.common import describe_machine, gpt2_small, machine, save, table

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
ROUNDS = 5
NEW_TOKENS = 64


def seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def products() -> dict[str, Callable[[], Any]]:
    import torch
    from torch.nn.functional import linear

    torch.manual_seed(0)
    weights = [torch.randn(o, i) for o, i in SHAPES]
    x = {
        dt: {n: torch.randn(1, n, dtype=dt) for n in (768, 3072)}
        for dt in (torch.float32, torch.bfloat16, torch.float16)
    }
    f32, bf16, f16 = x[torch.float32], x[torch.bfloat16], x[torch.float16]
    transposed = [w.t().contiguous() for w in weights]
    as_bf16 = [w.bfloat16() for w in weights]
    as_f16 = [w.half() for w in weights]
    int8 = []
    for w in weights:
        scale = w.abs().amax(1) / 127
        int8.append((torch.round(w / scale[:, None]).to(torch.int8), scale.bfloat16()))
    int4 = []
    for w in weights:
        out, inp = w.shape
        padded = torch.nn.functional.pad(w, (0, 0, 0, -out % 16))  # the kernel wants N % 16 == 0
        groups = padded.reshape(padded.shape[0], inp // 32, 32)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-6)
        q = (
            torch.clamp(torch.round((groups - low) / scale), 0, 15)
            .to(torch.int32)
            .reshape(padded.shape[0], inp)
        )
        zeros = low + scale * 8
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([scale.squeeze(-1).t(), zeros.squeeze(-1).t()], -1).bfloat16().contiguous()
        int4.append((packed, sz, inp))
    linears = torch.nn.Sequential(*(torch.nn.Linear(i, o, bias=False) for o, i in SHAPES))
    for layer, w in zip(linears, weights, strict=True):
        layer.weight.data = w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(linears, {torch.nn.Linear}, dtype=torch.qint8)
    return {
        "products float32 F.linear": lambda: [linear(f32[w.shape[1]], w) for w in weights],
        "products float32, weight transposed": lambda: [f32[w.shape[0]] @ w for w in transposed],
        "products bf16 F.linear": lambda: [linear(bf16[w.shape[1]], w) for w in as_bf16],
        "products f16 F.linear": lambda: [linear(f16[w.shape[1]], w) for w in as_f16],
        "products dynamic int8 (fbgemm)": lambda: [m(f32[m.in_features]) for m in dynamic],
        "products weight-only int8, bf16 in": lambda: [
            torch._weight_int8pack_mm(bf16[q.shape[1]], q, s) for q, s in int8
        ],
        "products weight-only int4 g32, bf16 in": lambda: [
            torch._weight_int4pack_mm_for_cpu(bf16[i], p, 32, sz) for p, sz, i in int4
        ],
    }


def forward_steps() -> dict[str, Callable[[], Any]]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = GPT2LMHeadModel(GPT2Config()).to(dtype).eval()
        prompt = model(torch.tensor([[1] * 16]), use_cache=True)
        cache, token = prompt.past_key_values, torch.tensor([[5]])
        steps[f"model forward step {str(dtype).removeprefix('torch.')}"] = (
            lambda model=model, cache=cache, token=token: model(token, past_key_values=cache, use_cache=True)
        )
    return steps


def generate_steps() -> dict[str, Callable[[], Any]]:
    from llmkit.config import GenerateConfig, LoadConfig
    from llmkit.generation import Generator, Prompt
    from llmkit.models import load

    path = str(gpt2_small())
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, greedy=True)
    steps = {}
    for name, load_cfg in {
        "llmkit generate float32": LoadConfig(model=path, dtype="float32"),
        "llmkit generate defaults": LoadConfig(model=path),
        "llmkit generate --quantize f16": LoadConfig(model=path, quantize="f16"),
        "llmkit generate --quantize int8": LoadConfig(model=path, quantize="int8"),
        "llmkit generate --quantize int4": LoadConfig(model=path, quantize="int4"),
    }.items():
        gen = Generator(load(load_cfg), cfg)
        # Per token: the run's time over its tokens (the 2-token prompt's forward is noise here).
        steps[name] = lambda gen=gen: next(gen.run([Prompt(1, "the king")]))
    return steps


def main() -> None:
    import torch

    print(describe_machine())
    contenders = {**products(), **forward_steps(), **generate_steps()}
    per_token = {name: (NEW_TOKENS if name.startswith("llmkit") else 1) for name in contenders}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up
        for _ in range(ROUNDS):
            for name, fn in contenders.items():
                times[name].append(seconds(fn) / per_token[name])
    ms = {name: min(t) * 1e3 for name, t in times.items()}
    print(f"threads: {torch.get_num_threads()}; best of {ROUNDS} alternated rounds, ms per token")
    print(
        table(
            [("", "ms/token", "tokens/s if only this ran")]
            + [(k, f"{v:.2f}", f"{1e3 / v:.1f}") for k, v in ms.items()]
        )
    )
    save("decode_step", {"machine": machine(), "rounds": ROUNDS, "ms_per_token": ms, "runs_s": times})


if __name__ == "__main__":
    main()
