"""Fine-tuning (or training from scratch) with an accelerate loop of our own.

Shape of `run_clm_no_trainer`: Accelerator → data under `main_process_first` → model and optimizer →
`prepare` → loop with `accumulate` → `wait_for_everyone` → the main process saves. The core never
prints: `run` yields events (on the main process only) and the CLI renders them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import rundir
from llmkit.config import TrainConfig
from llmkit.errors import InputError, ModelError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from accelerate import Accelerator

    from llmkit.data import PreparedData


# -- events ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    documents: int
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
    parameters: int
    lr: float
    warmup_steps: int


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


Event = Plan | Metrics | SampleText | Finished


# -- setup -------------------------------------------------------------------------------------------
def _mixed_precision(cfg: TrainConfig, device_type: str) -> str:
    import torch

    if cfg.mixed_precision == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if cfg.mixed_precision == "fp16" and device_type not in ("cuda", "mps"):
        raise UsageError("--mixed-precision fp16 needs a GPU", "use bf16 or no on the CPU")
    return cfg.mixed_precision


def _accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from llmkit.models import pick_device

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate keeps process-wide singletons; a second run in one process must start clean.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    device = pick_device(cfg.device)
    precision = _mixed_precision(cfg, device.type)
    try:
        return Accelerator(
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


def _build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """(model, tokenizer): pretrained weights, or a fresh model from the base config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmkit.models import has_tokenizer, load_tokenizer, resolve

    source = resolve(
        cfg.model, offline=cfg.offline, allow_pickle=cfg.allow_pickle, weights=not cfg.from_scratch
    )
    if cfg.tokenizer is not None:
        tok_dir = Path(cfg.tokenizer)
        if not (tok_dir.is_dir() and has_tokenizer(tok_dir)):
            raise ModelError(
                f"{cfg.tokenizer} is not a tokenizer directory",
                "make one with: llmkit train-tokenizer DATA -o DIR",
            )
        tokenizer = load_tokenizer(tok_dir, cfg.tokenizer)
    else:
        tokenizer = load_tokenizer(source.path, cfg.model)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"the tokenizer of {cfg.tokenizer or cfg.model} has no end-of-text token",
            "documents are joined with it; train one with llmkit train-tokenizer",
        )
    if not cfg.from_scratch:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype="float32",
            local_files_only=True,
            use_safetensors=None if cfg.allow_pickle else True,
        )
        return model, tokenizer
    config = AutoConfig.from_pretrained(source.path, local_files_only=True)
    overrides = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd}
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
    return AutoModelForCausalLM.from_config(config), tokenizer


def _optimizer(model: Any, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    import torch

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Matrices decay; biases and LayerNorm weights (vectors) don't.
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.peak_lr, betas=(0.9, 0.95 if cfg.from_scratch else 0.999), fused=device_type == "cuda"
    )


