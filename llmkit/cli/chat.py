"""`llmkit chat`: a conversation in the terminal, or one reply to a conversation piped in."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, get_args, get_type_hints

import typer

from llmkit.cli import _output as out
from llmkit.cli import generate as _generate
from llmkit.cli._inputs import stdin_is_terminal
from llmkit.cli._options import (
    AllowPickleOpt,
    ChatTemplateOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OfflineOpt,
    QuantizeOpt,
    load_config,
)

if TYPE_CHECKING:
    from llmkit.chat import Chat, Turn

EXAMPLES = """\b
Examples:
  llmkit chat -m HuggingFaceTB/SmolLM2-135M-Instruct --system "Answer in one sentence."
  echo "What is a haiku?" | llmkit chat -m HuggingFaceTB/SmolLM2-135M-Instruct --greedy
  llmkit chat --server http://127.0.0.1:8000 -t 0.7
"""
COMMANDS_HELP = """\
  /system TEXT  set the system message (/system alone shows it)
  /reset        forget the conversation (the system message stays)
  /save FILE    write the conversation as JSON lines of messages
  /exit         leave (or Ctrl-D); Ctrl-C stops a reply, a line ending in \\ goes on,
                and \"\"\" starts a block of lines that ends with \"\"\""""
PROMPT, MORE = ">>> ", "... "

# The sampling flags are generate's own (names, help, checks), so the two commands never drift.
_FLAGS = get_type_hints(_generate.generate, include_extras=True)


def _reworded(name: str, help: str) -> Any:
    """generate's flag with this command's help text."""
    kind, info = get_args(_FLAGS[name])
    info = copy.copy(info)
    info.help = help
    return Annotated[kind, info]


MaxNewTokensOpt = _reworded(
    "max_new_tokens", "The longest reply, in tokens (256, or a quarter of a context of 256 or less)."
)
MinNewTokensOpt = _FLAGS["min_new_tokens"]
TemperatureOpt = _FLAGS["temperature"]
TopKOpt = _FLAGS["top_k"]
TopPOpt = _FLAGS["top_p"]
MinPOpt = _FLAGS["min_p"]
TypicalPOpt = _FLAGS["typical_p"]
RepetitionPenaltyOpt = _FLAGS["repetition_penalty"]
NoRepeatNgramOpt = _FLAGS["no_repeat_ngram_size"]
GreedyOpt = _FLAGS["greedy"]
SeedOpt = _FLAGS["seed"]
StopOpt = _FLAGS["stop"]
KeepStopOpt = _FLAGS["keep_stop"]
ApiKeyOpt = _FLAGS["api_key"]


