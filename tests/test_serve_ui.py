"""The playground page at /, in a real browser (Debian's chromium, driven by Playwright) against a real
`llmkit serve`: what the page streams is what the API answers, the token view shows the API's
alternatives, Stop frees the server's sequence, the API-key flow, the chat tab, and --no-ui.

Needs chromium: `make test` installs it as root (`make install-browser`); elsewhere the tests skip
with that hint, and CI (root) fails instead of skipping.
"""

from __future__ import annotations

import math
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from serving import Server, with_chat_template

CHROMIUM = os.environ.get("LLMKIT_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-playground-test-4711"
STEP_DELAY = 0.04  # seconds per decoding step on the main server: Stop can land mid-stream
STOP_TOKENS = 100  # ... of a request that would run 4 s to its end


def _unavailable(reason: str) -> None:
    # A user without root may not have chromium: skip with the hint. CI runs as root, and there a
    # missing browser is a broken `make test`, not a reason to test nothing.
    hint = f"{reason}; `sudo make install-browser` installs Debian's chromium (or set LLMKIT_TEST_CHROMIUM)"
    if os.geteuid() == 0 or os.environ.get("CI"):
        pytest.fail(hint)
    pytest.skip(hint)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        _unavailable(f"no chromium at {CHROMIUM}")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Three servers, started (and stopped) together: start-up is most of this file's time.

    main: the tiny model with a chat template, decoding slowly enough to stop; key: the plain tiny
    model (no chat template) behind --api-key; api: --no-ui.
    """
    chat_model = with_chat_template(tiny_model, tmp_path_factory.mktemp("ui") / "chat")
    specs = {
        "main": (("-m", chat_model), {"LLMKIT_TEST_STEP_DELAY": str(STEP_DELAY)}),
        "key": (("-m", tiny_model, "--api-key", KEY), {}),
        "api": (("-m", tiny_model, "--no-ui"), {}),
    }
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(Server, *args, env=env) for name, (args, env) in specs.items()}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for f in futures.values():
            f.result()  # re-raise a start-up failure, after the others are known
        yield started
    finally:
        for srv in started.values():
            srv.proc.send_signal(signal.SIGTERM)
        for srv in started.values():
            srv.stop()


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["main"]


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors


def open_page(page: Any, srv: Server) -> None:
    page.goto(srv.url + "/")
    page.wait_for_selector("body[data-ready='1']")


def set_controls(page: Any, **values: Any) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def visible(text: str) -> str:  # as the page shows a token's text
    return text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣") or "∅"


def percent(logprob: float) -> str:
    return f"{100 * math.exp(logprob):.{1 if logprob > math.log(0.1) else 2}f}%"


def tip_rows(page: Any) -> list[tuple[str, str]]:
    """The hover card's alternatives, as (token, probability) shown."""
    page.wait_for_selector("#tip:not([hidden])")
    rows = page.locator("#tip .alt")
    return [
        (rows.nth(i).locator("span").first.text_content(), rows.nth(i).locator("span").last.text_content())
        for i in range(rows.count())
    ]


def expected_rows(top: dict[str, float]) -> list[tuple[str, str]]:
    ranked = sorted(top.items(), key=lambda kv: -kv[1])
    return [(visible(token), percent(logprob)) for token, logprob in ranked]


def test_the_page_streams_what_the_api_answers_and_shows_each_tokens_alternatives(
    server: Server, page: Any
) -> None:
    # Markup in the prompt must come back as text: the page never parses model text or prompts as HTML.
    prompt = 'The <b>cat</b> & "dog"'
    sampling = {"max_tokens": 16, "temperature": 1, "top_p": 0.9, "top_k": 50, "seed": 11}
    open_page(page, server)
    page.fill("#prompt", prompt)
    set_controls(page, **sampling)
    page.click("#run")
    # Streamed: text shows while the request is still running.
    page.wait_for_function(
        "() => document.querySelector('#completion').textContent.length > 0"
        " && document.querySelector('#output').dataset.state === 'running'"
    )
    page.wait_for_selector("#output[data-state='done']")

    status, plain = server.post("/v1/completions", {"prompt": prompt, **sampling})
    assert status == 200
    text = plain["choices"][0]["text"]
    assert text and page.text_content("#completion") == text
    assert page.text_content("#prompt-tokens") == prompt
    assert page.locator("#output b").count() == 0
    assert "16 tokens" in page.text_content("#stats") and "tok/s" in page.text_content("#stats")

    # The token view: one span per token, and a token's card lists the API's own top 5 (and the chosen).
    _, scored = server.post("/v1/completions", {"prompt": prompt, **sampling, "logprobs": 5, "echo": True})
    logprobs = scored["choices"][0]["logprobs"]
    prompt_count = len([o for o in logprobs["text_offset"] if o < len(prompt)])
    assert page.locator("#prompt-tokens .tok").count() == prompt_count
    assert page.locator("#completion .tok").count() == len(logprobs["tokens"]) - prompt_count == 16
    for k in (1, 7):
        page.hover(f"#completion .tok >> nth={k}")
        assert tip_rows(page) == expected_rows(logprobs["top_logprobs"][prompt_count + k])
        assert page.text_content("#tip .alt.chosen span") == visible(logprobs["tokens"][prompt_count + k])
    page.hover("#prompt-tokens .tok >> nth=2")  # the prompt, scored: what the model expected there
    assert tip_rows(page) == expected_rows(logprobs["top_logprobs"][2])
    page.hover("#prompt-tokens .tok >> nth=0")
    assert "nothing before it" in page.text_content("#tip")

    set_controls(page, max_tokens=0)  # the prompt scored, nothing generated
    page.click("#run")
    page.wait_for_selector("#output[data-state='done']")
    assert page.text_content("#completion") == "" and page.text_content("#prompt-tokens") == prompt
    assert page.locator("#prompt-tokens .tok").count() == prompt_count


def test_stop_cancels_the_request_on_the_server(server: Server, page: Any) -> None:
    open_page(page, server)
    set_controls(page, max_tokens=STOP_TOKENS, temperature=0)
    before = server.wait_idle()["tokens_generated"]
    page.click("#run")
    page.wait_for_function("() => document.querySelectorAll('#completion .tok').length >= 3")
    assert server.get("/health")[1]["running"] == 1
    page.click("#stop-button")
    page.wait_for_selector("#output[data-state='stopped']")
    stopped = time.monotonic()
    # The server frees the row when the browser drops the stream: idle long before the 4 s the
    # request had left, and nothing decodes for it afterwards.
    health = server.wait_idle(timeout=2.5)
    assert time.monotonic() - stopped < 2.5
    generated = health["tokens_generated"] - before
    assert 3 <= generated < STOP_TOKENS // 2
    time.sleep(0.3)
    assert server.get("/health")[1]["tokens_generated"] - before == generated
    assert page.text_content("#stats").endswith("stopped")
    assert page.locator("#completion .tok").count() <= generated


def test_chat_tab_streams_the_chat_completion(server: Server, page: Any) -> None:
    assert server.get("/health")[1]["chat_template"] is True
    open_page(page, server)
    page.click("#tab-chat")
    assert page.is_hidden("#no-chat") and page.is_visible("#chat-input")
    sampling = {"max_tokens": 8, "temperature": 1, "seed": 5}
    set_controls(page, **sampling)
    page.fill("#chat-input", "hello there")
    page.click("#send")
    page.wait_for_function(
        "() => !document.querySelector('#send').disabled && document.querySelector('.msg.assistant')"
    )
    status, answer = server.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], **sampling}
    )
    assert status == 200
    assert page.text_content(".msg.user .content") == "hello there"
    assert page.text_content(".msg.assistant .content") == answer["choices"][0]["message"]["content"]
    assert page.locator(".msg.assistant .tok").count() > 0


