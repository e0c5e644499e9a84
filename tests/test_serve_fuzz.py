"""One client can never fail another: bad and extreme requests next to a well-formed one.

Every answer to a generated request must be 2xx or a 4xx OpenAI error object, never a 5xx, and the
well-formed request decoded in the same batch always finishes as it would have alone.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import Server, with_chat_template

GOOD = {"prompt": "The cat", "max_tokens": 40, "min_tokens": 40, "temperature": 0}
FUZZ_BUDGET_S = 120  # past this, the remaining examples are skipped: the test is bounded in time too
FUZZ_EXAMPLES = 60


# A template that refuses some conversations itself, as many real ones do (roles must alternate…).
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def srv(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    chatty = with_chat_template(tiny_model, tmp_path_factory.mktemp("fuzz") / "chatty")
    config = json.loads((chatty / "tokenizer_config.json").read_text())
    (chatty / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    # 5 ms per step: the well-formed request is still decoding when the generated one joins it.
    server = Server("-m", chatty, env={"LLMKIT_TEST_STEP_DELAY": "0.005"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def solo(srv: Server) -> str:
    status, body = srv.post("/v1/completions", GOOD)
    assert status == 200
    return body["choices"][0]["text"]


def alongside(srv: Server, path: str, body: Any, raw: bytes | None = None) -> tuple[int, Any, int, Any]:
    """Send GOOD, then `body` while GOOD decodes; (status, answer) of both."""
    good: dict[str, Any] = {}

    def send_good() -> None:
        good["status"], good["body"] = srv.post("/v1/completions", GOOD)

    thread = threading.Thread(target=send_good)
    thread.start()
    time.sleep(0.03)
    status, answer = srv.post(path, body, raw=raw)
    thread.join(60)
    assert not thread.is_alive()
    return status, answer, good["status"], good["body"]


def assert_good(status: int, body: Any, solo: str) -> None:
    assert status == 200, body
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and choice["completion_tokens"] == 40
    assert choice["text"] == solo  # greedy; the README's batched-arithmetic caveat allows a rare flip


def assert_client_error_or_success(status: int, answer: Any) -> None:
    assert status < 500, answer
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
        assert answer["error"]["type"] == "invalid_request_error"


# -- the two requests, concurrently ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ({"prompt": "x", "repetition_penalty": 5e-324, "max_tokens": 5}, "repetition_penalty"),
        ({"prompt": "x", "repetition_penalty": 1e300, "max_tokens": 5}, "repetition_penalty"),
        ({"prompt": "x", "seed": 2**70, "max_tokens": 5}, "seed"),
        ({"prompt": "x", "logit_bias": {"99999": 5}, "max_tokens": 5}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"²": 5}, "max_tokens": 5}, "logit_bias"),
        ({"prompt": "a\ud800b", "max_tokens": 5}, "prompt"),
        ({"prompt": ["x"] * 40, "n": 100, "max_tokens": 1}, "n"),
    ],
)
def test_a_bad_request_is_refused_and_the_good_one_finishes(srv: Server, solo: str, bad, param) -> None:
    status, answer, good_status, good_body = alongside(srv, "/v1/completions", bad)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert_good(good_status, good_body, solo)


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": "x", "temperature": 1e-300, "max_tokens": 12, "min_tokens": 12},
        # A huge bias with a tiny temperature: greedy, so the biased token wins every step.
        {"prompt": "x", "temperature": 1e-9, "logit_bias": {"65": 100}, "max_tokens": 12, "min_tokens": 12},
    ],
)
def test_a_tiny_temperature_is_greedy(srv: Server, solo: str, bad) -> None:
    status, answer, good_status, good_body = alongside(srv, "/v1/completions", bad)
    assert status == 200, answer
    greedy = srv.post("/v1/completions", {**bad, "temperature": 0})[1]
    assert answer["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert_good(good_status, good_body, solo)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "top_p": Infinity}',
        b'{"prompt": "x", "presence_penalty": -Infinity}',
        b'{"prompt": "x", "temperature": 1e999}',
        b'{"prompt": "x", "logit_bias": {"1": NaN}}',
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"prompt": "\\ud800", "max_tokens": 2}',
        b'{"prompt": "x", "stop": ["' + b"s" * 5000 + b'"]}',
        b'{"prompt": "x", "max_tokens": 1' + b"0" * 4000 + b"}",
        b"[]",
        b'"just a string"',
    ],
)
def test_json_that_strict_parsers_refuse_is_a_400(srv: Server, solo: str, raw: bytes) -> None:
    status, answer, good_status, good_body = alongside(srv, "/v1/completions", None, raw=raw)
    assert status == 400, answer
    assert_client_error_or_success(status, answer)
    assert_good(good_status, good_body, solo)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "42"}],  # the template's own raise_exception
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],  # a text part that is no text
    ],
)
def test_messages_the_template_cannot_take_are_a_400(srv: Server, solo: str, messages) -> None:
    body = {"messages": messages, "max_tokens": 2}
    status, answer, good_status, good_body = alongside(srv, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "messages", answer
    assert_good(good_status, good_body, solo)


# -- property-based: requests generated from the schema the server declares --------------------------------
def wild() -> st.SearchStrategy[Any]:
    """JSON values that break naive arithmetic, parsing and text handling."""
    floats = st.one_of(
        st.sampled_from([5e-324, -5e-324, 1e-300, 1e-5, 0.0, -0.0, 1e300, -1e300, 1.7976931348623157e308]),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    ints = st.one_of(
        st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30]),
        st.integers(min_value=-(2**80), max_value=2**80),
    )
    text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
    scalars = st.one_of(st.none(), st.booleans(), floats, ints, text)
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.one_of(text, ints.map(str)), inner, max_size=4)
        ),
        max_leaves=8,
    )


def from_schema(schema: dict, components: dict) -> st.SearchStrategy[Any]:
    """Values valid by one property's JSON schema, as pydantic writes them (the subset it uses)."""
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
        return st.floats(low, high, exclude_min="exclusiveMinimum" in schema, allow_nan=False)
    if kind == "string":
        return st.text(st.characters(codec="utf-8"), max_size=schema.get("maxLength", 24))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), components)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object":
        props = schema.get("properties", {})
        if props:
            required = {k: from_schema(props[k], components) for k in schema.get("required", [])}
            optional = {k: from_schema(v, components) for k, v in props.items() if k not in required}
            return st.fixed_dictionaries(required, optional=optional)
        values = from_schema(schema.get("additionalProperties") or {}, components)
        return st.dictionaries(st.text(max_size=6), values, max_size=4)
    return wild()


