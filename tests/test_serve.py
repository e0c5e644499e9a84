"""`llmkit serve` as a real subprocess on a free loopback port, driven by real clients."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from serving import Server, with_chat_template
from transformers import AutoModelForCausalLM, AutoTokenizer

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv(tiny_model: Path):
    server = Server("-m", tiny_model, "--api-key", KEY, "--max-body-mb", "1")
    yield server
    assert server.stop() == 143


@pytest.fixture(scope="module")
def slow(tiny_model: Path):
    """20 ms per decoding step: long enough to act while a request is in flight."""
    server = Server("-m", tiny_model, env={"LLMKIT_TEST_STEP_DELAY": "0.02"})
    yield server
    server.stop()


def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference_greedy(model_dir: Path, prompt: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids["input_ids"].shape[1] :])


def sse(server: Server, body: dict, headers: dict | None = None, stop_after: int | None = None) -> list:
    """The data events of a streamed request (`stop_after` events, then hang up)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    assert response.status == 200
    events = []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
        if events[-1] == "[DONE]" or (stop_after is not None and len(events) >= stop_after):
            break
    conn.close()
    return events


# -- the API through the official client -----------------------------------------------------------------
def test_openai_client_completions(srv: Server, tiny_model: Path) -> None:
    api = client(srv)
    assert [m.id for m in api.models.list().data] == [str(tiny_model)]
    greedy = api.completions.create(
        model="tiny", prompt="The cat", max_tokens=8, temperature=0, extra_body={"min_tokens": 8}
    )
    assert greedy.object == "text_completion" and greedy.id.startswith("cmpl-")
    assert greedy.choices[0].text == reference_greedy(tiny_model, "The cat", 8)
    assert greedy.choices[0].finish_reason == "length"
    assert greedy.usage.completion_tokens == 8 and greedy.usage.prompt_tokens == 2
    many = api.completions.create(model="tiny", prompt=["The cat", "A dog"], max_tokens=4, n=2, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.prompt_tokens == 4  # each prompt once, whatever n is


def test_streaming_gives_the_same_text_and_seed_repeats(srv: Server) -> None:
    api = client(srv)
    args = dict(model="tiny", prompt="The old king", max_tokens=16, seed=7, top_p=0.9)
    full = api.completions.create(**args).choices[0]
    again = api.completions.create(**args).choices[0]
    assert again.text == full.text  # a seeded request sent alone repeats
    parts = list(api.completions.create(**args, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.text
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == full.finish_reason


def test_logprobs_of_generated_tokens(srv: Server) -> None:
    r = client(srv).completions.create(
        model="tiny", prompt="The cat", max_tokens=4, logprobs=2, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob == max(top.values()) and 2 <= len(top) <= 3  # greedy picks the top token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    text = r.choices[0].text
    if "\ufffd" not in text:  # a token holding part of a UTF-8 character can't be shown alone
        assert "".join(lp.tokens) == text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


def test_echo_scores_every_prompt_token_like_transformers(srv: Server, tiny_model: Path) -> None:
    prompt = "The cat sees the moon. A dog finds"
    status, body = srv.post(
        "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}, AUTH
    )
    assert status == 200
    choice = body["choices"][0]
    assert choice["text"] == prompt
    lp = choice["logprobs"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]].tolist()
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp["tokens"]) == prompt
    assert [prompt[o:] for o in lp["text_offset"]] == [tok.decode(ids[i:]) for i in range(len(ids))]
    # lm-eval's form: token-id prompts, one generated token after the echoed ones.
    status, body = srv.post(
        "/v1/completions",
        {"prompt": [ids, ids[:3]], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
        AUTH,
    )
    assert status == 200
    lengths = [len(c["logprobs"]["token_logprobs"]) for c in body["choices"]]
    assert lengths == [len(ids) + 1, 4]
    assert body["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)


def test_stop_string_spanning_prompt_and_completion_is_not_a_stop(srv: Server) -> None:
    prompt = "The old king"
    base = {"prompt": prompt, "max_tokens": 20, "seed": 5}
    full = srv.post("/v1/completions", base, AUTH)[1]["choices"][0]
    text = full["text"]
    spans = [prompt[-k:] + text[:j] for k in (1, 2, 3) for j in (1, 2, 3)]
    stop = next(s for s in spans if s not in text and "\ufffd" not in s)
    got = srv.post("/v1/completions", {**base, "stop": [stop]}, AUTH)[1]["choices"][0]
    assert (got["text"], got["finish_reason"]) == (text, full["finish_reason"])
    inner = text[3:6]  # a stop string inside the generated text does stop, and is cut
    cut = srv.post("/v1/completions", {**base, "stop": inner}, AUTH)[1]["choices"][0]
    assert cut["text"] == text[: text.index(inner)] and cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == inner


def test_chat_needs_a_chat_template(srv: Server, tiny_model: Path, tmp_path: Path) -> None:
    status, body = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, AUTH)
    assert status == 400 and "no chat template" in body["error"]["message"]
    assert "/v1/completions" in body["error"]["message"]
    chatty = Server("-m", with_chat_template(tiny_model, tmp_path / "chat"))
    try:
        from openai import OpenAI

        api = OpenAI(base_url=chatty.url + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "The cat"}]
        reply = api.chat.completions.create(model="m", messages=messages, max_tokens=5, seed=2)
        assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens <= 5
        streamed = api.chat.completions.create(
            model="m", messages=messages, max_tokens=5, seed=2, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == reply.choices[0].message.content
    finally:
        chatty.stop()


# -- bad requests ------------------------------------------------------------------------------------------
LONG = "context_length_exceeded"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{bad", 400, None, None),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "invalid_value"),
        ({"prompt": "x", "temperature": 5}, 400, "temperature", "invalid_value"),
        ({"prompt": "x", "n": 1000}, 400, "n", "invalid_value"),
        ({"prompt": "x", "logprobs": 9}, 400, "logprobs", "invalid_value"),
        ({"prompt": "x", "stop": ["", "a"]}, 400, "stop", "invalid_value"),
        ({"prompt": [[99999]]}, 400, "prompt", None),
        ({"prompt": "word " * 300, "max_tokens": 5}, 400, "prompt", LONG),
        ({"prompt": "x", "max_tokens": 500}, 400, "max_tokens", LONG),
        ({"prompt": "x", "logit_bias": {"cat": 5}}, 400, "logit_bias", "invalid_value"),
        (b'{"prompt": "' + b"a" * (2 * 2**20) + b'"}', 413, None, None),
    ],
)
def test_bad_requests_get_openai_error_objects(srv: Server, body, status: int, param, code) -> None:
    raw = body if isinstance(body, bytes) else None
    got, answer = srv.post("/v1/completions", None if raw else body, AUTH, raw=raw)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
    assert srv.get("/health")[1]["status"] == "ok"


def test_api_key_and_unknown_routes(srv: Server) -> None:
    assert srv.post("/v1/completions", {"prompt": "x"})[0] == 401
    status, body = srv.post("/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert srv.get("/v1/models")[0] == 401 and srv.get("/health")[0] == 200  # health is open
    status, body = srv.get("/v1/nothing", AUTH)
    assert status == 404 and "error" in body


# -- concurrency -------------------------------------------------------------------------------------------
def test_concurrent_streams_are_decoded_together(srv: Server) -> None:
    before = srv.wait_idle()
    arrivals: dict[int, list] = {}

    def one(i: int) -> None:
        events = sse(srv, {"prompt": f"The cat {i}", "max_tokens": 30, "min_tokens": 30, "seed": i}, AUTH)
        arrivals[i] = events
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = srv.wait_idle()
    assert len(arrivals) == 4
    steps = after["steps"] - before["steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    assert tokens == 120
    # One forward pass per step for every sequence in flight: far fewer steps than tokens.
    assert steps < 0.6 * tokens, (steps, tokens)


def test_client_disconnect_stops_its_sequence(slow: Server) -> None:
    before = slow.wait_idle()
    events = sse(slow, {"prompt": "The", "max_tokens": 100, "min_tokens": 100}, stop_after=2)
    assert len(events) == 2
    after = slow.wait_idle(timeout=30)
    assert after["tokens_generated"] - before["tokens_generated"] < 60  # 100 would mean nobody stopped it
    status, body = slow.post("/v1/completions", {"prompt": "A dog", "max_tokens": 3})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")


def test_bounded_load_mixed_streaming(srv: Server) -> None:
    failures: list[str] = []

    def user(i: int) -> None:
        for k in range(4):
            body = {"prompt": f"The cat {i} {k}", "max_tokens": 6, "seed": i * 4 + k}
            try:
                if (i + k) % 2:
                    events = sse(srv, body, AUTH)
                    reasons = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
                    if events[-1] != "[DONE]" or reasons[-1] not in ("stop", "length"):
                        failures.append(f"stream {i}/{k}: {events[-2:]}")
                else:
                    status, answer = srv.post("/v1/completions", body, AUTH)
                    if status != 200 or answer["choices"][0]["finish_reason"] not in ("stop", "length"):
                        failures.append(f"request {i}/{k}: {status} {answer}")
            except Exception as exc:  # any transport failure counts
                failures.append(f"{i}/{k}: {exc!r}")

    threads = [threading.Thread(target=user, args=(i,)) for i in range(64)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, 180 - (time.monotonic() - started)))
    assert not any(t.is_alive() for t in threads), "load test did not finish in time"
    assert not failures, failures[:5]
    health = srv.wait_idle()
    assert health["status"] == "ok"


# -- signals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_requests_in_flight_then_exits(tiny_model: Path, sig: int, code: int) -> None:
    server = Server("-m", tiny_model, env={"LLMKIT_TEST_STEP_DELAY": "0.02"})
    result: dict = {}

    def request() -> None:
        result["answer"] = server.post(
            "/v1/completions", {"prompt": "The", "max_tokens": 40, "min_tokens": 40}
        )

    thread = threading.Thread(target=request)
    thread.start()
    deadline = time.monotonic() + 30
    while server.get("/health")[1]["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(sig)
    thread.join(30)
    status, body = result["answer"]
    assert status == 200 and body["usage"]["completion_tokens"] == 40
    assert server.proc.wait(30) == code
    assert "Traceback" not in server.stderr


# -- generate --server ---------------------------------------------------------------------------------
def test_generate_server_matches_local_generate(srv: Server, cli, tiny_model: Path, tmp_path: Path) -> None:
    flags = ["--greedy", "-n", "8", "--min-new-tokens", "8"]
    local = cli("generate", "-m", tiny_model, "The cat", *flags, "--no-stream")
    remote = cli("generate", "--server", srv.url, "--api-key", KEY, "The cat", *flags, "--no-stream")
    assert remote.exit_code == 0, remote.stderr
    assert remote.stdout == local.stdout
    streamed = cli("generate", "--server", srv.url, "--api-key", KEY, "The cat", *flags, "--stream")
    assert streamed.stdout == local.stdout
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(["A dog", "The sea", "My"])
        )
    )
    args = ["-i", prompts, "-f", "jsonl", "--greedy", "-n", "5", "-b", "2"]
    keys = ("id", "prompt", "sample", "completion", "prompt_tokens", "completion_tokens", "finish_reason")
    local_rows = [json.loads(line) for line in cli("generate", "-m", tiny_model, *args).stdout.splitlines()]
    remote_run = cli("generate", "--server", srv.url, "--api-key", KEY, *args)
    remote_rows = [json.loads(line) for line in remote_run.stdout.splitlines()]
    assert [{k: r[k] for k in keys} for r in remote_rows] == [{k: r[k] for k in keys} for r in local_rows]


def test_generate_server_imports_no_torch(srv: Server) -> None:
    import subprocess
    import sys

    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('HEAVY=' + ','.join(m for m in "
        "('torch', 'transformers', 'accelerate') if m in sys.modules) + '\\n'))\n"
        "from llmkit.cli.app import main\n"
        f"sys.argv = ['llmkit', 'generate', '--server', {srv.url!r}, 'The cat', '-n', '3']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"LLMKIT_API_KEY": KEY, "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY=\n" in done.stderr and done.stdout


def test_generate_server_errors(srv: Server, cli) -> None:
    unreachable = cli("generate", "--server", "http://127.0.0.1:9", "hi")
    assert unreachable.exit_code == 1 and "cannot reach the server" in unreachable.stderr
    unauthorized = cli("generate", "--server", srv.url, "hi")
    assert unauthorized.exit_code == 1 and "--api-key" in unauthorized.stderr
    local_only = cli("generate", "--server", srv.url, "--dtype", "bfloat16", "hi")
    assert local_only.exit_code == 2 and "applies to a local model" in local_only.stderr


def test_a_failure_while_generating_is_a_500_and_the_server_goes_on(tiny_model: Path, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from llmkit.config import LoadConfig
    from llmkit.models import load
    from llmkit.serve.app import create_app
    from llmkit.serve.engine import Engine

    engine = Engine(load(LoadConfig(model=str(tiny_model))), max_batch=4)
    real = engine.model
    calls = {"n": 0}

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decoding step of the first request
            raise torch.OutOfMemoryError("simulated: out of memory")
        return real(**kwargs)

    monkeypatch.setattr(engine, "model", flaky)
    engine.start()
    try:
        with TestClient(create_app(engine, "tiny")) as http:
            failed = http.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 5})
            assert failed.status_code == 500
            error = failed.json()["error"]
            assert error["type"] == "server_error" and "out of memory" in error["message"]
            ok = http.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 5, "min_tokens": 5})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
            assert http.get("/health").json()["status"] == "ok"
    finally:
        engine.stop()


def test_simonw_llm_talks_to_it(srv: Server, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    llm = shutil.which("llm", path=str(Path(sys.executable).parent))
    if llm is None:
        pytest.skip("simonw's llm is not installed")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f'- model_id: tiny\n  model_name: tiny\n  api_base: "{srv.url}/v1"\n  api_key_name: tiny\n'
        "  completion: true\n"
    )
    env = {"LLM_USER_PATH": str(tmp_path), "PATH": "", "HOME": str(tmp_path)}
    subprocess.run([llm, "keys", "set", "tiny", "--value", KEY], check=True, env=env, timeout=60)
    done = subprocess.run(
        [llm, "-m", "tiny", "The cat", "-o", "max_tokens", "6", "-o", "temperature", "0", "--no-stream"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    direct = srv.post("/v1/completions", {"prompt": "The cat", "max_tokens": 6, "temperature": 0}, AUTH)[1]
    assert done.stdout.rstrip("\n") == direct["choices"][0]["text"].rstrip("\n")
