"""The OpenAI request bodies llmkit serves, as pydantic models (what FastAPI validates against).

Strict types: a string where a number belongs is an error, not a guess. Ranges are OpenAI's where
it has them; llmkit's own sampling options carry the CLI's names, and every number has a range
that keeps the sampling arithmetic finite (the CLI refuses the same values: llmkit.config).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from llmkit.config import REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN, SEED_MAX, SEED_MIN

MAX_N = 128
MAX_STOP = 16
MAX_STOP_CHARS = 1000
MAX_PROMPTS = 2048  # also the most choices (prompts × n) one request may ask for
MAX_LOGIT_BIAS = 1024
MAX_INT = 2**31 - 1  # counts (tokens, top_k) past this are no request a model can serve
TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _valid_unicode(value: str) -> str:
    # JSON can spell lone surrogates ("\ud800"); they are not text and no tokenizer takes them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone surrogate at character {exc.start}, which is not valid Unicode"
        ) from None
    return value


def _document(keywords: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    """Adds what a field validator checks to the field's JSON schema (GET /openapi.json shows it).

    `keywords(branch)` gives the keywords for each branch of the field's union (its `anyOf`).
    """

    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            branch.update(keywords(branch))

    return extra


def _stop_keywords(branch: dict[str, Any]) -> dict[str, Any]:
    text = {"minLength": 1, "maxLength": MAX_STOP_CHARS}
    if branch.get("type") == "array":
        return {"maxItems": MAX_STOP, "items": {**branch["items"], **text}}
    return text if branch.get("type") == "string" else {}


def _bias_keywords(branch: dict[str, Any]) -> dict[str, Any]:
    if branch.get("type") != "object":
        return {}
    return {"propertyNames": {"pattern": f"^{TOKEN_ID.pattern}$"}, "maxProperties": MAX_LOGIT_BIAS}


def _prompt_keywords(branch: dict[str, Any]) -> dict[str, Any]:
    if branch.get("type") != "array":
        return {}
    items = branch["items"]
    if items.get("type") == "array":  # prompts of token ids: none empty
        items = {**items, "minItems": 1}
    return {"minItems": 1, "maxItems": MAX_PROMPTS, "items": items}


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = list[Annotated[int, Field(ge=0, le=MAX_INT)]]
Prompt = Text | list[Text] | TokenIds | list[TokenIds]


class Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_INT)
    temperature: float = Field(
        1.0, ge=0, le=2, description="0 (or below 1e-5, as vLLM has it) is greedy decoding."
    )
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Text | list[Text] | None = Field(
        None,
        description=f"Up to {MAX_STOP} strings of 1–{MAX_STOP_CHARS} characters.",
        json_schema_extra=_document(_stop_keywords),
    )
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None,
        description=f"Token id (a decimal string) → bias in [-100, 100]; at most {MAX_LOGIT_BIAS}.",
        json_schema_extra=_document(_bias_keywords),
    )
    user: Text | None = None
    # llmkit's own, named as on the command line.
    top_k: int = Field(0, ge=0, le=MAX_INT)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)
    min_tokens: int = Field(0, ge=0, le=MAX_INT)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences cannot be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float]:
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        for key in value or {}:
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys are token ids (decimal digits); got {key!r}")
        return value or {}


class CompletionRequest(Sampling):
    prompt: Prompt = Field("", json_schema_extra=_document(_prompt_keywords))
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt list is empty")
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(v, list) and not v for v in value):
                raise ValueError("a prompt of token ids is empty")
        return value


class ContentPart(BaseModel):
    """A part of a message's content; only text parts reach the model."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Text
    text: Text | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_INT)
