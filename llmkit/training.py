"""Fine-tuning (or training from scratch) with an accelerate loop of our own.

Shape of `run_clm_no_trainer`: Accelerator → data under `main_process_first` → model and optimizer →
`prepare` → loop with `accumulate` → `wait_for_everyone` → the main process saves. The core never
prints: `run` yields events (on the main process only) and the CLI renders them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import checkpoints, rundir
from llmkit.config import TrainConfig
from llmkit.errors import InputError, LlmkitError, ModelError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from accelerate import Accelerator

    from llmkit.data import PreparedData
    from llmkit.models import ModelSource


# -- events ------------------------------------------------------------------------------------------
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
    padding: float = 0.0
    """Prompt/completion data: the fraction of block positions that are padding."""
    gradient_checkpointing: bool = False


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


# -- setup -------------------------------------------------------------------------------------------
def _mixed_precision(cfg: TrainConfig, device_type: str, saved: str | None) -> tuple[str, str | None]:
    """(accelerate's mode, a notice or None). `auto` asks what the device computes natively; a resumed
    run keeps its checkpoint's precision, so exact resume stays exact on a machine that would differ."""
    from llmkit.hardware import auto_mixed_precision

    if cfg.mixed_precision == "fp16" and device_type not in ("cuda", "mps"):
        raise UsageError("--mixed-precision fp16 needs a GPU", "use bf16 or no on the CPU")
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision, None
    picked, why = auto_mixed_precision(device_type)
    if saved is not None and saved != picked:
        return saved, (
            f"mixed precision {saved}, as the checkpoint was trained "
            f"(auto would pick {picked} here: {why}); pass --mixed-precision to change it"
        )
    return picked, None


def _accelerator(cfg: TrainConfig, out: Path, saved_precision: str | None) -> tuple[Accelerator, str | None]:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from llmkit.models import pick_device

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate keeps process-wide singletons; a second run in one process must start clean.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    device = pick_device(cfg.device)
    precision, notice = _mixed_precision(cfg, device.type, saved_precision)
    _check_tracker(cfg.report_to)
    try:
        acc = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=cfg.report_to,
            project_dir=str(out),
        )
    except (ImportError, ValueError) as exc:
        raise UsageError(
            f"cannot set up training: {exc}",
            "check --report-to (its package must be installed) and --mixed-precision",
        ) from None
    return acc, notice


def _check_fsdp(acc: Accelerator, cfg: TrainConfig) -> str | None:
    """Refuse what FSDP can't do; a notice when the accelerate config asks for FSDP and it isn't on."""
    import os

    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        if cfg.lora and cfg.merge:
            raise UsageError(
                "--merge is not supported under FSDP: the adapters would be merged into sharded weights",
                "train without --merge (OUT is then the adapter), and merge it when loading it",
            )
        if cfg.sample_every:
            raise UsageError(
                "--sample-every is not supported under FSDP: every process would have to generate",
                "drop --sample-every, and generate from OUT after training",
            )
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.num_processes > 1:
        # accelerate applies FSDP to GPUs (and other accelerators) only; on the CPU it runs plain data
        # parallel training, in which OUT and checkpoints are saved as without FSDP.
        return f"FSDP is not used on {acc.device.type}: each process holds the whole model"
    return None


def _saved_choices(saved: dict[str, Any]) -> dict[str, str | None]:
    """What a checkpoint's run resolved `auto`/default settings to (older checkpoints didn't record it)."""
    precision = saved.get("mixed_precision")
    if precision is None and saved.get("threads"):
        precision = "no"  # a CPU run from before `auto` could pick bf16 on the CPU
    return {"mixed_precision": precision, "optimizer": saved.get("optimizer", "adamw")}


# GPT-2's residual, embedding and attention dropout: what --dropout sets.
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def _check_tracker(name: str | None) -> None:
    """accelerate drops a tracker whose package is missing without a word: refuse before training."""
    if name is None:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    packages = {"tensorboard": "tensorboard", "comet_ml": "comet-ml", "dvclive": "dvclive"}
    for one in name.split(","):
        one = one.strip()
        if one == "all":
            continue
        if one not in LOGGER_TYPE_TO_CLASS:
            raise UsageError(
                f"unknown --report-to {one!r}", f"use one of: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
            )
        available = getattr(imports, f"is_{one}_available", None)
        if available is not None and not available():
            package = packages.get(one, one)
            extra = " (or: make install EXTRAS=tensorboard)" if one == "tensorboard" else ""
            raise UsageError(
                f"--report-to {one} needs the {package} package, which is not installed",
                f"pip install {package}{extra}",
            )