def request_bodies(document: dict, name: str) -> st.SearchStrategy[dict]:
    """Bodies over `name`'s declared properties: each field valid by its own schema, or wild."""
    components = document["components"]["schemas"]
    schema = components[name]

    def field(prop: str) -> st.SearchStrategy[Any]:
        if prop in ("max_tokens", "max_completion_tokens"):  # bounded work: short, or refused
            return st.one_of(st.integers(0, 6), st.integers(min_value=10**6), wild())
        if prop == "n":
            return st.one_of(st.integers(1, 3), st.integers(min_value=129), st.integers(max_value=0), wild())
        return st.one_of(from_schema(schema["properties"][prop], components), wild())

    optional = {p: field(p) for p in schema["properties"] if p not in ("stream", "stream_options")}
    required = {p: field(p) for p in schema.get("required", [])}
    optional = {p: v for p, v in optional.items() if p not in required}
    return st.fixed_dictionaries(required, optional=optional).map(lambda body: {"max_tokens": 4, **body})


def test_generated_requests_never_fail_the_server_or_their_neighbour(srv: Server, solo: str) -> None:
    document = srv.get("/openapi.json")[1]
    started = time.monotonic()
    routes = st.one_of(
        st.tuples(st.just("/v1/completions"), request_bodies(document, "CompletionRequest")),
        st.tuples(st.just("/v1/chat/completions"), request_bodies(document, "ChatRequest")),
    )
    seen = {"sent": 0, "ok": 0}

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(routes)
    def check(route: tuple[str, dict]) -> None:
        if time.monotonic() - started > FUZZ_BUDGET_S:
            return
        path, body = route
        raw = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \ud800 escapes
        status, answer, good_status, good_body = alongside(srv, path, None, raw=raw)
        seen["sent"] += 1
        seen["ok"] += status < 300
        seen[f"{path} {status}"] = seen.get(f"{path} {status}", 0) + 1
        assert_client_error_or_success(status, answer)
        assert_good(good_status, good_body, solo)

    check()
    assert seen["sent"] >= 20, seen  # the time budget did not swallow the test
    assert seen["ok"] >= 5 and seen["sent"] - seen["ok"] >= 5, seen  # both kinds were exercised
    assert srv.get("/health")[1]["status"] == "ok"


