"""`llmkit finetune`: fine-tune (or train from scratch) on text files, on one device or many."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import (
    AllowPickleOpt,
    ChatTemplateOpt,
    DataArg,
    DeviceOpt,
    ErrorsOpt,
    GlobOpt,
    ModelOpt,
    OfflineOpt,
    TextFieldOpt,
)

EXAMPLES = """\b
Examples:
  llmkit finetune poems.txt -o poems-gpt2 -m gpt2 --epochs 3
  llmkit finetune notes.txt -o notes-lora -m gpt2 --lora --lora-r 8
  llmkit finetune qa.jsonl -o qa-gpt2 -m gpt2 --prompt-field question --completion-field answer
  llmkit finetune corpus/ -o tiny --from-scratch -m gpt2 --tokenizer my-bpe --n-layer 4 --n-embd 256
  torchrun --nproc-per-node 4 -m llmkit finetune data.jsonl -o out --batch-size 8
"""
SPARKS = "▁▂▃▄▅▆▇█"


def finetune(
    data: DataArg,
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="Output directory (a model directory at the end).", show_default=False
        ),
    ],
    model: ModelOpt = "gpt2",
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Random weights from the base model's config.")
    ] = False,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="Tokenizer directory for --from-scratch.", show_default=False),
    ] = None,
    n_layer: Annotated[
        int | None, typer.Option("--n-layer", help="From scratch: layers.", show_default=False)
    ] = None,
    n_head: Annotated[
        int | None, typer.Option("--n-head", help="From scratch: attention heads.", show_default=False)
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            "--dropout",
            help="Residual, embedding and attention dropout (default: the model config's).",
            show_default=False,
        ),
    ] = None,
    n_embd: Annotated[
        int | None, typer.Option("--n-embd", help="From scratch: embedding width.", show_default=False)
    ] = None,
    context: Annotated[
        int | None, typer.Option("--context", help="From scratch: context length.", show_default=False)
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            "--block-size", help="Tokens per block (default: min(context, 1024)).", show_default=False
        ),
    ] = None,
    text_field: TextFieldOpt = "text",
    prompt_field: Annotated[
        str | None,
        typer.Option(
            "--prompt-field",
            help="Train on JSONL prompt/completion records, the completion only: the prompt's field "
            "(default prompt; records with prompt and completion and no --text-field are detected).",
            show_default=False,
        ),
    ] = None,
    completion_field: Annotated[
        str | None,
        typer.Option(
            "--completion-field",
            help="The completion's field (default completion). Prompt and completion are tokenized apart, "
            "so the boundary is exact; each record is prompt + completion + EOS.",
            show_default=False,
        ),
    ] = None,
    messages_field: Annotated[
        str | None,
        typer.Option(
            "--messages-field",
            help="Train on JSONL conversation records, the assistant turns only: the field with the "
            "[{role, content}] list, rendered through the model's chat template (default messages; "
            "records with a messages list and no --text-field are detected).",
            show_default=False,
        ),
    ] = None,
    long_records: Annotated[
        str,
        typer.Option(
            "--long-records",
            help="A prompt/completion or conversation record longer than --block-size: error, or skip it "
            "(counted).",
        ),
    ] = "error",
    glob: GlobOpt = None,
    errors: ErrorsOpt = "replace",
    num_proc: Annotated[int, typer.Option("--num-proc", help="Processes for tokenization.")] = 1,
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir", help="Token cache directory (default: ~/.cache/llmkit/tokens).", show_default=False
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Don't read or write the token cache.")
    ] = False,
    val_file: Annotated[
        str | None,
        typer.Option("--val-file", help="Validation text (instead of --val-split).", show_default=False),
    ] = None,
    val_split: Annotated[
        float, typer.Option("--val-split", help="Fraction of blocks held out for validation.")
    ] = 0.05,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Passes over the data (default 1).", show_default=False)
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).", show_default=False),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Blocks per batch per process.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Batches per optimizer step.")] = 1,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Peak learning rate (default 5e-5; 2e-4 with --lora; 6e-4 from scratch).",
            show_default=False,
        ),
    ] = None,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases or LayerNorm).")
    ] = 0.01,
    optimizer: Annotated[
        str | None,
        typer.Option(
            "--optimizer",
            help="adamw, or muon (Muon on the blocks' matrices, AdamW on the rest). "
            "Default: muon with --from-scratch, else adamw.",
            show_default=False,
        ),
    ] = None,
    muon_lr: Annotated[float, typer.Option("--muon-lr", help="Muon's peak learning rate.")] = 0.02,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="cosine, linear or constant.")] = "cosine",
    warmup_steps: Annotated[
        int | None,
        typer.Option("--warmup-steps", help="Warm-up steps (overrides --warmup-ratio).", show_default=False),
    ] = None,
    warmup_ratio: Annotated[
        float, typer.Option("--warmup-ratio", help="Warm-up as a fraction of the steps.")
    ] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Gradient clipping; 0 = off.")
    ] = 1.0,
    mixed_precision: Annotated[
        str,
        typer.Option(
            "--mixed-precision",
            help="auto, no, bf16 or fp16 (auto: bf16 where the device computes it natively — GPUs, CPUs "
            "with avx512_bf16 or AMX — else no).",
        ),
    ] = "auto",
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in the backward pass: less memory, slower steps "
            "(default: on with --lora, off otherwise).",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[
        bool,
        typer.Option(
            "--lora",
            help="Train LoRA adapters on the frozen model instead of every weight; OUT is an adapter.",
        ),
    ] = False,
    lora_r: Annotated[
        int | None, typer.Option("--lora-r", help="LoRA rank (default 16).", show_default=False)
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option(
            "--lora-alpha", help="LoRA alpha; updates scale by alpha / r (default 2 × r).", show_default=False
        ),
    ] = None,
    lora_dropout: Annotated[
        float | None,
        typer.Option(
            "--lora-dropout", help="Dropout on the adapters' input (default 0.05).", show_default=False
        ),
    ] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            "--lora-targets",
            help="Comma-separated layers to adapt, or all-linear (default: c_attn,c_proj,c_fc for GPT-2, "
            "else what PEFT adapts for the architecture, else all-linear).",
            show_default=False,
        ),
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="With --lora: save the full model with the adapters merged in.")
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the model: a minute or two of compiling first, then faster steps "
            "(mostly on GPUs).",
        ),
    ] = False,
    chat_template: ChatTemplateOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for initialisation, data order and dropout.")] = 0,
    eval_every: Annotated[
        int,
        typer.Option("--eval-every", help="Validate every N steps (and at the end); 0 = only at the end."),
    ] = 0,
    sample_every: Annotated[
        int, typer.Option("--sample-every", help="Show a sample every N steps; 0 = never.")
    ] = 0,
    sample_prompt: Annotated[str, typer.Option("--sample-prompt", help="Prompt for --sample-every.")] = "",
    sample_tokens: Annotated[
        int, typer.Option("--sample-tokens", help="Tokens per --sample-every sample.")
    ] = 40,
    log_every: Annotated[int, typer.Option("--log-every", help="Log a metrics line every N steps.")] = 10,
    report_to: Annotated[
        str | None,
        typer.Option(
            "--report-to",
            help="Also log to an accelerate tracker (tensorboard, wandb, …).",
            show_default=False,
        ),
    ] = None,
    save_dtype: Annotated[
        str, typer.Option("--save-dtype", help="Dtype of the saved weights: float32, bfloat16 or float16.")
    ] = "float32",
    save_every: Annotated[
        int,
        typer.Option(
            "--save-every", help="Checkpoint every N steps (and at each epoch's end); 0 = epoch ends."
        ),
    ] = 500,
    keep: Annotated[int, typer.Option("--keep", help="Checkpoints to keep (the newest).")] = 2,
    keep_best: Annotated[
        bool, typer.Option("--keep-best", help="Also keep the best by validation loss.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in OUT.")
    ] = False,
    resume_from: Annotated[
        str | None,
        typer.Option("--resume-from", help="Continue from this checkpoint directory.", show_default=False),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="On resume, allow settings that can safely change (--eval-every, …) to differ."
        ),
    ] = False,
    max_bad_steps: Annotated[
        int, typer.Option("--max-bad-steps", help="Stop after this many non-finite losses in a row.")
    ] = 5,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start over in an OUT that holds an earlier run (its model, checkpoints, metrics and "
            "loss.png go), or in a non-empty directory (its model files are replaced, nothing else).",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Fine-tune a model on text files, or train one from scratch. Prints OUT's path on stdout."""
    options = dict(locals())
    import os
    from dataclasses import fields

    # MKL may otherwise pick its thread count by the machine's momentary load, and a different count
    # sums in a different order: resumed CPU runs must match uninterrupted ones bit for bit.
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")

    from llmkit.config import TrainConfig
    from llmkit.models import quiet_transformers

    if chat_template is not None:
        from llmkit.templates import resolve_template

        resolve_template(chat_template)  # a bad file fails before the model loads, not after
    # Every option is named after its TrainConfig field; the config validates them all at once.
    cfg = TrainConfig(**{f.name: options[f.name] for f in fields(TrainConfig)})
    from llmkit import training

    quiet_transformers(out.settings.verbose)
    view = _View()
    try:
        for event in training.run(cfg, on_tokenize=view.tokenizing):
            view.show(event)
    except training.Interrupted as exc:
        if int(os.environ.get("RANK", "0")) != 0:
            raise typer.Exit(exc.exit_code) from None  # the main process says it, once
        launcher = " (under the same launcher)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        exc.hint = f"resume with: {resume_command()}{launcher}"
        raise
    finally:
        view.close()


