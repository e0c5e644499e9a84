"""The run itself: `Trainer` sets it up, drives the optimizer steps, checkpoints and finishes.

Shape of `run_clm_no_trainer`: Accelerator → data under `main_process_first` → model and optimizer →
`prepare` → loop with `accumulate` → `wait_for_everyone` → the main process saves. The core never
prints: `events()` yields events (on the main process only) and the CLI renders them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import checkpoints, rundir
from llmkit.config import TrainConfig
from llmkit.errors import InputError, UsageError
from llmkit.training import setup, signals
from llmkit.training.evaluate import evaluate, pair_inputs, sample
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
from llmkit.training.model import build_model, checkpointing
from llmkit.training.save import data_stats, gather_weights, save

if TYPE_CHECKING:
    import numpy as np
    import torch

    from llmkit.data import PreparedData


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


def _order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: the same on every process."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def _free_memory(device: torch.device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
        with signals.catching(self):
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
        self.chosen = setup.saved_choices(saved) if saved is not None else {}
        acc, precision_notice = setup.accelerator(cfg, self.out, self.chosen.get("mixed_precision"))
        self.acc = acc
        fsdp_notice = setup.check_fsdp(acc, cfg)
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
        model, self.tokenizer, self.base_dropout, self.lora_targets = build_model(cfg)
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
            checkpointing(model, enable=True)
            model.config.use_cache = False
        if cfg.compile:
            # In place, so parameter names in checkpoints and OUT stay as without --compile (a wrapper
            # would prefix them) and a run resumes either way. Whole model, not block by block: each
            # block reads its own layer index, so dynamo would compile one graph per block and, past
            # its recompile limit (8), silently leave the rest eager.
            model.compile()
        optimizers = setup.optimizers(model, cfg, acc.device.type, self.optimizer_name)
        self.warmup = setup.warmup_steps(cfg, self.total)
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
        last = setup.truncate_metrics(self.out, self.state.step) if acc.is_main_process else None
        if last is not None:
            self.final = Metrics(**{k: v for k, v in last.items() if k in Metrics.__dataclass_fields__})

    def _resume_notices(self, saved: dict[str, Any], resume_from: Path, changes: list[str]) -> list[str]:
        notices = [f"resuming from {resume_from} at step {self.state.step}/{self.total}", *changes]
        before, now = saved.get("threads"), setup.cpu_threads(self.acc.device.type)
        if before and now and before != now:
            notices.append(
                f"the checkpoint was written with {before} CPU threads, this run has {now}: sums "
                "split differently, so it won't match an uninterrupted run bit for bit "
                f"(OMP_NUM_THREADS={before} would)"
            )
        return notices

    def _make_plan(self, block_size: int) -> Plan:
        acc, data = self.acc, self.data
        stats = data_stats(data)
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
            conversations="messages_field" in stats,
            skipped_records=stats.get("skipped_records", 0),
            padding=stats.get("padding", 0.0),
            gradient_checkpointing=bool(self.cfg.gradient_checkpointing),
            val_documents=stats.get("val_records", stats.get("val_documents")),
            val_tokens=stats.get("val_tokens"),
            lora_targets=self.lora_targets,
        )

    def _finish(self, metrics: rundir.MetricsLog | None, main: bool) -> Iterator[Event]:
        """Every process waits for the others, the whole model is gathered, the main process saves OUT."""
        acc = self.acc
        acc.wait_for_everyone()
        if self.cfg.report_to:
            acc.end_training()
        whole = gather_weights(acc, self.model)  # under FSDP a collective: every process takes part
        if main:
            assert metrics is not None and self.final is not None
            metrics.close()
            seconds = time.perf_counter() - self.started
            save(
                acc.unwrap_model(self.model),
                self.tokenizer,
                self.cfg,
                self.plan,
                self.data,
                self.final,
                seconds,
                whole,
            )
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
                    record.val_loss = state.val_loss = evaluate(
                        acc, model, data.val, cfg.batch_size, self.pairs
                    )
                    record.val_perplexity = math.exp(min(record.val_loss, 700))
                if cfg.report_to:
                    acc.log({k: v for k, v in record.record().items() if k != "step"}, step=step)
                self.final = record
                if main and metrics is not None:
                    metrics.write(record.record())
                    yield record
                if main and cfg.sample_every and (step % cfg.sample_every == 0 or step == self.total):
                    yield SampleText(step, sample(acc, model, self.tokenizer, cfg))
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
                        batch = pair_inputs(self.data.train, rows, acc.device)
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
            "threads": setup.cpu_threads(self.acc.device.type),
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
            messages_field=cfg.messages_field,
            long_records=cfg.long_records,
            on_progress=self.on_tokenize if main else None,
        )
