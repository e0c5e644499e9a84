"""`llmkit serve`: keep a model warm behind the OpenAI API (completions, chat, models, health)."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli import _output as out
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

EXAMPLES = """\b
Examples:
  llmkit serve -m tiny-shakespeare --port 8000      # then open http://127.0.0.1:8000/
  llmkit generate --server http://127.0.0.1:8000 "ROMEO:" -n 40
  curl -s localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 20}'
"""


def serve(
    model: ModelOpt = "gpt2",
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port; 0 picks a free one (the ready line says which).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LLMKIT_API_KEY",
            help="Require `Authorization: Bearer KEY` on /v1 requests.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Sequences decoded together at most; more wait their turn (default: 16 on CPU, 64 on CUDA).",
            show_default=False,
        ),
    ] = None,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body accepted.")] = 8.0,
    ui: Annotated[
        bool, typer.Option("--ui/--no-ui", help="Serve the playground page at / (--no-ui: the API only).")
    ] = True,
    chat_template: ChatTemplateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    offline: OfflineOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Serve a model over the OpenAI API until Ctrl-C (or SIGTERM)."""
    from llmkit.errors import UsageError

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port", "use 0–65535 (0 picks a free one)")
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if max_body_mb <= 0:
        raise UsageError("--max-body-mb must be positive")
    from llmkit.cli._loading import resolve_chat_template
    from llmkit.serve import server

    template = resolve_chat_template(chat_template)  # a bad file fails before the port is taken
    sock = server.bind(host, port)  # before loading: a taken port fails in a second, not after the model
    from llmkit.serve.app import create_app

    config = load_config(model, device, dtype, offline, allow_pickle, quantize)
    engine = _engine(config, template, batch_size)
    if engine.weight_left_layers:
        out.detail(
            f"{engine.weight_left_layers} float32 layers multiply batches with the weight on the left "
            "(faster on this CPU)"
        )
    access = out.console().print if out.settings.verbose else None
    app = create_app(engine, model, api_key, int(max_body_mb * 2**20), access_log=_plain(access), ui=ui)
    engine.start()
    code = server.run(
        app,
        sock,
        on_ready=lambda: out.say(f"listening on {server.url(sock)} ({model})"),
        on_stop=lambda: engine.stop(server.GRACE_S),
    )
    if code:
        raise typer.Exit(code)


def _engine(config, template, batch_size: int | None):
    """The engine in a child process (the default), or in this one (LLMKIT_SERVE_ENGINE=thread)."""
    from llmkit.serve import process

    settings = out.settings
    setup = process.Setup(config, template, batch_size, settings.verbose, settings.quiet, out.debug_enabled())
    if process.in_process():
        return process.build(setup)
    return process.EngineProcess(setup)


def _plain(print_fn):
    if print_fn is None:
        return None
    return lambda line: print_fn(line, markup=False, highlight=False)
