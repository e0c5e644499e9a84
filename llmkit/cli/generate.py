"""`llmkit generate`: sample text from a prompt, or from many prompts in batches."""

from __future__ import annotations

import itertools
import json
import time
from typing import Annotated, Any

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OfflineOpt,
    QuantizeOpt,
    check_format,
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
    ctx: typer.Context,
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
            help="Seed for sampling (default: random, reported in JSONL and with -v; none when greedy).",
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
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Static KV cache + torch.compile'd decoding: it compiles after the first token (tens of "
            "seconds on a CPU), then tokens come faster (worth it for long or many generations).",
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="torch, or llama.cpp: llama.cpp computes the logits on the CPU from a GGUF that llmkit "
            "exports once per model and tier (float32 → f32, auto → bf16 on a CPU with native bf16, else "
            "f16, --quantize int8 → q8_0, int4 → q4_0); sampling, seeds and stops stay llmkit's. Needs "
            "llmkit[llama-cpp].",
        ),
    ] = "torch",
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
    resume_output: Annotated[
        str | None,
        typer.Option(
            "--resume-output",
            help="Append JSONL to this file instead of stdout, skipping prompts whose ids it already holds "
            "(continue an interrupted --input run; needs --format jsonl).",
            show_default=False,
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar="LLMKIT_SERVER",
            help="Use the model of a running `llmkit serve` (or any OpenAI completions server) at this URL: "
            "no model load, no torch import.",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="LLMKIT_API_KEY", help="Key for --server.", show_default=False),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate text from a prompt, or from many prompts with --input."""
    options = dict(locals())
    from dataclasses import fields

    from llmkit.cli._inputs import count_prompt_lines, read_prompts, text_argument
    from llmkit.config import GenerateConfig
    from llmkit.errors import UsageError

    check_format(fmt, ("text", "jsonl"))
    if engine not in ENGINES:
        raise UsageError(f"unknown --engine {engine!r}", f"use {' or '.join(ENGINES)}")
    if engine == "llama.cpp" and not server:
        from llmkit.hardware import spin_for_llama_cpp

        if spin_for_llama_cpp():  # before anything imports torch
            out.detail("llama.cpp: OpenMP's default waiting (its barriers spin; passive waiting halves it)")
    if input_file is not None and prompt:
        raise UsageError("pass a prompt or --input, not both")
    if max_length is not None and _given(ctx, "max_new_tokens"):
        raise UsageError(
            "-n/--max-new-tokens and --max-length exclude each other",
            "--max-length counts the prompt's tokens too: pass one of them",
        )
    if resume_output is not None and (input_file is None or fmt != "jsonl"):
        raise UsageError(
            "--resume-output needs --input and --format jsonl", "ids tell which prompts are done"
        )
    options["stop"] = [_unescape(s) for s in stop or []]
    # Every decoding option is named after its GenerateConfig field; the config validates them all.
    cfg = GenerateConfig(**{f.name: options[f.name] for f in fields(GenerateConfig)})
    shard = _shard(device) if input_file is not None else None
    if shard is not None and shard.rank != 0:
        out.settings.quiet = True  # one voice: the main process talks and writes
    load_cfg = load_config(model, _rank_device(device), dtype, offline, allow_pickle, quantize)
    sep = _unescape(separator)
    single = None if input_file is not None else text_argument(prompt, "prompt")
    sink = _Sink(resume_output, cfg.num_samples, shard)
    prompts = None
    if input_file is not None:
        # Look at the first prompt before loading the model: an empty or broken file fails fast.
        prompts = read_prompts(input_file)
        first = next(prompts, None)
        if first is None:
            from llmkit.errors import InputError

            raise InputError(
                f"no prompts in {'stdin' if input_file == '-' else input_file}",
                'write one prompt per line, or JSONL objects with a "prompt"',
            )
        prompts = itertools.chain([first], prompts)

    from llmkit.generation import Prompt

    summary = not out.settings.quiet and (out.settings.verbose or out.stderr_is_terminal())
    if server:
        if engine != "torch":
            raise UsageError("--engine applies to a local model", "the server decodes with its own")
        gen: Any = _remote(ctx, server, api_key, cfg, options)
    elif engine == "llama.cpp":
        gen = _llama_cpp(load_cfg, cfg, shard, summary)
    else:
        from llmkit.cli._loading import load_model
        from llmkit.generation import Generator
        from llmkit.products import one_row_head

        lm = load_model(load_cfg)
        one_row_head(lm.model, lm.device)  # this process only decodes: batch-1's largest product, faster
        gen = Generator(lm, cfg, warn=out.warn, time_first_token=summary)
        if cfg.compile:
            out.say(
                "compiling… (--compile: the decoding step compiles after the first token, "
                "tens of seconds on a CPU)"
            )
    if gen.seed is not None:
        out.detail(f"seed {gen.seed}")
    started = time.perf_counter()

    def emit(samples: list) -> None:
        # A prompt's samples go out in one write: an interrupted run never leaves half a prompt.
        if fmt == "jsonl":
            sink.write("".join(json.dumps(s.record(), ensure_ascii=False) + "\n" for s in samples))
        else:
            sink.write("".join((s.prompt if echo else "") + s.completion + sep for s in samples))

    prompts_done = 0
    try:
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
                for samples in gen.run([one]):
                    emit(samples)
            prompts_done = 1
        else:
            assert prompts is not None
            total = count_prompt_lines(input_file)
            if sink.done:
                prompts = (p for p in prompts if sink.key(p.id) not in sink.done)
                out.say(f"skipping {len(sink.done):,} prompt(s) already in {resume_output}")
                total = None if total is None else max(0, total - len(sink.done))
            with out.progress("generating", total, unit="prompts") as bar:
                for samples in gen.run(prompts, shard):
                    emit(samples)
                    prompts_done += 1
                    out.advance(bar)
    except KeyboardInterrupt:
        if input_file is not None:
            out.say(_resume_hint(resume_output, prompts_done))
        raise
    finally:
        sink.close()
        if hasattr(gen, "close"):
            gen.close()
    if summary:
        _summary(gen, prompts_done, started)


ENGINES = ("torch", "llama.cpp")


def _llama_cpp(load_cfg: Any, cfg: Any, shard: Any, summary: bool) -> Any:
    """`generate`'s Generator with llama.cpp computing the logits (llmkit/llamacpp/)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig, GenerationConfig

    from llmkit.errors import UsageError
    from llmkit.llamacpp.files import check_family, gguf_for, gguf_type
    from llmkit.llamacpp.generator import Frame, LlamaCppGenerator
    from llmkit.llamacpp.runtime import LlamaCpp, bindings
    from llmkit.models import context_length, load_tokenizer, quiet_transformers, resolve

    if load_cfg.device not in ("auto", "cpu"):
        raise UsageError("--engine llama.cpp runs on the CPU", "drop --device, or use --engine torch")
    if cfg.compile:
        raise UsageError("--compile applies to --engine torch", "llama.cpp's decoding is compiled already")
    if shard is not None:
        raise UsageError("--engine llama.cpp runs in one process", "launch without torchrun/accelerate")
    source = resolve(load_cfg.model, offline=load_cfg.offline, allow_pickle=load_cfg.allow_pickle)
    check_family(load_cfg.model, source)
    quiet_transformers(out.settings.verbose)
    config = AutoConfig.from_pretrained(source.model_dir, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(source.model_dir, local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    frame = Frame(
        SimpleNamespace(config=config, generation_config=generation),
        load_tokenizer(source.tokenizer_dir, load_cfg.model),
        torch.device("cpu"),
    )
    # Built before the export: budgets the context can't hold are refused before any file is written.
    gen = LlamaCppGenerator(frame, None, cfg, warn=out.warn, time_first_token=summary)
    bindings()  # missing bindings fail before anything is exported
    kind = gguf_type(load_cfg.dtype, load_cfg.quantize)
    path = gguf_for(
        load_cfg.model,
        source,
        kind,
        offline=load_cfg.offline,
        allow_pickle=load_cfg.allow_pickle,
        on_export=lambda p: out.say(f"exporting {load_cfg.model} as {kind} GGUF for llama.cpp (once): {p}"),
    )
    threads = torch.get_num_threads()
    gen.runtime = LlamaCpp(path, context_length(config), threads)
    out.detail(f"engine: llama.cpp, {kind} ({path}), {threads} threads")
    return gen


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set this option on the command line (not its default, not an env var)."""
    return _source(ctx, name) == "COMMANDLINE"


def _source(ctx: typer.Context, name: str) -> str:
    """Where an option's value came from: COMMANDLINE, ENVIRONMENT, DEFAULT, … (click's names)."""
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else "DEFAULT"


def _remote(ctx: typer.Context, server: str, api_key: str | None, cfg: Any, options: dict[str, Any]) -> Any:
    """The server's model: load options don't apply, and saying so beats ignoring them."""
    from llmkit.errors import UsageError
    from llmkit.remote import RemoteGenerator

    local = {"device": "auto", "dtype": "auto", "quantize": None, "compile": False, "allow_pickle": False}
    for name, default in local.items():
        if options[name] != default:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} applies to a local model", "the server loaded its model: set it there")
    out.detail(f"server {server}")
    gen = RemoteGenerator(server, cfg, api_key=api_key)
    model, source = options["model"], _source(ctx, "model")
    if source not in ("COMMANDLINE", "ENVIRONMENT"):
        return gen  # no -m: whatever the server serves
    served = gen.served_models()
    if served is None or gen.serves(model, served):
        gen.model = model  # servers of several models (vLLM, say) pick by this name
        return gen
    names = ", ".join(served) or "no model"
    if source == "COMMANDLINE":
        raise UsageError(
            f"-m {model}: the server at {gen.url} serves {names}",
            "drop -m to use the server's model, or start a server with that model",
        )
    out.warn(f"LLMKIT_MODEL={model} is not used: the server at {gen.url} serves {names}")
    return gen


def _resume_hint(resume_output: str | None, prompts_done: int) -> str:
    """After Ctrl-C in an --input run: how to carry on from here."""
    if resume_output is not None:
        return (
            f"{prompts_done} prompt(s) written to {resume_output} by this run; "
            "the same command again continues after the last complete prompt"
        )
    return (
        f"{prompts_done} prompt(s) were written; to make a run resumable, write it with "
        "--format jsonl --resume-output FILE: the same command again then continues where it stopped"
    )


class _Sink:
    """Where samples go: stdout, or the JSONL file of --resume-output (appended to)."""

    def __init__(self, resume_output: str | None, samples_per_id: int, shard: Any = None) -> None:
        self.file = None
        self.shard_rank = shard.rank if shard is not None else 0
        self.done: set[str] = set()
        if resume_output is not None and shard is not None and shard.rank != 0:
            from pathlib import Path

            from llmkit.resumable import completed, id_key

            shard.barrier()  # the main process repairs the file first; the others only read it
            self.key, self.done = id_key, completed(Path(resume_output), samples_per_id)
        elif resume_output is not None:
            from pathlib import Path

            from llmkit.errors import OutputError
            from llmkit.resumable import completed, id_key

            self.key = id_key
            self.done = completed(Path(resume_output), samples_per_id)
            try:
                self.file = open(resume_output, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise OutputError(f"cannot write {resume_output}: {exc.strerror or exc}") from None
            if shard is not None:
                shard.barrier()

    def write(self, text: str) -> None:
        if self.shard_rank:
            return
        if self.file is None:
            out.write(text, flush=True)
        else:
            self.file.write(text)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _summary(gen, prompts: int, started: float) -> None:
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


def _shard(device: str):
    """Under torchrun / accelerate launch: this process's share of the prompts, and the gather."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    from llmkit.generation import Shard

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())

    def gather(done: dict) -> dict | None:
        parts = [None] * state.num_processes if state.is_main_process else None
        dist.gather_object(done, parts, dst=0)
        if parts is None:
            return None
        return {index: samples for part in parts for index, samples in part.items()}

    return Shard(state.process_index, state.num_processes, gather, state.wait_for_everyone)


def _rank_device(device: str) -> str:
    """Each process of a multi-GPU run takes its own GPU."""
    import os

    local = os.environ.get("LOCAL_RANK")
    if device == "auto" and local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local) % torch.cuda.device_count()}"
        return "cpu"
    return device