def test_api_key_is_asked_for_kept_in_the_tab_and_never_in_the_html(
    servers: dict[str, Server], page: Any
) -> None:
    srv = servers["key"]
    with urllib.request.urlopen(srv.url + "/", timeout=30) as response:  # no key needed for the page
        html = response.read().decode()
        assert response.status == 200 and response.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert KEY not in html

    open_page(page, srv)
    # No chat template on this model: the tab says why there is no chat.
    page.click("#tab-chat")
    assert page.is_visible("#no-chat") and "no chat template" in page.text_content("#no-chat")
    assert page.is_hidden("#chat-input")
    page.click("#tab-complete")

    set_controls(page, max_tokens=5, temperature=0)
    page.click("#run")  # 401: the page asks for the key
    page.wait_for_selector("#keybar:not([hidden])")
    page.fill("#key", "wrong")
    page.click("#keybar button[type=submit]")  # tried again at once, refused again
    page.wait_for_function("() => document.querySelector('#key-why').textContent.includes('refused')")
    page.fill("#key", KEY)
    page.click("#keybar button[type=submit]")  # ... and this time the request runs
    page.wait_for_selector("#output[data-state='done']")
    _, answer = srv.post(
        "/v1/completions",
        {"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert page.text_content("#completion") == answer["choices"][0]["text"]
    assert page.evaluate("() => sessionStorage.getItem('llmkit-api-key')") == KEY
    assert KEY not in page.content()


def test_no_ui_serves_the_api_only(servers: dict[str, Server]) -> None:
    status, body = servers["api"].get("/")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, health = servers["api"].get("/health")
    assert status == 200 and health["chat_template"] is False
    assert servers["api"].post("/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
