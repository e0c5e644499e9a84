"""`llmkit serve` runs its engine in a child process (llmkit/serve/process.py): what that must not
change (answers, errors, shutdown) and what it adds (a child that never outlives the server, a
failure of the child that fails only what was in flight)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serving import Server

REQUEST = {"prompt": "The", "max_tokens": 12, "seed": 3, "temperature": 0.9}


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def engine_child(server: Server) -> int:
    """The spawned engine: the child whose command line is multiprocessing's spawn."""
    for pid in children(server.proc.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if "spawn_main" in cmdline:
            return pid
    raise AssertionError(f"no engine process under {server.proc.pid}")


def gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/status")
        if status.exists() and "zombie" in status.read_text():
            return True  # ended; its parent has not reaped it yet
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads children from /proc (Linux)")
def test_the_engine_is_a_child_that_ends_with_the_server(tiny_model: Path) -> None:
    server = Server("-m", tiny_model)
    child = engine_child(server)
    assert server.post("/v1/completions", REQUEST)[0] == 200
    assert server.stop() == 143
    assert gone(child)
    assert "Traceback" not in server.stderr


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads children from /proc (Linux)")
def test_a_killed_server_leaves_no_engine_behind(tiny_model: Path) -> None:
    server = Server("-m", tiny_model)
    child = engine_child(server)
    server.proc.kill()  # no shutdown at all: the child sees its pipe close and ends itself
    server.proc.wait(10)
    assert gone(child)


def test_answers_are_the_same_as_with_the_engine_on_a_thread(tiny_model: Path) -> None:
    process, thread = (
        Server("-m", tiny_model),
        Server("-m", tiny_model, env={"LLMKIT_SERVE_ENGINE": "thread"}),
    )
    try:
        for body in (REQUEST, {**REQUEST, "n": 2, "logprobs": 2, "echo": True, "stop": ["e"]}):
            a, b = process.post("/v1/completions", body), thread.post("/v1/completions", body)
            assert a[0] == b[0] == 200
            for key in ("id", "created"):
                a[1].pop(key), b[1].pop(key)
            assert a[1] == b[1]
        assert process.wait_idle()["tokens_generated"] == thread.wait_idle()["tokens_generated"]
    finally:
        process.stop(), thread.stop()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads children from /proc (Linux)")
def test_a_dead_engine_fails_what_was_in_flight_and_health_says_so(tiny_model: Path) -> None:
    server = Server("-m", tiny_model, env={"LLMKIT_TEST_STEP_DELAY": "0.05"})
    try:
        result: dict = {}
        request = threading.Thread(
            target=lambda: result.update(
                answer=server.post("/v1/completions", {**REQUEST, "max_tokens": 100})
            )
        )
        request.start()
        deadline = time.monotonic() + 30
        while server.get("/health")[1]["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(engine_child(server), signal.SIGKILL)
        request.join(30)
        status, body = result["answer"]
        assert status == 500 and "the decoding process has stopped" in body["error"]["message"]
        status, body = server.get("/health")
        assert status == 503 and body["error"]["type"] == "server_error"
        status, body = server.post("/v1/completions", REQUEST)  # later requests fail at once, clearly
        assert status == 500 and "the decoding process has stopped" in body["error"]["message"]
    finally:
        server.stop()
    assert "Traceback" not in server.stderr


def test_a_model_that_fails_to_load_is_one_error_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "-m",
            str(tmp_path / "nowhere"),
            "--port",
            "0",
            "--offline",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "nowhere" in errors[0]
    assert "Traceback" not in proc.stderr


def test_ctrl_c_to_the_whole_process_group_exits_130(tiny_model: Path) -> None:
    """A terminal's Ctrl-C reaches the server and its engine at once: the engine leaves the
    shutdown to the server, which lets the request in flight finish."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "serve", "-m", str(tiny_model), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job has
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LLMKIT_TEST_STEP_DELAY": "0.02"},
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        url = lines[-1].split("listening on ")[1].split()[0]
        server = Server.__new__(Server)
        server.url, server.proc, server.lines = url, proc, lines
        result: dict = {}
        body = {"prompt": "The", "max_tokens": 30, "min_tokens": 30}
        request = threading.Thread(target=lambda: result.update(answer=server.post("/v1/completions", body)))
        request.start()
        deadline = time.monotonic() + 30
        while server.get("/health")[1]["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        request.join(30)
        status, answer = result["answer"]
        assert status == 200 and answer["usage"]["completion_tokens"] == 30
        assert proc.wait(30) == 130
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_an_unknown_engine_placement_is_a_usage_error(tiny_model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "serve", "-m", str(tiny_model), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LLMKIT_SERVE_ENGINE": "fork"},
    )
    assert proc.returncode == 2
    assert "Error: LLMKIT_SERVE_ENGINE='fork' is not an engine placement" in proc.stderr