def _build_model(cfg: TrainConfig) -> tuple[Any, Any, float | None]:
    """(model, tokenizer, the base config's dropout): pretrained weights (with LoRA adapters to train),
    or a fresh model."""
    from llmkit.models import load_weights, resolve

    # gpt2's architecture is transformers' GPT2Config default: training it from scratch with a tokenizer
    # of one's own needs nothing from the hub.
    known_config = (
        cfg.from_scratch and cfg.tokenizer is not None and cfg.model in ("gpt2", "openai-community/gpt2")
    )
    source = None
    if not known_config:
        # From scratch with --tokenizer, a directory holding only config.json (a model shape) will do.
        source = resolve(
            cfg.model,
            offline=cfg.offline,
            allow_pickle=cfg.allow_pickle,
            weights=not cfg.from_scratch,
            tokenizer=cfg.tokenizer is None,
        )
    tokenizer = _tokenizer(cfg, source)
    dropout = {} if cfg.dropout is None else dict.fromkeys(DROPOUT_KEYS, cfg.dropout)
    base_dropout = _config_dropout(source)
    if cfg.from_scratch:
        return _fresh_model(cfg, source, tokenizer, dropout), tokenizer, base_dropout
    assert source is not None
    # An adapter given as the base arrives merged into its own base: a model like any other.
    model = load_weights(source, cfg.model, dtype="float32", allow_pickle=cfg.allow_pickle, **dropout)
    if cfg.lora:
        from llmkit import lora

        model = lora.wrap(model, cfg, base=lora.base_reference(source))
    return model, tokenizer, base_dropout


