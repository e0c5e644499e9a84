"""`GET /openapi.json` tells the truth: real answers of every route, success and each error, validate
against the schemas of the document the server itself serves (JSON Schema 2020-12, as OpenAPI 3.1)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch
from jsonschema import Draft202012Validator
from serving import Server, with_chat_template

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "The cat"}]


@pytest.fixture(scope="module")
def srv(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    model = with_chat_template(tiny_model, tmp_path_factory.mktemp("openapi") / "chat")
    server = Server("-m", model, "--api-key", KEY, "--max-body-mb", "0.01")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def document(srv: Server) -> dict[str, Any]:
    status, doc = srv.get("/openapi.json")
    assert status == 200
    return doc


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for `schema`, its `$ref`s resolved against the document's components."""
    return Draft202012Validator({**schema, "components": doc["components"]})


def assert_valid(doc: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(doc, schema).iter_errors(instance)]
    assert not errors, f"{json.dumps(instance)[:400]} does not match {schema}:\n" + "\n".join(errors)


def declared(doc: dict[str, Any], method: str, path: str, status: int, media: str = "application/json"):
    return doc["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]


def request(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of any request; the connection is closed after it."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def events(server: Server, path: str, body: dict) -> list[Any]:
    """The `data:` events of a streamed request, [DONE] included, as the server sent them."""
    status, headers, raw = request(server, "POST", path, json.dumps({**body, "stream": True}).encode(), AUTH)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    data = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# -- the document --------------------------------------------------------------------------------------------
def test_the_document_declares_openai_errors_and_every_schema_is_valid(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    assert (
        "422" not in json.dumps(document) and "HTTPValidationError" not in document["components"]["schemas"]
    )
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = document["paths"][path]["post"]
        assert set(operation["responses"]) == {"200", "400", "401", "413", "500"}
        assert operation["security"] == [{"bearer": []}]
        for status in (400, 401, 413, 500):
            assert declared(document, "post", path, status) == error
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert declared(document, "get", "/health", 503) == error
    assert "security" not in document["paths"]["/health"]["get"]  # health is open
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert document["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"]["required"]


def test_request_schemas_are_pydantics_with_their_ranges(document: dict[str, Any]) -> None:
    from llmkit.serve.schemas import ChatRequest, CompletionRequest

    schemas = document["components"]["schemas"]
    for model in (CompletionRequest, ChatRequest):
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, schema in {**own.pop("$defs", {}), model.__name__: own}.items():
            assert schemas[name] == schema, name
    temperature = schemas["CompletionRequest"]["properties"]["temperature"]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert set(schemas["Message"]["properties"]["role"]["enum"]) >= {"system", "user", "assistant"}


# A well-formed request with one field changed: accepted by the server exactly when the document
# says it is valid. Each is cheap (one token) and none fails a check the schema cannot express.
BASE = {"prompt": "The", "max_tokens": 1}
PROBES = [
    {},
    {"temperature": 2},
    {"temperature": 2.5},
    {"temperature": -0.1},
    {"temperature": "1"},
    {"top_p": 0},
    {"top_p": 1},
    {"n": 0},
    {"n": 2},
    {"logprobs": 5},
    {"logprobs": 6},
    {"max_tokens": "1"},
    {"max_tokens": -1},
    {"presence_penalty": 2.5},
    {"stream": "yes"},
    {"prompt": ["The", "A"]},
    {"prompt": [1, 2]},
    {"prompt": [[1], [2, 3]]},
    {"prompt": [1.5]},
    {"prompt": [-1]},
    {"prompt": []},
    {"prompt": [[1], []]},
    {"prompt": ["a"] * 2049},
    {"stop": "\n"},
    {"stop": ["a", "b"]},
    {"stop": 5},
    {"stop": ""},
    {"stop": ["a", ""]},
    {"stop": ["a"] * 17},
    {"stop": "a" * 1001},
    {"logit_bias": {"1": 5}},
    {"logit_bias": {"1": 101}},
    {"logit_bias": {"1": "5"}},
    {"logit_bias": {"cat": 5}},
    {"logit_bias": {"12345678901": 5}},
    {"logit_bias": {str(i): 1 for i in range(1025)}},
    {"echo": 1},
    {"seed": 2**63 - 1},
    {"seed": 2**63},
]


@pytest.mark.parametrize("change", PROBES, ids=[json.dumps(p)[:40] for p in PROBES])
def test_the_request_schema_accepts_what_the_server_accepts(srv: Server, document, change: dict) -> None:
    body = {**BASE, **change}
    schema_says = validator(document, {"$ref": "#/components/schemas/CompletionRequest"}).is_valid(body)
    status, answer = srv.post("/v1/completions", body, AUTH)
    assert status in (200, 400), answer
    assert (status == 200) == schema_says, answer
    assert_valid(document, declared(document, "post", "/v1/completions", status), answer)


# -- what the server sends -----------------------------------------------------------------------------------
def test_successful_answers_match_the_document(srv: Server, document: dict[str, Any]) -> None:
    status, health = srv.get("/health")
    assert status == 200 and health["chat_template"] is True
    assert_valid(document, declared(document, "get", "/health", 200), health)
    status, models = srv.get("/v1/models", AUTH)
    assert status == 200
    assert_valid(document, declared(document, "get", "/v1/models", 200), models)
    greedy = {"prompt": "The cat", "max_tokens": 8, "temperature": 0}
    completions = [
        greedy,
        {"prompt": ["The cat", "A dog"], "max_tokens": 4, "n": 2, "logprobs": 2, "echo": True, "seed": 1},
    ]
    for body in completions:
        status, answer = srv.post("/v1/completions", body, AUTH)
        assert status == 200, answer
        assert_valid(document, declared(document, "post", "/v1/completions", 200), answer)
    assert answer["choices"][0]["logprobs"]["token_logprobs"][0] is None  # the echoed prompt's first token
    text = srv.post("/v1/completions", greedy, AUTH)[1]["choices"][0]["text"]
    status, stopped = srv.post("/v1/completions", {**greedy, "stop": [text[2:4]]}, AUTH)
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["choices"][0]["stop_reason"]
    assert_valid(document, declared(document, "post", "/v1/completions", 200), stopped)
    chats = [
        {"messages": CHAT, "max_tokens": 4, "seed": 2},
        {"messages": CHAT, "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 3, "seed": 2},
    ]
    for body in chats:
        status, answer = srv.post("/v1/chat/completions", body, AUTH)
        assert status == 200, answer
        assert_valid(document, declared(document, "post", "/v1/chat/completions", 200), answer)
    assert answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


@pytest.mark.parametrize(
    ("path", "body", "chunk"),
    [
        (
            "/v1/completions",
            {"prompt": ["The cat", "A"], "n": 2, "logprobs": 2, "echo": True},
            "CompletionChunk",
        ),
        ("/v1/completions", {"prompt": "The cat", "stop": [" "], "temperature": 0}, "CompletionChunk"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "n": 2, "logprobs": True, "top_logprobs": 2},
            "ChatCompletionChunk",
        ),
    ],
)
def test_every_streamed_chunk_matches_the_document(srv: Server, document, path: str, body, chunk) -> None:
    body = {**body, "max_tokens": 6, "seed": 3, "stream_options": {"include_usage": True}}
    sent = events(srv, path, body)
    declared_events = declared(document, "post", path, 200, "text/event-stream")
    assert {"$ref": f"#/components/schemas/{chunk}"} in declared_events["anyOf"]
    for event in sent:
        assert_valid(document, {"$ref": f"#/components/schemas/{chunk}"}, event)  # none is an error here
        assert_valid(document, declared_events, event)
    assert sent[-1]["choices"] == [] and sent[-1]["usage"]["completion_tokens"] > 0
    assert any(c.get("finish_reason") for e in sent for c in e["choices"])


def test_errors_match_the_document(srv: Server, document: dict[str, Any]) -> None:
    post = "/v1/completions"
    cases = [
        (400, post, json.dumps({"prompt": "x", "temperature": 5}).encode(), AUTH),
        (400, post, b"{bad", AUTH),
        (400, post, json.dumps({"prompt": "word " * 300, "max_tokens": 5}).encode(), AUTH),
        (400, "/v1/chat/completions", json.dumps({"messages": [{"role": "robot"}]}).encode(), AUTH),
        (401, post, json.dumps({"prompt": "x"}).encode(), {}),
        (
            401,
            "/v1/chat/completions",
            json.dumps({"messages": CHAT}).encode(),
            {"Authorization": "Bearer no"},
        ),
        (413, post, json.dumps({"prompt": "a" * 20_000}).encode(), AUTH),
    ]
    for status, path, body, headers in cases:
        got, _, raw = request(srv, "POST", path, body, headers)
        assert got == status, raw
        assert_valid(document, declared(document, "post", path, status), json.loads(raw))
    got, _, raw = request(srv, "GET", "/v1/models", headers={})
    assert got == 401
    assert_valid(document, declared(document, "get", "/v1/models", 401), json.loads(raw))


def test_unknown_paths_and_methods_match_the_document(srv: Server, document: dict[str, Any]) -> None:
    responses = document["components"]["responses"]
    got, _, raw = request(srv, "GET", "/v1/nothing", headers=AUTH)
    assert got == 404
    assert_valid(document, responses["NotFound"]["content"]["application/json"]["schema"], json.loads(raw))
    for method, path in [
        ("TRACE", "/health"),
        ("POST", "/health"),
        ("GET", "/v1/completions"),
        ("DELETE", "/v1/models"),
    ]:
        got, headers, raw = request(srv, method, path, headers=AUTH)
        assert got == 405, raw
        allowed = {m.strip() for m in headers["allow"].split(",")}
        assert allowed == {m.upper() for m in document["paths"][path]}  # what the document says it takes
        schema = responses["MethodNotAllowed"]["content"]["application/json"]["schema"]
        assert_valid(document, schema, json.loads(raw))


def test_failures_while_generating_and_a_stopped_worker_match_the_document(
    tiny_model: Path, monkeypatch
) -> None:
    from fastapi.testclient import TestClient

    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.serve.app import create_app
    from llmkit.serve.engine import Engine

    engine = Engine(load(LoadConfig(model=str(tiny_model))), max_batch=4)
    real = engine.model
    fail = {"next": False}

    def flaky(**kwargs):
        if fail["next"]:
            fail["next"] = False
            raise torch.OutOfMemoryError("simulated: out of memory")
        return real(**kwargs)

    monkeypatch.setattr(engine, "model", flaky)
    engine.start()
    try:
        with TestClient(create_app(engine, "tiny")) as client:
            doc = client.get("/openapi.json").json()
            assert "401" not in json.dumps(doc["paths"]) and "securitySchemes" not in doc["components"]
            body = {"prompt": "The cat", "max_tokens": 5}
            fail["next"] = True
            failed = client.post("/v1/completions", json=body)
            assert failed.status_code == 500
            assert_valid(doc, declared(doc, "post", "/v1/completions", 500), failed.json())
            fail["next"] = True
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
                data = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
            assert data[-1] == "[DONE]" and "error" in json.loads(data[-2])
            for event in data[:-1]:
                assert_valid(
                    doc, declared(doc, "post", "/v1/completions", 200, "text/event-stream"), json.loads(event)
                )
            engine.stop()
            stopped = client.get("/health")
            assert stopped.status_code == 503
            assert_valid(doc, declared(doc, "get", "/health", 503), stopped.json())
    finally:
        engine.stop()