def resume_command() -> str:
    import shlex
    import sys

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg in ("--resume", "--overwrite") or arg.startswith("--resume-from="):
            skip = False
            continue
        skip = arg == "--resume-from"
        if not skip:
            args.append(arg)
    return shlex.join(["llmkit", *args, "--resume"])


class _View:
    """Renders training events on stderr: a live bar on a terminal, plain log lines otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None
        self.tok_bar: Any = None
        self.live = out.stderr_is_terminal() and not out.settings.quiet

    def tokenizing(self, done: int, total: int) -> None:
        if not self.live:
            return
        if self.tok_bar is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self.tok_bar = Progress(
                TextColumn("tokenizing"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=out.console(),
                transient=True,
            )
            self.tok_bar.start()
            self.tok_task = self.tok_bar.add_task("tokenizing", total=total)
        self.tok_bar.update(self.tok_task, completed=done, total=total)

    def show(self, event: Any) -> None:
        from llmkit import training

        if isinstance(event, training.Plan):
            self._stop_tokenizing()
            self._plan(event)
        elif isinstance(event, training.Metrics):
            self._metrics(event)
        elif isinstance(event, training.Notice):
            self._print(event.message)
        elif isinstance(event, training.SampleText):
            self._print(f"sample at step {event.step}: {event.text!r}")
        elif isinstance(event, training.Finished):
            self.close()
            self._finished(event)

    def _plan(self, p: Any) -> None:
        self._print(data_line(p))
        if p.skipped_records:
            out.warn(f"{p.skipped_records:,} record(s) longer than a block of {p.block_size} were skipped")
        if p.invalid_bytes:
            out.warn(
                f"{p.invalid_bytes:,} invalid UTF-8 byte(s) were replaced (--errors strict to refuse them)"
            )
        self._print(
            f"plan: {plural(p.steps_per_epoch, 'step')} per epoch, {plural(p.total_steps, 'step')}, "
            f"effective batch {plural(p.effective_batch, 'block')} "
            f"({plural(p.effective_batch * p.block_size, 'token')}); "
            f"{p.parameters / 1e6:.1f}M parameters{_trainable(p)} on {p.device} × {p.processes}, precision "
            f"{p.mixed_precision}, {optimizer_words(p.lr, p.muon_lr)} with "
            f"{plural(p.warmup_steps, 'warm-up step')}"
            + (", gradient checkpointing" if p.gradient_checkpointing else "")
            + (f"; LoRA on {p.lora_targets}" if p.lora_targets else "")
        )
        self.total = p.total_steps
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=out.console(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=p.total_steps, info="")

    def _metrics(self, m: Any) -> None:
        val = f"  val loss {m.val_loss:.4f}  val ppl {m.val_perplexity:.2f}" if m.val_loss is not None else ""
        info = (
            f"epoch {m.epoch:.2f}  loss {_num(m.loss)}{val}  lr {m.lr:.2e}  {m.tokens_per_second:,.0f} tok/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=m.step, info=info)
            if m.val_loss is not None:
                self.bar.console.print(f"step {m.step}: {info}", markup=False, highlight=False)
        else:
            self._print(f"step {m.step}/{self.total}  {info}")

    def _finished(self, f: Any) -> None:
        m = f.final
        ppl = f"  val perplexity {m.val_perplexity:.3f}" if m.val_perplexity is not None else ""
        self._print(
            f"done: {plural(m.step, 'step')} in {f.seconds:.1f}s, loss {sparkline(f.losses)} "
            f"{_num(m.loss)}{ppl}"
        )
        self._print(f"saved to {f.output}")
        out.write(f"{f.output}\n", flush=True)

    def _print(self, text: str) -> None:
        if not out.settings.quiet:
            out.console().print(text, markup=False, highlight=False)

    def _stop_tokenizing(self) -> None:
        if self.tok_bar is not None:
            self.tok_bar.stop()
            self.tok_bar = None

    def close(self) -> None:
        self._stop_tokenizing()
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def plural(count: int, word: str) -> str:
    """`1 step`, `2 steps`, `1,354 blocks`."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def optimizer_words(lr: float, muon_lr: float | None) -> str:
    """What updates what: `AdamW lr 5e-05`, or both optimizers and both rates with Muon."""
    if muon_lr is None:
        return f"AdamW lr {lr:g}"
    return f"Muon lr {muon_lr:g} on the blocks' matrices and AdamW lr {lr:g} on the rest"


def data_line(p: Any) -> str:
    """The `data:` line: what the training data holds and its blocks, and a --val-file's apart."""
    cache = " (token cache hit)" if p.cache_hits else ""
    unit, padding = "document", ""
    count = p.documents
    if p.records is not None:
        unit = "conversation record" if p.conversations else "prompt/completion record"
        padding, count = f" ({p.padding:.1%} padding)", p.records
    head = f"data: {plural(count, unit)}, {plural(p.tokens, 'token')}{cache} → "
    if p.val_documents is None:
        return (
            f"{head}{p.train_blocks:,} train / {p.val_blocks:,} validation blocks of {p.block_size}{padding}"
        )
    unit = "record" if p.records is not None else "document"
    return (
        f"{head}{plural(p.train_blocks, 'train block')} of {p.block_size}; validation file: "
        f"{plural(p.val_documents, unit)}, {plural(p.val_tokens, 'token')} → "
        f"{plural(p.val_blocks, 'block')}{padding}"
    )


def _trainable(p: Any) -> str:
    if p.trainable == p.parameters:
        return ""
    return f" ({p.trainable:,} trainable, {p.trainable / p.parameters:.2%})"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def sparkline(values: list[float], width: int = 24) -> str:
    if not values:
        return ""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in values)