def _warmup(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(cfg.warmup_ratio * total_steps)


def _order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: the same on every process."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


# -- the run -----------------------------------------------------------------------------------------
class Trainer:
    """One training run. `events()` drives it; state lives here so evaluation and saving can share it."""

    def __init__(self, cfg: TrainConfig, on_tokenize: Callable[[int, int], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.on_tokenize = on_tokenize

    def events(self) -> Iterator[Event]:
        import torch
        from accelerate.utils import set_seed

        cfg = self.cfg
        acc = self.acc = _accelerator(cfg, self.out)
        main = acc.is_main_process
        if main:
            rundir.claim(self.out, overwrite=cfg.overwrite)
        set_seed(cfg.seed)
        model, tokenizer = _build_model(cfg)
        self.tokenizer = tokenizer
        from llmkit.models import context_length

        context = context_length(model.config)
        block_size = cfg.block_size or min(context, 1024)
        if block_size > context:
            raise UsageError(
                f"--block-size {block_size} exceeds the model's context of {context}",
                f"use at most {context}",
            )
        with acc.main_process_first():
            data = self._data(tokenizer, block_size, main)
        self.data = data
        world, rank = acc.num_processes, acc.process_index
        global_batch = cfg.batch_size * cfg.grad_accum * world
        steps_per_epoch = len(data.train) // global_batch
        if steps_per_epoch == 0:
            raise InputError(
                f"{len(data.train)} training blocks are fewer than one step's "
                f"{global_batch} ({cfg.batch_size} per batch × {cfg.grad_accum} accumulation × "
                f"{world} processes)",
                "lower --batch-size, --grad-accum or --block-size, or add more text",
            )
        total = cfg.max_steps or math.ceil((cfg.epochs or 1.0) * steps_per_epoch)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        optimizer = _optimizer(model, cfg, acc.device.type)
        from transformers import get_scheduler

        warmup = _warmup(cfg, total)
        schedule = {"constant": "constant_with_warmup"}.get(cfg.lr_schedule, cfg.lr_schedule)
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        # The scheduler stays unprepared: accelerate would step it once per process, and `total` already
        # counts global optimizer steps. It is stepped only when gradients sync.
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        stats = data.stats()
        plan = Plan(
            stats["documents"],
            stats["tokens"],
            stats["invalid_bytes"],
            stats["cache_hits"],
            block_size,
            len(data.train),
            len(data.val) if data.val is not None else 0,
            steps_per_epoch,
            total,
            global_batch,
            world,
            str(acc.device),
            acc.mixed_precision,
            sum(p.numel() for p in acc.unwrap_model(model).parameters()),
            cfg.peak_lr,
            warmup,
        )
        self.plan = plan
        if cfg.report_to:
            acc.init_trackers(
                "llmkit",
                config={k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)},
            )
        metrics = rundir.MetricsLog.open(self.out) if main else None
        if main:
            yield plan

        started = time.perf_counter()
        last_time, last_tokens = started, 0
        tokens_per_step = global_batch * block_size
        running = torch.zeros((), device=acc.device)
        micro_steps = 0
        losses: list[float] = []
        final: Metrics | None = None
        model.train()
        step = 0
        order, order_epoch = None, -1
        while step < total:
            epoch = step // steps_per_epoch
            if epoch != order_epoch:
                order, order_epoch = _order(len(data.train), cfg.seed, epoch), epoch
            base = (step % steps_per_epoch) * global_batch
            for k in range(cfg.grad_accum):
                start = base + (k * world + rank) * cfg.batch_size
                batch = torch.from_numpy(data.train.batch(order[start : start + cfg.batch_size])).to(
                    acc.device
                )
                with acc.accumulate(model), acc.autocast():
                    loss = model(input_ids=batch, labels=batch).loss
                    running += loss.detach()
                    micro_steps += 1
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if acc.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            step += 1
            log_now = step % cfg.log_every == 0 or step == total
            eval_now = step == total or (cfg.eval_every and step % cfg.eval_every == 0)
            if not (log_now or eval_now):
                continue
            # The only host synchronisation of the loop: at log and eval steps.
            mean_loss = float(acc.reduce(running, reduction="mean")) / max(micro_steps, 1)
            running.zero_()
            micro_steps = 0
            now = time.perf_counter()
            tokens = step * tokens_per_step
            record = Metrics(
                step,
                round(step / steps_per_epoch, 4),
                mean_loss,
                scheduler.get_last_lr()[0],
                tokens,
                round((tokens - last_tokens) / max(now - last_time, 1e-9), 1),
            )
            last_time, last_tokens = now, tokens
            losses.append(mean_loss)
            if eval_now and data.val is not None:
                record.val_loss = self.evaluate()
                record.val_perplexity = math.exp(min(record.val_loss, 700))
            if cfg.report_to:
                acc.log({k: v for k, v in record.record().items() if k != "step"}, step=step)
            final = record
            if main and metrics is not None:
                metrics.write(record.record())
                yield record
            if main and cfg.sample_every and (step % cfg.sample_every == 0 or step == total):
                yield SampleText(step, self.sample())
        acc.wait_for_everyone()
        if cfg.report_to:
            acc.end_training()
        assert final is not None
        if main:
            metrics.close()
            seconds = time.perf_counter() - started
            self._save(final, seconds)
            yield Finished(self.out, final, losses, seconds)
        acc.wait_for_everyone()
        data.close()

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
                batch = torch.from_numpy(val.batch(mine[i : i + self.cfg.batch_size])).to(acc.device)
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
                return next(gen.run([Prompt(0, self.cfg.sample_prompt)])).completion
        finally:
            model.train()

    def _save(self, final: Metrics, seconds: float) -> None:
        import accelerate
        import torch
        import transformers

        from llmkit import __version__, modelcard

        cfg, plan = self.cfg, self.plan
        model = self.acc.unwrap_model(self.model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
        meta = {
            "name": self.out.name,
            "config": asdict(cfg),
            "lr": plan.lr,
            "warmup_steps": plan.warmup_steps,
            "mixed_precision": plan.mixed_precision,
            "effective_batch": plan.effective_batch,
            "processes": plan.processes,
            "total_steps": plan.total_steps,
            "parameters": plan.parameters,
            "data": self.data.stats(),
            "metrics": {**final.record(), "seconds": round(seconds, 2)},
            "versions": {
                "llmkit": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
            },
        }
        rundir.save_final(self.out, model, self.tokenizer, meta, modelcard.render(meta))


def run(cfg: TrainConfig, on_tokenize: Callable[[int, int], None] | None = None) -> Iterator[Event]:
    """Train; yields a Plan, Metrics per log/eval, SampleText, and Finished (main process only)."""
    return Trainer(cfg, on_tokenize).events()
