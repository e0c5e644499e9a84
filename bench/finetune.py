"""Fine-tuning throughput: llmkit's training loop against a plain HF `Trainer` on `run_clm`-style data.

Both start from the same saved weights, train on the same text (tinyshakespeare, last 10% held out)
with the same block size, batch, learning-rate schedule, weight decay, clipping and precision (fp32 on
this CPU), in this one process, alternating. Throughput is measured from the end of the first
optimizer step to the end of the last (start-up and the first step's allocations excluded), from
each loop's own step boundaries. Both final models are then scored by one evaluation function on the
held-out text: at equal tokens the val losses should agree within seed noise.

"llmkit (defaults)" rows run llmkit at its own defaults (`--mixed-precision auto`: bf16 autocast
where the CPU computes bf16 natively, fp32 elsewhere) against the Trainer at *its* defaults (fp32):
target >= 1.2x on such a CPU, parity elsewhere, with the same val loss within noise.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import BUILD, CORPUS, describe_machine, gpt2_small, save, table

RUNS: dict[str, dict[str, Any]] = {
    # block size, batch, optimizer steps, learning rate, steps between timestamps, repeats
    # --compile: BENCH_COMPILE=1 (it measured 0.93-1.11x here and costs a minute or two per run).
    "tiny": {
        "block": 128,
        "batch": 8,
        "steps": 150,
        "lr": 1e-3,
        "log": 10,
        "repeats": 3,
        "compile": os.environ.get("BENCH_COMPILE") == "1",
    },
    # --compile measured no faster here (0.98x: big matmuls dominate) and costs 2+ min: not repeated.
    "gpt2-small": {
        "block": 256,
        "batch": 4,
        "steps": 10,
        "lr": 1e-4,
        "log": 2,
        "repeats": 1,
        "compile": False,
    },
}
WARMUP = 0.1


def tiny_model(path: Path = BUILD / "ft-tiny") -> Path:
    """The built-in model's shape (4 layers × 256, context 256, vocab 2048), random weights."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.bpe import train_bpe

    tokenizer = train_bpe([CORPUS.read_text(encoding="utf-8")], vocab_size=2048)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def split_corpus(where: Path = BUILD / "ft-data") -> tuple[Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    text = CORPUS.read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * 0.9)) + 2
    train, val = where / "train.txt", where / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")
    return train, val


def step_rate(stamps: dict[int, float], spec: dict[str, Any]) -> float:
    """Tokens/s from the end of the first timed step (`log`) to the end of the last one."""
    first, last = spec["log"], spec["steps"]
    return spec["block"] * spec["batch"] * (last - first) / (stamps[last] - stamps[first])


def run_llmkit(
    model: Path, train: Path, out: Path, spec: dict[str, Any], compile: bool = False, precision: str = "no"
) -> tuple[float, Path]:
    from llmkit.config import TrainConfig
    from llmkit.training import Metrics, Trainer

    cfg = TrainConfig(
        model=str(model),
        data=[str(train)],
        output=str(out),
        overwrite=True,
        block_size=spec["block"],
        batch_size=spec["batch"],
        max_steps=spec["steps"],
        lr=spec["lr"],
        warmup_steps=int(spec["steps"] * WARMUP),
        val_split=0.0,
        log_every=spec["log"],  # llmkit's default is 10
        save_every=0,
        mixed_precision=precision,
        compile=compile,
        cache_dir=str(BUILD / "ft-cache"),
    )
    stamps: dict[int, float] = {}
    for event in Trainer(cfg).events():
        if isinstance(event, Metrics):
            stamps[event.step] = time.perf_counter()
    return step_rate(stamps, spec), out


def run_hf(model: Path, train: Path, out: Path, spec: dict[str, Any]) -> tuple[float, Path]:
    """What `run_clm.py` does: `datasets` text loader, tokenize with `map`, `group_texts`, `Trainer`."""
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    block = spec["block"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    raw = load_dataset(
        "text", data_files={"train": str(train)}, keep_linebreaks=True, cache_dir=str(BUILD / "ft-datasets")
    )
    tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        joined = {k: list(itertools.chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // block * block
        result = {k: [t[i : i + block] for i in range(0, total, block)] for k, t in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    blocks = tokenized.map(group_texts, batched=True)
    stamps: dict[int, float] = {}

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=int(spec["steps"] * WARMUP),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=spec["steps"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=args,
        train_dataset=blocks["train"],
        data_collator=default_data_collator,
        callbacks=[Stamp()],
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    return step_rate(stamps, spec), out / "final"


def val_loss(model_dir: Path, tokenizer_dir: Path, val: Path, block: int) -> float:
    """Mean next-token loss over the held-out text's non-overlapping blocks: one function for both."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(val.read_text(encoding="utf-8"))["input_ids"]
    usable = len(ids) // block * block
    rows = torch.tensor(ids[:usable]).view(-1, block)
    with torch.inference_mode():
        losses = [float(model(input_ids=r[None], labels=r[None]).loss) for r in rows]
    return statistics.fmean(losses)


def main() -> None:
    import torch

    torch.set_num_threads(torch.get_num_threads())
    print(describe_machine())
    train, val = split_corpus()
    results: dict[str, Any] = {}
    rows = [("model", "tool", "tokens/s (median)", "spread", "val loss", "ratio")]
    for name, spec in RUNS.items():
        model = tiny_model() if name == "tiny" else gpt2_small()
        tools: dict[str, Any] = {
            "hf-trainer": run_hf,
            "llmkit": run_llmkit,
            "llmkit (defaults)": lambda *a: run_llmkit(*a, precision="auto"),
        }
        if spec["compile"]:
            tools["llmkit --compile"] = lambda *a: run_llmkit(*a, compile=True)
        rates: dict[str, list[float]] = {t: [] for t in tools}
        losses: dict[str, list[float]] = {t: [] for t in tools}
        for _ in range(spec["repeats"]):
            for tool, fn in tools.items():
                out = BUILD / f"ft-out-{name}-{tool.replace(' --', '-').replace(' ', '')}"
                rate, final = fn(model, train, out, spec)
                rates[tool].append(rate)
                if name == "tiny":
                    losses[tool].append(val_loss(final, model, val, spec["block"]))
        med = {t: statistics.median(r) for t, r in rates.items()}
        ratio = med["llmkit"] / med["hf-trainer"]
        ratios = {t: med[t] / med["hf-trainer"] for t in med}
        for tool in rates:
            loss = f"{statistics.fmean(losses[tool]):.4f}" if losses[tool] else "-"
            spread = f"{min(rates[tool]):.0f}–{max(rates[tool]):.0f}"
            rows.append((name, tool, f"{med[tool]:.0f}", spread, loss, f"{ratios[tool]:.3f}"))
        results[name] = {
            **spec,
            "tokens": spec["steps"] * spec["block"] * spec["batch"],
            "tokens_per_s": rates,
            "median": med,
            "ratio": ratio,
            "ratios": ratios,
            "val_loss": losses,
        }
    print(table(rows))
    print("ratio: llmkit tokens/s ÷ HF Trainer tokens/s (target >= 1.2); val loss on the held-out 10%")
    results["val_loss_gap_nats"] = {
        k: abs(statistics.fmean(v["val_loss"]["llmkit"]) - statistics.fmean(v["val_loss"]["hf-trainer"]))
        for k, v in results.items()
        if isinstance(v, dict) and v.get("val_loss", {}).get("llmkit")
    }
    assert all(math.isfinite(x) for x in results["val_loss_gap_nats"].values())
    save("finetune", results)


if __name__ == "__main__":
    main()
