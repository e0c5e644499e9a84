"""What the run measures on the side: the validation loss, and a sample of text mid-run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.config import TrainConfig

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


def pair_inputs(blocks: Any, rows: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Prompt/completion blocks as model inputs: labels -100 off the completions, and position
    ids from 0 in each record (transformers then keeps each record's attention to itself)."""
    import torch

    ids, labels, positions = (torch.from_numpy(a).to(device) for a in blocks.arrays(rows))
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}


def evaluate(acc: Accelerator, model: Any, val: Any, batch_size: int, pairs: bool) -> float:
    """Mean loss per predicted token over the validation blocks, split across processes."""
    import torch

    mine = list(range(acc.process_index, len(val), acc.num_processes))
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            rows = mine[i : i + batch_size]
            if pairs:  # completion tokens only: the mean over them, weighted by their count
                with acc.autocast():
                    loss = model(**pair_inputs(val, rows, acc.device)).loss
                n = val.targets(rows)
                total += loss.double() * n
                count += n
                continue
            batch = torch.from_numpy(val.batch(rows)).to(acc.device)
            with acc.autocast():
                loss = model(input_ids=batch, labels=batch).loss
            n = batch.numel() - batch.size(0)  # each block predicts all but its first token
            total += loss.double() * n
            count += n
    model.train()
    total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
    return float(total / count)


def sample(acc: Accelerator, model: Any, tokenizer: Any, cfg: TrainConfig) -> str:
    """A short sample from --sample-prompt, without disturbing the training RNG streams."""
    import torch

    from llmkit.config import GenerateConfig
    from llmkit.generation import Generator, Prompt
    from llmkit.models import LoadedModel, ModelSource

    model = acc.unwrap_model(model)
    model.eval()
    try:
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            lm = LoadedModel(
                model,
                tokenizer,
                acc.device,
                next(model.parameters()).dtype,
                ModelSource("training", Path(cfg.output), "training"),
            )
            gen = Generator(
                lm,
                GenerateConfig(max_new_tokens=cfg.sample_tokens, seed=cfg.seed, temperature=0.8, top_k=40),
            )
            return next(gen.run([Prompt(0, cfg.sample_prompt)]))[0].completion
    finally:
        model.train()
