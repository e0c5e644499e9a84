"""What the server sends, as pydantic models, and the OpenAPI document built from them.

The routes build plain dicts (completions.py, chat.py): these models exist for `GET /openapi.json`,
so a client generator or an API tester reads what really comes back. `tests/test_serve_openapi.py`
checks real answers against the served document, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from llmkit.serve.schemas import ChatRequest, CompletionRequest

REF = "#/components/schemas/{model}"


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _sometimes() -> Any:
    """A field that is left out, not null, when it has nothing to say."""
    return Field(None, json_schema_extra=_no_default)


class Sent(BaseModel):
    """Every field the server sends is declared: an undeclared one fails the document's test."""

    model_config = ConfigDict(extra="forbid")


FinishReason = Literal["stop", "length"]


class Usage(Sent):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class CompletionLogprobs(Sent):
    """The legacy completions `logprobs`: four lists aligned token by token."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first token of an echoed prompt.")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="The most likely tokens at each position (the chosen one among them)."
    )
    text_offset: list[int] = Field(description="Where each token's text starts in the choice's text.")


class CompletionChoice(Sent):
    text: str
    index: int = Field(ge=0)
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    # Beyond OpenAI (its clients ignore them).
    stop_reason: str | None = Field(description="The stop string that ended the choice (null otherwise).")
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class Completion(Sent):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(Sent):
    text: str
    index: int = Field(ge=0)
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    # On a choice's last chunk only.
    stop_reason: str | None = _sometimes()
    prompt_tokens: int = _sometimes()
    completion_tokens: int = _sometimes()


class CompletionChunk(Sent):
    """One `data:` event of a streamed completion; the last, with `include_usage`, has no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage = _sometimes()


class TopLogprob(Sent):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Sent):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Sent):
    content: list[TokenLogprob]


class AssistantMessage(Sent):
    role: Literal["assistant"]
    content: str


class ChatChoice(Sent):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(Sent):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Sent):
    content: str
    role: Literal["assistant"] = _sometimes()  # on a choice's first chunk


class ChatChunkChoice(Sent):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Sent):
    """One `data:` event of a streamed chat completion; the last, with `include_usage`, has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage = _sometimes()


class ModelCard(Sent):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Sent):
    object: Literal["list"]
    data: list[ModelCard]


class Health(Sent):
    status: Literal["ok"]
    model: str
    chat_template: bool = Field(description="Whether /v1/chat/completions can take messages.")
    running: int = Field(ge=0, description="Sequences decoding now.")
    waiting: int = Field(ge=0, description="Sequences queued for a place in the batch.")
    steps: int = Field(ge=0, description="Decoding steps since start.")
    tokens_generated: int = Field(ge=0)
    threads: dict[str, int] = Field(
        description='CPU threads chosen for decoding steps, by batch size ("1", "2-3", …), once measured.'
    )


class ErrorDetail(Sent):
    message: str
    type: str = Field(examples=["invalid_request_error", "not_found_error", "server_error"])
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str | None = Field(examples=["invalid_value", "context_length_exceeded", "invalid_api_key"])


class ErrorResponse(Sent):
    """OpenAI's error object: every status other than 200 carries one."""

    error: ErrorDetail


REQUESTS: list[type[BaseModel]] = [CompletionRequest, ChatRequest]
MODELS: list[type[BaseModel]] = [
    Completion,
    CompletionChunk,
    ChatCompletion,
    ChatCompletionChunk,
    ModelList,
    Health,
    ErrorResponse,
]


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(model)}}}


def ok(model: type[BaseModel], description: str) -> dict[int, dict[str, Any]]:
    return {200: _json(model, description)}


def streamed(body: type[BaseModel], chunk: type[BaseModel]) -> dict[int, dict[str, Any]]:
    """A 200 that is one JSON body, or server-sent events with `"stream": true`.

    OpenAPI 3.1 has no keyword for a sequence of events, so the event stream's schema is that of each
    event's data: a chunk, or an error object if generation fails mid-stream.
    """
    events = {"anyOf": [ref(chunk), ref(ErrorResponse)]}
    return {
        200: {
            "description": f"The {body.__name__}; with `stream: true`, server-sent events: one `data: "
            f"<json>` line per {chunk.__name__} (or an ErrorResponse if generation fails part way), "
            "then `data: [DONE]`.",
            "content": {"application/json": {"schema": ref(body)}, "text/event-stream": {"schema": events}},
        }
    }


ERRORS = {
    400: "A request field is wrong (`param` names it), the body is not JSON, or the prompt does not fit.",
    401: "No `Authorization: Bearer <key>`, or the wrong key (the server runs with --api-key).",
    404: "No such path.",
    405: "The path exists but not with this method; `Allow` lists the methods it takes.",
    413: "The request body is larger than --max-body-mb.",
    500: "Generation failed, or a bug in llmkit.",
    503: "The decoding worker has stopped.",
}


def errors(*statuses: int) -> dict[int, dict[str, Any]]:
    return {status: _json(ErrorResponse, ERRORS[status]) for status in statuses}


def install(app: FastAPI, bearer: bool) -> None:
    """Serve a document with these models, the 404 and 405 any path can give, and no 422.

    FastAPI declares a 422 with its own HTTPValidationError on every route with a body; this server
    answers invalid requests with a 400 and OpenAI's error object instead (errors.py).
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for methods in doc["paths"].values():
            for operation in methods.values():
                operation["responses"].pop("422", None)
                if bearer and "401" in operation["responses"]:
                    operation["security"] = [{"bearer": []}]
        # pydantic's own schemas, the request bodies' too: FastAPI's copies have every bound turned into
        # a float (2**63 - 1 becomes 2**63, which the server refuses).
        models = [(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in MODELS]
        schemas.update(models_json_schema(models, ref_template=REF)[1]["$defs"])
        components["responses"] = {
            "NotFound": _json(ErrorResponse, ERRORS[404]),
            "MethodNotAllowed": {
                **_json(ErrorResponse, ERRORS[405]),
                "headers": {"Allow": {"schema": {"type": "string"}, "required": True}},
            },
        }
        if bearer:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
