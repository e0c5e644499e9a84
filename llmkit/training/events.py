"""What a training run tells its caller: the events `run` yields, and the errors that stop it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError


@dataclass
class Plan:
    documents: int
    """Documents (or prompt/completion records) of the training data: a --val-file's are apart."""
    tokens: int
    invalid_bytes: int
    cache_hits: int
    block_size: int
    train_blocks: int
    val_blocks: int
    steps_per_epoch: int
    total_steps: int
    effective_batch: int
    processes: int
    device: str
    mixed_precision: str
    optimizer: str
    parameters: int
    trainable: int
    """Parameters the optimizer updates: all of them, or the adapters' with --lora."""
    lr: float
    """AdamW's peak learning rate (with Muon: on the parameters outside the blocks' matrices)."""
    warmup_steps: int
    muon_lr: float | None = None
    """Muon's peak learning rate on the blocks' matrices; None when Muon updates nothing."""
    records: int | None = None
    """Prompt/completion data: the records packed (None for text)."""
    val_documents: int | None = None
    """A --val-file's documents (records, for prompt/completion data) and tokens; None without one."""
    val_tokens: int | None = None
    skipped_records: int = 0
    conversations: bool = False
    """The records are conversations (messages), learnt on the assistant turns."""
    padding: float = 0.0
    """Prompt/completion data: the fraction of block positions that are padding."""
    gradient_checkpointing: bool = False
    lora_targets: str | None = None
    """With --lora: the layers adapted, and why those when --lora-targets didn't name them."""


@dataclass
class Metrics:
    """One line of metrics.jsonl."""

    step: int
    epoch: float
    loss: float | None
    lr: float
    tokens: int
    tokens_per_second: float
    val_loss: float | None = None
    val_perplexity: float | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "loss"}


@dataclass
class SampleText:
    step: int
    text: str


@dataclass
class Finished:
    output: Path
    final: Metrics
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Notice:
    """Something the user should know mid-run (a skipped step, a smaller micro-batch)."""

    message: str


class Interrupted(LlmkitError):
    """Training stopped by a signal after saving a checkpoint; the CLI adds how to resume."""

    def __init__(self, step: int, total: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"interrupted at step {step}/{total}; checkpoint saved to {checkpoint}")
        self.exit_code = 128 + signum


class TrainingError(LlmkitError):
    """The run cannot go on (diverged, out of memory at micro-batch 1)."""


Event = Plan | Metrics | SampleText | Notice | Finished
