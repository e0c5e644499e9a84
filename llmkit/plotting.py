"""Training curves from metrics.jsonl as a PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmkit.errors import InputError

METRICS = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise InputError(f"no {METRICS} in {run_dir}", "pass the -o directory of a llmkit finetune run")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise InputError(f"{path}:{number}: not JSON", "was the file edited or truncated?") from None
    if not rows:
        raise InputError(f"{path} is empty", "the run logged nothing yet")
    return rows


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    loss_ax.plot(steps, [r["loss"] for r in rows if r.get("loss") is not None], label="train loss")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        loss_ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (nats/token)")
    lr_ax = loss_ax.twinx()
    lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="grey", alpha=0.5, label="lr")
    lr_ax.set_ylabel("learning rate")
    handles = loss_ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    loss_ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    loss_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
