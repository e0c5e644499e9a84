"""The HTTP routes. They validate, hand requests to completions.py and shape nothing themselves."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from llmkit.serve import chat, completions, errors
from llmkit.serve import responses as doc
from llmkit.serve import ui as ui_page
from llmkit.serve.engine import Engine
from llmkit.serve.errors import APIError
from llmkit.serve.schemas import ChatRequest, CompletionRequest

DEFAULT_MAX_BODY = 8 * 2**20


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    access_log: Callable[[str], None] | None = None,
    ui: bool = True,
) -> FastAPI:
    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None)
    errors.install(app)
    doc.install(app, bearer=api_key is not None)  # GET /openapi.json: what is really sent
    auth = (401,) if api_key is not None else ()
    started = int(time.time())

    def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    app.add_middleware(_BodyLimit, limit=max_body)
    if access_log is not None:
        app.add_middleware(_AccessLog, log=access_log)

    @app.get(
        "/health",
        operation_id="health",
        response_model=None,
        responses={**doc.ok(doc.Health, "Serving."), **doc.errors(503)},
    )
    async def health() -> JSONResponse:
        if not engine.alive:
            return errors.response(503, "the decoding worker has stopped", "server_error")
        chat_template = bool(getattr(engine.tokenizer, "chat_template", None))
        return JSONResponse(
            {"status": "ok", "model": model_name, "chat_template": chat_template, **engine.stats()}
        )

    if ui:  # the playground: a static page, no key needed to load it (it asks for one when the API does)
        page = ui_page.page()

        @app.get("/", include_in_schema=False)
        async def playground() -> HTMLResponse:
            return HTMLResponse(page, headers=ui_page.HEADERS)

    @app.get(
        "/v1/models",
        operation_id="listModels",
        dependencies=[Depends(authorized)],
        response_model=None,
        responses={**doc.ok(doc.ModelList, "The one model this server serves."), **doc.errors(*auth)},
    )
    async def models() -> dict[str, Any]:
        entry = {"id": model_name, "object": "model", "created": started, "owned_by": "llmkit"}
        return {"object": "list", "data": [entry]}

    @app.post(
        "/v1/completions",
        operation_id="createCompletion",
        dependencies=[Depends(authorized)],
        response_model=None,
        responses={**doc.streamed(doc.Completion, doc.CompletionChunk), **doc.errors(400, *auth, 413, 500)},
    )
    async def create_completion(req: CompletionRequest, request: Request) -> Any:
        run, lengths = completions.completion_run(engine, req, model_name)
        run.start()
        logprobs = req.logprobs is not None
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))

            def render(index: int, chunk: Any) -> dict[str, Any]:
                return completions.completion_chunk(run, index, chunk, logprobs)

            return _sse(run, render, lambda: run.usage(lengths) if usage else None)
        async for _ in run.chunks(request.is_disconnected):
            pass
        return completions.completion_body(run, logprobs, lengths)

    @app.post(
        "/v1/chat/completions",
        operation_id="createChatCompletion",
        dependencies=[Depends(authorized)],
        response_model=None,
        responses={
            **doc.streamed(doc.ChatCompletion, doc.ChatCompletionChunk),
            **doc.errors(400, *auth, 413, 500),
        },
    )
    async def create_chat_completion(req: ChatRequest, request: Request) -> Any:
        run, lengths = chat.chat_run(engine, req, model_name)
        run.start()
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            render = chat.chunk_renderer(run, req)
            return _sse(run, render, lambda: run.usage(lengths) if usage else None)
        async for _ in run.chunks(request.is_disconnected):
            pass
        return chat.body(run, req, lengths)

    return app


def _sse(
    run: completions.Run, render: Callable[[int, Any], dict], usage: Callable[[], Any]
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for index, chunk in run.chunks():
                yield f"data: {json.dumps(render(index, chunk), ensure_ascii=False)}\n\n"
            extra = usage()
            if extra is not None:
                kind = "chat.completion.chunk" if run.kind == "chat.completion" else run.kind  # as OpenAI's
                body = {"id": run.id, "object": kind, "created": run.created, "model": run.model}
                yield f"data: {json.dumps({**body, 'choices': [], 'usage': extra})}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:
            run.cancel()  # the client went away mid-stream (or we are done): free its rows
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _BodyLimit:
    """Refuse bodies over `limit` bytes with 413, whether or not they announce their length.

    Bodies are read as JSON whatever their content type says: `curl -d` labels them as a form.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            headers[b"content-type"] = b"application/json"
            scope = {**scope, "headers": list(headers.items())}
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _drain(receive, DRAIN_FACTOR * self.limit)
            await _too_large(self.limit, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _drain(receive, DRAIN_FACTOR * self.limit)
            await _too_large(self.limit, send)


class _TooLarge(Exception):
    pass


# A refused body is read (and dropped) up to this many times the limit before answering: closing a
# connection with unread data in it resets it, and the client loses the 413 it was sent. Past that,
# a client still sending is dropped without ceremony.
DRAIN_FACTOR = 8


async def _drain(receive: Callable, budget: int) -> None:
    while budget > 0:
        message = await receive()
        budget -= len(message.get("body", b""))
        if message.get("type") != "http.request" or not message.get("more_body", False):
            return


async def _too_large(limit: int, send: Callable) -> None:
    response = errors.response(413, f"request body larger than {limit} bytes", "invalid_request_error")
    await response({"type": "http"}, None, send)  # type: ignore[arg-type]


class _AccessLog:
    """`-v`: one line per request on stderr (client, method, path, status, seconds)."""

    def __init__(self, app: Any, log: Callable[[str], None]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def tap(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tap)
        finally:
            client = (scope.get("client") or ("-", 0))[0]
            seconds = time.perf_counter() - started
            self.log(f'{client} "{scope["method"]} {scope["path"]}" {status} {seconds:.3f}s')
            sys.stderr.flush()
