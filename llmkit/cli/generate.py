"""`llmkit generate`: sample text from a prompt, or from many prompts in batches."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OfflineOpt,
    load_config,
)

EXAMPLES = """\b
Examples:
  llmkit generate -m gpt2 "The quick brown fox" -n 40
  cat prompt.txt | llmkit generate -t 0.8 --top-p 0.95 --stop $'\\n\\n'
  llmkit generate -i prompts.jsonl --format jsonl -s 3 --seed 1 | jq -r .completion
"""


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t").replace("\\0", "\0")


def generate(
    prompt: Annotated[
        list[str] | None,
        typer.Argument(
            help="Prompt words (joined by spaces). `-`, or nothing with stdin piped, reads stdin.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = "gpt2",
    input_file: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Prompt file (or - for stdin): one prompt per line, or JSONL with "
            '"prompt" and optional "id".',
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate per sample.")
    ] = 50,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length", help="Total tokens including the prompt (instead of -n).", show_default=False
        ),
    ] = None,
    min_new_tokens: Annotated[
        int, typer.Option("--min-new-tokens", help="Suppress end-of-text until this many tokens.")
    ] = 0,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 means greedy.")
    ] = 1.0,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Sample from the k most likely tokens; 0 = off.")
    ] = 50,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1].")] = 1.0,
    min_p: Annotated[
        float | None,
        typer.Option("--min-p", help="Drop tokens below min-p × the top probability.", show_default=False),
    ] = None,
    typical_p: Annotated[
        float | None, typer.Option("--typical-p", help="Locally typical sampling mass.", show_default=False)
    ] = None,
    repetition_penalty: Annotated[
        float, typer.Option("--repetition-penalty", help=">1 discourages repeats.")
    ] = 1.0,
    no_repeat_ngram_size: Annotated[
        int, typer.Option("--no-repeat-ngram-size", help="Never repeat an n-gram this long; 0 = off.")
    ] = 0,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always pick the most likely token.")] = False,
    num_samples: Annotated[int, typer.Option("--num-samples", "-s", help="Samples per prompt.")] = 1,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Seed for sampling (default: random, reported in JSONL and with -v).",
            show_default=False,
        ),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            "--stop",
            help="Stop when this text is generated (repeatable; \\n and \\t are understood).",
            show_default=False,
        ),
    ] = None,
    keep_stop: Annotated[bool, typer.Option("--keep-stop", help="Keep the stop text in the output.")] = False,
    truncate: Annotated[
        str,
        typer.Option(
            "--truncate", help="A prompt too long for the context: left (keep its end, warn) or error."
        ),
    ] = "left",
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Prompts per batch (default: 16 on CPU, 64 on CUDA).",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="text or jsonl (one object per sample).")
    ] = "text",
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before its completion.")] = False,
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="Print tokens as they come (default: when stdout is a terminal).",
            show_default=False,
        ),
    ] = None,
    separator: Annotated[
        str, typer.Option("--separator", help="Text mode: written after each sample (\\n, \\t understood).")
    ] = "\\n",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate text from a prompt, or from many prompts with --input."""
    from llmkit.cli._inputs import count_prompt_lines, read_prompts, text_argument
    from llmkit.config import GenerateConfig
    from llmkit.errors import UsageError

    if fmt not in ("text", "jsonl"):
        raise UsageError(f"unknown --format {fmt!r}", "use text or jsonl")
    if input_file is not None and prompt:
        raise UsageError("pass a prompt or --input, not both")
    cfg = GenerateConfig(
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        greedy=greedy,
        num_samples=num_samples,
        seed=seed,
        stop=[_unescape(s) for s in stop or []],
        keep_stop=keep_stop,
        truncate=truncate,
        batch_size=batch_size,  # type: ignore[arg-type]
    )
    load_cfg = load_config(model, device, dtype, offline, allow_pickle)
    sep = _unescape(separator)
    single = None if input_file is not None else text_argument(prompt, "prompt")

    from llmkit.cli._loading import load_model
    from llmkit.generation import Generator, Prompt

    gen = Generator(load_model(load_cfg), cfg, warn=out.warn)
    out.detail(f"seed {gen.seed}")
    started = time.perf_counter()

    def emit(sample) -> None:
        if fmt == "jsonl":
            out.write_json(sample.record())
        else:
            out.write((sample.prompt if echo else "") + sample.completion + sep)
        out.flush()

    prompts_done = 0
    if single is not None:
        one = Prompt(1, single)
        if stream is None:
            stream = out.stdout_is_terminal()
        if stream and fmt == "text" and cfg.num_samples == 1:
            if echo:
                out.write(single, flush=True)
            gen.stream(one, lambda text: out.write(text, flush=True))
            out.write(sep, flush=True)
        else:
            for sample in gen.run([one]):
                emit(sample)
        prompts_done = 1
    else:
        with out.progress("generating", count_prompt_lines(input_file), unit="prompts") as bar:

            def tick() -> None:
                nonlocal prompts_done
                prompts_done += 1
                out.advance(bar)

            for sample in gen.run(read_prompts(input_file), on_prompt_done=tick):
                emit(sample)
    _summary(gen, prompts_done, started)


def _summary(gen, prompts: int, started: float) -> None:
    if out.settings.quiet or not (out.settings.verbose or out.stderr_is_terminal()):
        return
    seconds = time.perf_counter() - started
    rate = gen.tokens_generated / seconds if seconds > 0 else 0.0
    first = ""
    if gen.first_token_at is not None:
        first = f", first token after {gen.first_token_at - started:.2f}s"
    out.console().print(
        f"{prompts} prompt{'s' if prompts != 1 else ''}, {gen.tokens_generated} tokens in {seconds:.2f}s "
        f"({rate:.1f} tokens/s{first})",
        style="dim",
        markup=False,
    )