def _config_dropout(source: ModelSource | None) -> float | None:
    """The dropout the base model's config sets, which a run without --dropout trains with; None when
    its three GPT-2 dropouts differ or it has none. (source None: transformers' GPT2Config.)"""
    if source is None:
        from transformers import GPT2Config

        config = GPT2Config().to_dict()
    else:
        try:
            config = json.loads((source.model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    values = {config.get(key) for key in DROPOUT_KEYS}
    return values.pop() if len(values) == 1 and None not in values else None


def _tokenizer(cfg: TrainConfig, source: ModelSource | None) -> Any:
    from llmkit.models import has_tokenizer, load_tokenizer

    if cfg.tokenizer is not None:
        tok_dir = Path(cfg.tokenizer)
        if not (tok_dir.is_dir() and has_tokenizer(tok_dir)):
            raise ModelError(
                f"{cfg.tokenizer} is not a tokenizer directory",
                "make one with: llmkit train-tokenizer DATA -o DIR",
            )
        tokenizer = load_tokenizer(tok_dir, cfg.tokenizer)
    else:
        assert source is not None
        tokenizer = load_tokenizer(source.tokenizer_dir, cfg.model)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"the tokenizer of {cfg.tokenizer or cfg.model} has no end-of-text token",
            "documents are joined with it; train one with llmkit train-tokenizer",
        )
    return tokenizer


def _fresh_model(
    cfg: TrainConfig, source: ModelSource | None, tokenizer: Any, dropout: dict[str, float]
) -> Any:
    """Random weights in the base model's shape, with the from-scratch overrides, in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if source is None:
        from transformers import GPT2Config

        config = GPT2Config()
    else:
        config = AutoConfig.from_pretrained(source.model_dir, local_files_only=True)
    overrides = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, **dropout}
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if cfg.context is not None:
        config.n_positions = cfg.context
    if config.n_embd % config.n_head:
        raise UsageError(
            f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}",
            "pick --n-embd and --n-head so that heads split the width evenly",
        )
    config.vocab_size = len(tokenizer)
    config.bos_token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    config.eos_token_id = tokenizer.eos_token_id
    # float32 master weights whatever the base's config says (the built-in model's says bfloat16, and
    # transformers would build in it): bf16 speed comes from autocast, not from the parameters.
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _checkpointing(model: Any, enable: bool) -> None:
    """Activation checkpointing on or off, non-reentrant.

    The reentrant variant passes gradients only through inputs that require them, and with --lora the
    frozen embeddings' output doesn't: the adapters would get none. (transformers 5.24 also marks that
    output as requiring grad; this holds without it.) 5.24 has new names; the old ones warn there.
    """
    kwargs = {"use_reentrant": False}
    if not hasattr(model, "activation_checkpointing_enable"):  # older transformers
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
    elif enable:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.activation_checkpointing_disable()


def _optimizers(model: Any, cfg: TrainConfig, device_type: str, name: str) -> list[torch.optim.Optimizer]:
    """AdamW over everything; or Muon over the transformer blocks' matrices and AdamW over the rest.

    Muon orthogonalises 2-D updates, which suits hidden weight matrices only: embeddings (and the head
    tied to them), biases and LayerNorm weights stay on AdamW, as in the modded-nanogpt recipe.
    """
    import torch

    muon, decay, no_decay = [], [], []
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name == "muon" and param.dim() == 2 and _in_block(pname):
            muon.append(param)
        else:
            # Matrices decay; biases and LayerNorm weights (vectors) don't.
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on CUDA only. On the CPU it made optimizer steps ~5x faster for GPT-2 small (0.10 s vs
    # 0.48 s, ~5% of a step), but in the one CI run with it an uninterrupted run differed from resumed
    # ones (never here; an earlier, rarer case without it points at threading, not at fused).
    # foreach is the configuration exact resume has always held with on that machine.
    fused = device_type == "cuda"
    found = [
        torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.peak_lr,
            betas=(0.9, 0.95 if cfg.from_scratch else 0.999),
            fused=fused,
        )
    ]
    if muon:
        found.append(torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
    return found


def _in_block(name: str) -> bool:
    """A parameter of a transformer block (GPT-2: transformer.h.N.…; most others: layers.N.…)."""
    parts = name.split(".")
    return any(
        p in ("h", "layers") and i + 1 < len(parts) and parts[i + 1].isdigit() for i, p in enumerate(parts)
    )


def _cpu_threads(device_type: str) -> int | None:
    """torch's intra-op threads on the CPU: results depend on them, so checkpoints record them."""
    import torch

    return torch.get_num_threads() if device_type == "cpu" else None


def _warmup(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(cfg.warmup_ratio * total_steps)


def _order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: the same on every process."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


# -- the run -----------------------------------------------------------------------------------------
class Interrupted(LlmkitError):
    """Training stopped by a signal after saving a checkpoint; the CLI adds how to resume."""

    def __init__(self, step: int, total: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"interrupted at step {step}/{total}; checkpoint saved to {checkpoint}")
        self.exit_code = 128 + signum


class TrainingError(LlmkitError):
    """The run cannot go on (diverged, out of memory at micro-batch 1)."""


@dataclass
class Notice:
    """Something the user should know mid-run (a skipped step, a smaller micro-batch)."""

    message: str


@dataclass
class LoopState:
    """Everything about the loop that a checkpoint must carry besides accelerate's own state."""

    step: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    running_loss: float = 0.0
    micro_steps: int = 0
    losses: list[float] = field(default_factory=list)
    bad_in_row: int = 0
    skipped: int = 0
    val_loss: float | None = None


OOM_RETRY_STEPS = 3  # only the first steps adapt the micro-batch; later OOMs are real errors


class Trainer:
    """One training run. `events()` drives it; state lives here so evaluation and saving can share it."""

    def __init__(self, cfg: TrainConfig, on_tokenize: Callable[[int, int], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.on_tokenize = on_tokenize
        self.stop_signal: int | None = None
        self.final: Metrics | None = None  # the last metrics record: what the saved model reports

    def events(self) -> Iterator[Event]:
        saved, resume_from = self._find_checkpoint()
        notices = self._set_up_accelerator(saved)
        model, block_size = self._set_up_model()
        self._set_up_data(block_size)
        changes = self._check_resume(saved) if saved is not None else []
        self._set_up_optimization(model)
        if saved is not None and resume_from is not None:
            self._restore(saved, resume_from)
            notices += self._resume_notices(saved, resume_from, changes)
        self.plan = self._make_plan(block_size)
        if self.cfg.report_to:
            self.acc.init_trackers(
                "llmkit",
                config={k: v for k, v in asdict(self.cfg).items() if isinstance(v, int | float | str | bool)},
            )
        main = self.acc.is_main_process
        metrics = rundir.MetricsLog.open(self.out) if main else None
        if main:
            yield self.plan
            for notice in notices:
                yield Notice(notice)
        with _signals(self):
            yield from self._loop(metrics, main)
        yield from self._finish(metrics, main)

    # -- setting up ----------------------------------------------------------------------------------
    def _find_checkpoint(self) -> tuple[dict[str, Any] | None, Path | None]:
        """The checkpoint a resumed run starts from, and its saved state (None, None for a new run)."""
        cfg = self.cfg
        resume_from = checkpoints.locate(self.out, cfg.resume_from) if cfg.resuming else None
        saved = checkpoints.load_state(resume_from) if resume_from is not None else None
        return saved, resume_from

    def _set_up_accelerator(self, saved: dict[str, Any] | None) -> list[str]:
        """The Accelerator, the optimizer's name, OUT claimed, seeds set; returns notices for the user."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.chosen = _saved_choices(saved) if saved is not None else {}
        acc, precision_notice = _accelerator(cfg, self.out, self.chosen.get("mixed_precision"))
        self.acc = acc
        fsdp_notice = _check_fsdp(acc, cfg)
        # A resumed run keeps the optimizer its checkpoint was trained with unless told otherwise.
        self.optimizer_name = cfg.optimizer or self.chosen.get("optimizer") or cfg.optimizer_name
        if acc.is_main_process:
            if saved is None:
                rundir.claim(self.out, overwrite=cfg.overwrite)
            checkpoints.remove_stale(self.out)
        set_seed(cfg.seed)
        return [n for n in (precision_notice, fsdp_notice) if n is not None]

    def _set_up_model(self) -> tuple[Any, int]:
        """The model and tokenizer, and the block size (checked against the model's context)."""
        from llmkit.models import context_length

        cfg = self.cfg
        model, self.tokenizer, self.base_dropout = _build_model(cfg)
        context = context_length(model.config)
        block_size = cfg.block_size or min(context, 1024)
        if block_size > context:
            raise UsageError(
                f"--block-size {block_size} exceeds the model's context of {context}",
                f"use at most {context}",
            )
        return model, block_size

    def _set_up_data(self, block_size: int) -> None:
        """Tokenized, blocked data (the main process first: it fills the cache) and the run's length."""
        cfg, acc = self.cfg, self.acc
        with acc.main_process_first():
            self.data = self._data(self.tokenizer, block_size, acc.is_main_process)
        world = acc.num_processes
        self.state = LoopState(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
        global_batch = cfg.batch_size * cfg.grad_accum * world
        steps_per_epoch = len(self.data.train) // global_batch
        if steps_per_epoch == 0:
            raise InputError(
                f"{len(self.data.train)} training blocks are fewer than one step's "
                f"{global_batch} ({cfg.batch_size} per batch × {cfg.grad_accum} accumulation × "
                f"{world} processes)",
                "lower --batch-size, --grad-accum or --block-size, or add more text",
            )
        total = cfg.max_steps or math.ceil((cfg.epochs or 1.0) * steps_per_epoch)
        self.total, self.steps_per_epoch, self.global_batch = total, steps_per_epoch, global_batch

    def _check_resume(self, saved: dict[str, Any]) -> list[str]:
        """Refuse a resume that would be a different run; notices for the changes it tolerates."""
        from llmkit import resume

        cfg, chosen = self.cfg, self.chosen
        # Compare what each run resolved `auto` and defaults to, not the words it was given.
        current = {**asdict(cfg), "optimizer": self.optimizer_name, **self._used(asdict(cfg))}
        if chosen.get("mixed_precision"):
            current["mixed_precision"] = self.acc.mixed_precision
        config = {**saved["config"], **{k: v for k, v in chosen.items() if v}}
        before = {**saved, "config": {**config, **self._used(saved["config"])}}
        tolerated = resume.check(before, current, self.data.fingerprint, self.acc.num_processes, cfg.force)
        return [f"changed since the checkpoint: {line}" for line in tolerated]

    def _used(self, config: dict[str, Any]) -> dict[str, Any]:
        """The learning rate and dropout a run with this config trains with, its defaults filled in
        (the base model is the same on both sides of a resume, or the resume is refused anyway)."""
        lr, dropout = config.get("lr"), config.get("dropout")
        if lr is None:
            lr = TrainConfig.default_lr(bool(config.get("lora")), bool(config.get("from_scratch")))
        return {"lr": lr, "dropout": self.base_dropout if dropout is None else dropout}

    def _set_up_optimization(self, model: Any) -> None:
        """Checkpointing and compiling as asked, optimizers and schedulers, all prepared by accelerate."""
        from transformers import get_scheduler

        cfg, acc = self.cfg, self.acc
        if cfg.gradient_checkpointing:
            _checkpointing(model, enable=True)
            model.config.use_cache = False
        if cfg.compile:
            # In place, so parameter names in checkpoints and OUT stay as without --compile (a wrapper
            # would prefix them) and a run resumes either way. Whole model, not block by block: each
            # block reads its own layer index, so dynamo would compile one graph per block and, past
            # its recompile limit (8), silently leave the rest eager.
            model.compile()
        optimizers = _optimizers(model, cfg, acc.device.type, self.optimizer_name)
        self.warmup = _warmup(cfg, self.total)
        schedule = {"constant": "constant_with_warmup"}.get(cfg.lr_schedule, cfg.lr_schedule)
        schedulers = [
            get_scheduler(schedule, o, num_warmup_steps=self.warmup, num_training_steps=self.total)
            for o in optimizers
        ]
        # Schedulers stay unprepared: accelerate would step them once per process, and `total` already
        # counts global optimizer steps. They are registered so checkpoints carry them.
        model, *optimizers = acc.prepare(model, *optimizers)
        for scheduler in schedulers:
            acc.register_for_checkpointing(scheduler)
        self.model, self.optimizers, self.schedulers = model, optimizers, schedulers

    def _restore(self, saved: dict[str, Any], resume_from: Path) -> None:
        """accelerate's state and the loop's from the checkpoint; metrics logged after it dropped."""
        acc = self.acc
        acc.load_state(str(resume_from))
        restored = {k: v for k, v in saved["loop"].items() if k in LoopState.__dataclass_fields__}
        self.state = LoopState(**restored)
        acc.gradient_accumulation_steps = self.state.grad_accum
        last = _truncate_metrics(self.out, self.state.step) if acc.is_main_process else None
        if last is not None:
            self.final = Metrics(**{k: v for k, v in last.items() if k in Metrics.__dataclass_fields__})

    def _resume_notices(self, saved: dict[str, Any], resume_from: Path, changes: list[str]) -> list[str]:
        notices = [f"resuming from {resume_from} at step {self.state.step}/{self.total}", *changes]
        before, now = saved.get("threads"), _cpu_threads(self.acc.device.type)
        if before and now and before != now:
            notices.append(
                f"the checkpoint was written with {before} CPU threads, this run has {now}: sums "
                "split differently, so it won't match an uninterrupted run bit for bit "
                f"(OMP_NUM_THREADS={before} would)"
            )
        return notices

    def _make_plan(self, block_size: int) -> Plan:
        acc, data = self.acc, self.data
        stats = _data_stats(data)
        module = acc.unwrap_model(self.model)
        return Plan(
            stats["documents"],
            stats["tokens"],
            stats["invalid_bytes"],
            stats["cache_hits"],
            block_size,
            len(data.train),
            len(data.val) if data.val is not None else 0,
            self.steps_per_epoch,
            self.total,
            self.global_batch,
            acc.num_processes,
            str(acc.device),
            acc.mixed_precision,
            self.optimizer_name,
            sum(p.numel() for p in module.parameters()),
            sum(p.numel() for p in module.parameters() if p.requires_grad),
            self.cfg.peak_lr,
            self.warmup,
            muon_lr=self.cfg.muon_lr if len(self.optimizers) > 1 else None,
            records=stats.get("records"),
            skipped_records=stats.get("skipped_records", 0),
            padding=stats.get("padding", 0.0),
            gradient_checkpointing=bool(self.cfg.gradient_checkpointing),
            val_documents=stats.get("val_records", stats.get("val_documents")),
            val_tokens=stats.get("val_tokens"),
        )

    def _finish(self, metrics: rundir.MetricsLog | None, main: bool) -> Iterator[Event]:
        """Every process waits for the others, the whole model is gathered, the main process saves OUT."""
        acc = self.acc
        acc.wait_for_everyone()
        if self.cfg.report_to:
            acc.end_training()
        whole = self._gather_weights()  # under FSDP a collective: every process takes part
        if main:
            assert metrics is not None and self.final is not None
            metrics.close()
            seconds = time.perf_counter() - self.started
            self._save(self.final, seconds, whole)
            yield Finished(self.out, self.final, self.state.losses, seconds)
        acc.wait_for_everyone()
        self.data.close()

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self, metrics: rundir.MetricsLog | None, main: bool) -> Iterator[Event]:
        import torch

        cfg, acc, state, data = self.cfg, self.acc, self.state, self.data
        model, optimizers, schedulers = self.model, self.optimizers, self.schedulers
        self.started = last_time = time.perf_counter()
        last_tokens = state.step * self.global_batch * data.block_size
        running = torch.tensor(state.running_loss, device=acc.device)
        model.train()
        order, order_epoch = None, -1
        while state.step < self.total:
            epoch = state.step // self.steps_per_epoch
            if epoch != order_epoch:
                order, order_epoch = _order(len(data.train), cfg.seed, epoch), epoch
            step_loss = yield from self._step(order, (state.step % self.steps_per_epoch) * self.global_batch)
            norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            # One host synchronisation per optimizer step: a non-finite gradient must not reach the weights.
            if acc.mixed_precision != "fp16" and not math.isfinite(float(norm)):
                state.skipped += 1
                state.bad_in_row += 1
                if main:
                    yield Notice(
                        f"step {state.step + 1}: non-finite loss or gradient; update skipped "
                        f"({state.bad_in_row} in a row)"
                    )
                if state.bad_in_row >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{state.bad_in_row} non-finite steps in a row at step {state.step + 1}: "
                        "the run diverged",
                        "lower --lr, raise --warmup-steps, or use bf16/fp32; "
                        "the last good checkpoint is in " + str(checkpoints.root(self.out)),
                    )
            else:
                for optimizer in optimizers:
                    optimizer.step()
                state.bad_in_row = 0
                running += step_loss  # skipped steps stay out of the logged loss
                state.micro_steps += state.grad_accum
            for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            step = state.step
            log_now = step % cfg.log_every == 0 or step == self.total
            eval_now = step == self.total or (cfg.eval_every and step % cfg.eval_every == 0)
            if log_now or eval_now:
                # The other host synchronisation: only at log and eval steps.
                mean_loss = (
                    float(acc.reduce(running, reduction="mean")) / state.micro_steps
                    if state.micro_steps
                    else None
                )
                running.zero_()
                state.micro_steps = 0
                now = time.perf_counter()
                tokens = step * self.global_batch * data.block_size
                record = Metrics(
                    step,
                    round(step / self.steps_per_epoch, 4),
                    mean_loss,
                    schedulers[0].get_last_lr()[0],
                    tokens,
                    round((tokens - last_tokens) / max(now - last_time, 1e-9), 1),
                )
                last_time, last_tokens = now, tokens
                if mean_loss is not None:
                    state.losses.append(mean_loss)
                if eval_now and data.val is not None:
                    record.val_loss = state.val_loss = self.evaluate()
                    record.val_perplexity = math.exp(min(record.val_loss, 700))
                if cfg.report_to:
                    acc.log({k: v for k, v in record.record().items() if k != "step"}, step=step)
                self.final = record
                if main and metrics is not None:
                    metrics.write(record.record())
                    yield record
                if main and cfg.sample_every and (step % cfg.sample_every == 0 or step == self.total):
                    yield SampleText(step, self.sample())
            stop = self._stop_requested()
            epoch_end = step % self.steps_per_epoch == 0
            if stop or epoch_end or (cfg.save_every and step % cfg.save_every == 0):
                state.running_loss = float(running)
                path = self._checkpoint()
                if stop and step < self.total:
                    raise Interrupted(step, self.total, path, self.stop_signal or 2)

    def _step(self, order: np.ndarray, base: int) -> Iterator[Event]:
        """Forward and backward for one optimizer step's micro-batches; returns their summed loss.

        In the first steps an out-of-memory error halves the micro-batch and doubles accumulation
        (the same effective batch) and the step starts over.
        """
        import torch

        acc, state, world, rank = self.acc, self.state, self.acc.num_processes, self.acc.process_index
        while True:
            acc.step = 0  # accumulation counts from the start of every optimizer step
            total = torch.zeros((), device=acc.device)
            # Prompt/completion data: every learnt token of the whole step (all micro-batches, all
            # processes) weighs the same, so each micro-batch's summed loss is divided by their count.
            learnt = self.data.train.targets(order[base : base + self.global_batch]) if self.pairs else 0
            try:
                for k in range(state.grad_accum):
                    start = base + (k * world + rank) * state.batch_size
                    rows = order[start : start + state.batch_size]
                    if self.pairs:
                        batch = self._pair_batch(self.data.train, rows)
                    else:
                        batch = torch.from_numpy(self.data.train.batch(rows)).to(acc.device)
                    with acc.accumulate(self.model), acc.autocast():
                        loss = self._pair_loss(batch, learnt) if self.pairs else self._loss(batch)
                        total += loss.detach()
                        acc.backward(loss)
                return total
            except torch.OutOfMemoryError:
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                if state.step >= OOM_RETRY_STEPS or world > 1:
                    raise TrainingError(
                        f"out of memory at step {state.step + 1} with micro-batch {state.batch_size}",
                        "lower --batch-size (raise --grad-accum to keep the effective batch), "
                        "use --gradient-checkpointing, or a smaller --block-size",
                    ) from None
                if state.batch_size == 1 or state.batch_size % 2:
                    raise TrainingError(
                        f"out of memory with micro-batch {state.batch_size}",
                        "use --gradient-checkpointing or a smaller --block-size",
                    ) from None
                _free_memory(acc.device)
                state.batch_size //= 2
                state.grad_accum *= 2
                acc.gradient_accumulation_steps = state.grad_accum
                yield Notice(
                    f"out of memory: retrying with micro-batch {state.batch_size} and accumulation "
                    f"{state.grad_accum} (same effective batch of {self.global_batch})"
                )

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    @property
    def pairs(self) -> bool:
        return self.data.pairs is not None

    def _pair_batch(self, blocks: Any, rows: Any) -> dict[str, torch.Tensor]:
        """Prompt/completion blocks as model inputs: labels -100 off the completions, and position
        ids from 0 in each record (transformers then keeps each record's attention to itself)."""
        import torch

        ids, labels, positions = (torch.from_numpy(a).to(self.acc.device) for a in blocks.arrays(rows))
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}

    def _pair_loss(self, batch: dict[str, torch.Tensor], learnt: int) -> torch.Tensor:
        """The model's summed loss over this micro-batch's completion tokens, scaled so that after
        accelerate divides by the accumulation steps and DDP averages over processes, the step's
        gradient is the mean over its `learnt` tokens; logged, it averages like text mode's loss."""
        share = max(learnt, 1) / (self.state.grad_accum * self.acc.num_processes)
        return self.model(**batch, num_items_in_batch=share).loss

    def _stop_requested(self) -> bool:
        stop = self.stop_signal is not None
        if self.acc.num_processes > 1:
            # Every rank must agree, or one would wait forever in the next collective.
            if stop:
                self.acc.set_trigger()
            stop = self.acc.check_trigger()
            if stop and self.stop_signal is None:
                self.stop_signal = 2
        return stop

    def _checkpoint(self) -> Path:
        cfg, state = self.cfg, self.state
        payload = {
            "step": state.step,
            "epoch": state.step / self.steps_per_epoch,
            "total_steps": self.total,
            "val_loss": state.val_loss,
            "fingerprint": self.data.fingerprint,
            "processes": self.acc.num_processes,
            "threads": _cpu_threads(self.acc.device.type),
            "mixed_precision": self.acc.mixed_precision,
            "optimizer": self.optimizer_name,
            "config": asdict(cfg),
            "loop": asdict(state),
        }
        return checkpoints.save(self.acc, self.out, state.step, payload, cfg.keep, cfg.keep_best)

    def _data(self, tokenizer: Any, block_size: int, main: bool) -> PreparedData:
        from llmkit.data import prepare

        cfg = self.cfg
        return prepare(
            cfg.data,
            tokenizer,
            block_size=block_size,
            val_file=cfg.val_file,
            val_split=cfg.val_split,
            seed=cfg.seed,
            text_field=cfg.text_field,
            glob=cfg.glob,
            errors=cfg.errors,
            num_proc=cfg.num_proc,
            cache_dir=cfg.cache_dir,
            no_cache=cfg.no_cache,
            prompt_field=cfg.prompt_field,
            completion_field=cfg.completion_field,
            long_records=cfg.long_records,
            on_progress=self.on_tokenize if main else None,
        )

    def evaluate(self) -> float:
        """Mean loss per predicted token over the validation blocks, split across processes."""
        import torch

        acc, model, val = self.acc, self.model, self.data.val
        assert val is not None
        mine = list(range(acc.process_index, len(val), acc.num_processes))
        total = torch.zeros((), device=acc.device, dtype=torch.float64)
        count = torch.zeros((), device=acc.device, dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            for i in range(0, len(mine), self.cfg.batch_size):
                rows = mine[i : i + self.cfg.batch_size]
                if self.pairs:  # completion tokens only: the mean over them, weighted by their count
                    with acc.autocast():
                        loss = model(**self._pair_batch(val, rows)).loss
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

    def sample(self) -> str:
        """A short sample from --sample-prompt, without disturbing the training RNG streams."""
        import torch

        from llmkit.config import GenerateConfig
        from llmkit.generation import Generator, Prompt
        from llmkit.models import LoadedModel, ModelSource

        model = self.acc.unwrap_model(self.model)
        model.eval()
        try:
            with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
                lm = LoadedModel(
                    model,
                    self.tokenizer,
                    self.acc.device,
                    next(model.parameters()).dtype,
                    ModelSource("training", self.out, "training"),
                )
                gen = Generator(
                    lm,
                    GenerateConfig(
                        max_new_tokens=self.cfg.sample_tokens, seed=self.cfg.seed, temperature=0.8, top_k=40
                    ),
                )
                return next(gen.run([Prompt(0, self.cfg.sample_prompt)]))[0].completion
        finally:
            model.train()

    def _gather_weights(self) -> dict[str, Any] | None:
        """Under FSDP each process holds a shard of every weight: the whole state dict, gathered the
        accelerate way (the main process gets it). None otherwise: the main process's model is whole."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.FSDP:
            return None
        return self.acc.get_state_dict(self.model)

    def _save(self, final: Metrics, seconds: float, whole: dict[str, Any] | None = None) -> None:
        """The main process writes OUT; `whole` is the gathered state dict under FSDP."""
        import accelerate
        import torch
        import transformers

        from llmkit import __version__, modelcard

        cfg, plan = self.cfg, self.plan
        model = self.acc.unwrap_model(self.model)
        if cfg.gradient_checkpointing:
            _checkpointing(model, enable=False)
            model.config.use_cache = True
        model, save_options, adapter = self._adapter_output(model)
        if whole is not None:
            # The model's own parameters are shards: save_pretrained writes the gathered ones instead.
            save_options["state_dict"] = _retied(model, whole, getattr(torch, cfg.save_dtype))
        if cfg.save_dtype != "float32":
            model = model.to(getattr(torch, cfg.save_dtype))  # training is over: halve the file
        meta = {
            "name": self.out.name,
            "config": asdict(cfg),
            "lr": plan.lr,
            "warmup_steps": plan.warmup_steps,
            "mixed_precision": plan.mixed_precision,
            "optimizer": plan.optimizer,
            "muon_lr": plan.muon_lr,
            "effective_batch": plan.effective_batch,
            "processes": plan.processes,
            "total_steps": plan.total_steps,
            "parameters": plan.parameters - (plan.trainable if cfg.lora else 0),  # the base's, with LoRA
            **adapter,
            "data": _data_stats(self.data),
            "metrics": {**final.record(), "seconds": round(seconds, 2)},
            "versions": {
                "llmkit": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
                **_peft_version(cfg),
            },
        }
        rundir.save_final(self.out, model, self.tokenizer, meta, modelcard.render(meta), **save_options)

    def _adapter_output(self, model: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """With --lora: (what to save, save_pretrained options, what llmkit.json adds about it)."""
        cfg = self.cfg
        if not cfg.lora:
            return model, {}, {}
        meta = {
            "base_model": model.peft_config["default"].base_model_name_or_path,
            "adapter_parameters": self.plan.trainable,
        }
        if cfg.merge:
            return model.merge_and_unload(), {}, meta
        # The adapters alone: no embedding copies, as the vocabulary is the base's ("auto" asks the hub).
        return model, {"save_embedding_layers": False}, meta


def _retied(model: Any, whole: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The gathered state dict in `dtype`, with tied weights (GPT-2's lm_head and wte) one tensor again.

    Gathering copies each name's tensor on its own, and transformers finds ties by shared storage: without
    this, OUT would hold the tied weight twice.
    """
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in whole.items()}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in converted:
            converted[name] = converted[first.setdefault(id(tensor), name)]
    return converted


def _peft_version(cfg: TrainConfig) -> dict[str, str]:
    if not cfg.lora:
        return {}
    import peft

    return {"peft": peft.__version__}


def _truncate_metrics(out: Path, step: int) -> dict[str, Any] | None:
    """Drop metrics logged after the checkpoint, so the resumed run neither repeats nor skips a step.

    Returns the last record kept.
    """
    path = out / rundir.METRICS
    if not path.is_file():
        return None
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by the crash, and anything after it
    path.write_text("".join(keep), encoding="utf-8")
    return json.loads(keep[-1]) if keep else None


def _data_stats(data: PreparedData) -> dict[str, Any]:
    """`data.stats()` with a --val-file's counts apart: documents, tokens and bytes are the training
    data's, val_documents, val_tokens and val_bytes (val_records for prompt/completion) the file's."""
    stats = data.stats()
    if not stats["val_file"]:
        return stats
    train, val = data.corpora
    stats.update(documents=train.documents, tokens=train.tokens, bytes=train.bytes)
    stats.update(val_documents=val.documents, val_tokens=val.tokens, val_bytes=val.bytes)
    if data.pairs is not None:
        assert data.val is not None
        stats.update(records=len(data.train.packing.members), val_records=len(data.val.packing.members))
    return stats


def _free_memory(device: torch.device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def _signals(trainer: Trainer) -> Iterator[None]:
    """Ctrl-C or SIGTERM: finish the step, checkpoint, stop. A second Ctrl-C aborts at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        if trainer.stop_signal is None:
            trainer.stop_signal = signum
        elif signum == signal.SIGINT and trainer.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


Event = Plan | Metrics | SampleText | Notice | Finished


def run(cfg: TrainConfig, on_tokenize: Callable[[int, int], None] | None = None) -> Iterator[Event]:
    """Train; yields a Plan, Metrics per log/eval, SampleText, and Finished (main process only)."""
    return Trainer(cfg, on_tokenize).events()