# -- a failure inside one sequence ends that sequence only -------------------------------------------------
def test_a_failure_in_one_sequence_ends_it_alone(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever slips past validation and breaks one row's sampling must not touch its neighbours."""
    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.serve import sampling
    from llmkit.serve.engine import Chunk, Engine
    from llmkit.serve.sampling import SamplingParams

    engine = Engine(load(LoadConfig(model=str(tiny_model))), max_batch=4)
    ids = engine.tokenizer("The cat", add_special_tokens=False)["input_ids"]
    real_pick = sampling.Sampler.pick

    def pick(self, scores, context):  # seed 666's sampler breaks on its fourth token
        if self.params.seed == 666 and len(self.counts) >= 3:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_pick(self, scores, context)

    monkeypatch.setattr(sampling.Sampler, "pick", pick)

    def run(params: list[SamplingParams]) -> list[list[Chunk]]:
        got: list[list[Chunk]] = [[] for _ in params]
        done = threading.Semaphore(0)

        def deliver(i: int):
            def take(chunk: Chunk) -> None:
                got[i].append(chunk)
                if chunk.finish_reason or chunk.error:
                    done.release()

            return take

        engine.submit([engine.sequence(ids, p, deliver(i), seed=p.seed or 0) for i, p in enumerate(params)])
        for _ in params:
            assert done.acquire(timeout=60)
        return got

    good = SamplingParams(max_tokens=30, min_tokens=30, temperature=0)
    bad = SamplingParams(max_tokens=30, temperature=1.0, seed=666)
    engine.start()
    try:
        [alone] = run([good])
        together = run([good, bad, good])
    finally:
        engine.stop()
    text = "".join(c.text for c in alone)
    assert alone[-1].finish_reason == "length"
    for chunks in (together[0], together[2]):
        assert chunks[-1].finish_reason == "length" and chunks[-1].error is None
        assert "".join(c.text for c in chunks) == text
    assert isinstance(together[1][-1].error, RuntimeError)
    assert engine.stats()["running"] == 0


def test_a_list_of_prompts_samples_what_the_prompts_sent_one_by_one_would(srv: Server) -> None:
    """Choice k·n + j draws from seed + k·n + j: prompts in one request don't share their randomness."""
    body = {"max_tokens": 6, "min_tokens": 6, "n": 2, "temperature": 1.0}
    status, together = srv.post("/v1/completions", {**body, "prompt": ["The cat", "The cat"], "seed": 11})
    assert status == 200, together
    texts = [c["text"] for c in sorted(together["choices"], key=lambda c: c["index"])]
    first = srv.post("/v1/completions", {**body, "prompt": "The cat", "seed": 11})[1]
    second = srv.post("/v1/completions", {**body, "prompt": "The cat", "seed": 13})[1]
    alone = [c["text"] for c in first["choices"] + second["choices"]]
    assert texts == alone
    assert texts[:2] != texts[2:]  # the same prompt twice in a list is sampled twice, not copied