def chat(
    ctx: typer.Context,
    model: ModelOpt = "gpt2",
    system: Annotated[
        str | None, typer.Option("--system", help="The system message the conversation starts with.")
    ] = None,
    drop_oldest: Annotated[
        bool,
        typer.Option(
            "--drop-oldest",
            help="When the conversation no longer fits the context, drop its oldest turns (default: say so "
            "and stop).",
        ),
    ] = False,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar="LLMKIT_SERVER",
            help="Chat with the model of a running `llmkit serve` at this URL (no model load here).",
            show_default=False,
        ),
    ] = None,
    api_key: ApiKeyOpt = None,
    chat_template: ChatTemplateOpt = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    min_new_tokens: MinNewTokensOpt = 0,
    temperature: TemperatureOpt = 1.0,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = None,
    typical_p: TypicalPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    no_repeat_ngram_size: NoRepeatNgramOpt = 0,
    greedy: GreedyOpt = False,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    keep_stop: KeepStopOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Chat with a model through its chat template: a REPL on a terminal, one reply to piped input.

    Piped input is one conversation: JSON lines of {"role", "content"} messages, or plain text as one
    user message; the reply goes to stdout.
    """
    options = dict(locals())
    from llmkit.chat import Chat, read_conversation
    from llmkit.config import GenerateConfig

    cfg = GenerateConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        greedy=greedy,
        seed=seed,
        stop=[_generate._unescape(s) for s in stop or []],
        keep_stop=keep_stop,
    )
    interactive = stdin_is_terminal()
    # Piped input is read before the model loads: an empty or broken conversation fails fast.
    messages = None if interactive else read_conversation(sys.stdin.read())
    if server and chat_template is not None:
        from llmkit.errors import UsageError

        raise UsageError(
            "--chat-template is for a model loaded here, not one behind --server",
            "start the server with it: llmkit serve -m MODEL --chat-template NAME",
        )
    if server:
        from llmkit.chat import RemoteChat

        backend: Any = RemoteChat(_generate._remote(ctx, server, api_key, cfg, {**options, "compile": False}))
        name = server
    else:
        from llmkit.chat import LocalChat
        from llmkit.cli._loading import load_model, resolve_chat_template, use_chat_template

        template = resolve_chat_template(chat_template)
        lm = load_model(load_config(model, device, dtype, offline, allow_pickle, quantize))
        use_chat_template(lm, template, quantize)
        from llmkit.products import one_row_head

        one_row_head(lm.model, lm.device)  # after any resize: the copy is of the final head
        if max_new_tokens >= lm.context and not _generate._given(ctx, "max_new_tokens"):
            # The default reply length is not the user's choice: a small model gets a quarter of its context,
            # leaving the rest to the conversation.
            max_new_tokens = max(1, lm.context // 4)
            cfg = dataclasses.replace(cfg, max_new_tokens=max_new_tokens)
        backend = LocalChat(lm, cfg)
        name = f"{lm.source.name} (context {lm.context:,} tokens)"
    if backend.seed is not None:
        out.detail(f"seed {backend.seed}")
    conversation = Chat(backend, system=system, messages=messages, drop_oldest=drop_oldest)
    if interactive:
        _repl(conversation, name, max_new_tokens)
    else:
        turn = conversation.reply(_write)
        _write("\n")
        _notes(turn, max_new_tokens, interactive=False)


def _write(text: str) -> None:
    out.write(text, flush=True)


def _repl(conversation: Chat, name: str, max_new_tokens: int) -> None:
    """Read a message, stream the reply, until /exit or Ctrl-D."""
    from llmkit.errors import LlmkitError

    _line_editing()
    out.say(f"Chatting with {name}. /help for commands; Ctrl-D or /exit leaves.")
    while True:
        try:
            text = _read_message()
        except EOFError:
            sys.stderr.write("\n")
            return
        except KeyboardInterrupt:
            sys.stderr.write("\n(Ctrl-D or /exit leaves)\n")
            continue
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if _command(conversation, text.strip()):
                    return
                continue
            _turn(conversation, text, max_new_tokens)
        except LlmkitError as exc:
            out.error(exc)  # the conversation is as it was before this message: go on


def _turn(conversation: Chat, text: str, max_new_tokens: int) -> None:
    """One reply, streamed; Ctrl-C ends only the reply (and the message goes with it)."""
    with _ctrl_c_cancels() as cancel:
        try:
            turn = conversation.send(text, _write, cancel)
        except KeyboardInterrupt:  # a second Ctrl-C, when the first didn't stop it soon enough
            turn = None
    _write("\n")
    if turn is None or turn.finish_reason == "cancelled":
        out.say("(reply cancelled: neither it nor your message is kept)")
        return
    _notes(turn, max_new_tokens, interactive=True)


def _notes(turn: Turn, max_new_tokens: int, interactive: bool) -> None:
    """After a reply: what a user should know on a terminal; off one, only what changed the input."""
    if turn.dropped:
        dropped = f"dropped the {turn.dropped} oldest message(s) to fit the context (--drop-oldest)"
        if interactive:
            out.say(f"({dropped})")
        else:
            out.warn(dropped)
    if turn.finish_reason == "length":
        (out.say if interactive else out.detail)(f"(reply cut at --max-new-tokens {max_new_tokens})")
    reused = f", {turn.reused_tokens} of them from the last turn's cache" if turn.reused_tokens else ""
    out.detail(
        f"{turn.prompt_tokens} prompt tokens{reused}; "
        f"{turn.completion_tokens} new tokens in {turn.seconds:.2f}s"
    )


def _command(conversation: Chat, line: str) -> bool:
    """Run a slash command; True to leave."""
    from llmkit.errors import UsageError

    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return True
    if name in ("/help", "/?"):
        sys.stderr.write(COMMANDS_HELP + "\n")
    elif name == "/reset":
        conversation.reset()
        out.say("(conversation cleared)")
    elif name == "/system":
        if arg:
            conversation.set_system(arg)
            out.say("(system message set)")
        else:
            current = conversation.system
            out.say("(no system message)" if current is None else current)
    elif name == "/save":
        if not arg:
            raise UsageError("/save needs a file name", "e.g. /save chat.jsonl")
        count = conversation.save(arg)
        out.say(f"(saved {count} message(s) to {arg})")
    else:
        raise UsageError(f"unknown command {name}", "/help lists them")
    return False


def _read_message() -> str:
    """One message: a line, lines joined by a trailing backslash, or a \"\"\" block."""
    line = _input(PROMPT)
    if line.lstrip().startswith('"""'):
        first = line.lstrip()[3:].rstrip()
        if first.endswith('"""'):  # """all on one line"""
            return first[:-3]
        block = [first]
        while not block[-1].endswith('"""'):
            block.append(_input(MORE).rstrip())
        block[-1] = block[-1][:-3]
        return "\n".join(block).strip("\n")
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(_input(MORE))
    return "\n".join(lines)


def _input(prompt: str) -> str:
    # input() writes its prompt to stdout; that is the terminal itself when stdout is one (and then
    # readline needs it to redraw the line), but data when stdout is redirected: then stderr.
    if sys.stdout.isatty():
        return input(prompt)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def _line_editing() -> None:
    """Arrow keys and history for input(), where the platform has readline (importing it is enough)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401


@contextmanager
def _ctrl_c_cancels() -> Iterator[threading.Event]:
    """While a reply streams, Ctrl-C raises a flag the decoding loop checks; a second one interrupts."""
    cancel = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)
