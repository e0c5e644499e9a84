"""/v1/chat/completions: the tokenizer's chat template makes the prompt; the rest is a completion."""

from __future__ import annotations

from typing import Any

from llmkit.serve.completions import Run, check_budget, choice_seed, sampling_params
from llmkit.serve.engine import Chunk, Engine, TokenInfo
from llmkit.serve.errors import APIError
from llmkit.serve.schemas import ChatRequest


def chat_run(engine: Engine, req: ChatRequest, model: str) -> tuple[Run, list[int]]:
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(
            400,
            f"this model ({model}) has no chat template, so it cannot take chat messages; "
            "use /v1/completions with a plain prompt, or start the server with --chat-template chatml "
            "(or zephyr, or a FILE.jinja)",
            param="messages",
            code="no_chat_template",
        )
    conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        ids = list(
            tok.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    except Exception as exc:  # the template's own refusals (jinja2's raise_exception, bad roles)
        raise APIError(
            400, f"the chat template refused these messages: {exc}", param="messages", code="invalid_value"
        ) from exc
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = limit if limit is not None else engine.context - len(ids)
    check_budget(engine, len(ids), max_tokens)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(engine, req, max_tokens, logprobs, echo=False)
    run = Run(engine, "chat.completion", model)
    for j in range(req.n):
        run.add(ids, None, params, choice_seed(req.seed, j))
    return run, [len(ids)]


def _logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": list(t.text.encode("utf-8")),
                "top_logprobs": [
                    {"token": k, "logprob": v, "bytes": list(k.encode("utf-8"))}
                    for k, v in (t.top or {}).items()
                ],
            }
            for t in tokens
        ]
    }


def body(run: Run, req: ChatRequest, lengths: list[int]) -> dict[str, Any]:
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": _logprobs(c.tokens) if req.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in run.choices
    ]
    return {
        "id": run.id,
        "object": "chat.completion",
        "created": run.created,
        "model": run.model,
        "choices": choices,
        "usage": run.usage(lengths),
    }


def chunk_renderer(run: Run, req: ChatRequest):
    started: set[int] = set()

    def render(index: int, chunk: Chunk) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": chunk.text}
        if index not in started:
            started.add(index)
            delta["role"] = "assistant"
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": _logprobs(chunk.tokens) if req.logprobs else None,
            "finish_reason": chunk.finish_reason,
        }
        return {
            "id": run.id,
            "object": "chat.completion.chunk",
            "created": run.created,
            "model": run.model,
            "choices": [choice],
        }

    return render
