"""Fine-tuning (or training from scratch) with an accelerate loop of our own.

One module per part of a run: `setup` (accelerator, precision, optimizers, what a resume takes over),
`model` (the model and tokenizer trained), `loop` (the `Trainer` and its steps), `evaluate` (validation
loss, samples), `save` (OUT at the end), `signals` (Ctrl-C and SIGTERM), `events` (what `run` yields).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from llmkit.config import TrainConfig
from llmkit.training.events import (
    Event,
    Finished,
    Interrupted,
    Metrics,
    Notice,
    Plan,
    SampleText,
    TrainingError,
)
from llmkit.training.loop import Trainer
from llmkit.training.setup import optimizers as _optimizers  # tests/test_train_options.py reaches in

__all__ = [
    "Event",
    "Finished",
    "Interrupted",
    "Metrics",
    "Notice",
    "Plan",
    "SampleText",
    "Trainer",
    "TrainingError",
    "_optimizers",
    "run",
]


def run(cfg: TrainConfig, on_tokenize: Callable[[int, int], None] | None = None) -> Iterator[Event]:
    """Train; yields a Plan, Metrics per log/eval, SampleText, and Finished (main process only)."""
    return Trainer(cfg, on_tokenize).events()
