"""Serving throughput (GPT-2 small's shape, CPU, float32): `llmkit serve` at 1, 4 and 16 concurrent
clients against the same requests sent one at a time, and against `transformers serve` on the same
model directory with and without its continuous batching; and `generate --server` per-call wall time.

Every request streams 64 sampled tokens; time to first token (TTFT) is when its first text arrives.
Servers run one at a time as subprocesses on loopback, each warmed up with one request first.
Targets: >= 4x one-at-a-time at 16 clients, >= 1.2x `transformers serve --continuous-batching` at 16
clients and no slower at 1 and 4 (both float32); the built-in model at serve's defaults, 16 clients
>= 8x one client's tokens/s.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.common import WORDS, describe_machine, gpt2_small, save, table

NEW_TOKENS = 64
CONCURRENCY = (1, 4, 16)
BIN = Path(sys.executable).parent


def prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(24))


def stream(url: str, body: dict[str, Any]) -> tuple[float | None, int, float]:
    """(seconds to first text, text chunks, seconds in all) of one streamed completion."""
    parsed = urlparse(url)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
    conn.request(
        "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    first, chunks = None, 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            if line == b"data: [DONE]":
                break
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            if choice.get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - started
    conn.close()
    return first, chunks, time.perf_counter() - started


def request_body(model: str, i: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt(i), "max_tokens": NEW_TOKENS, "temperature": 1.0, "seed": i}


def at_concurrency(url: str, model: str, clients: int, per_client: int = 1) -> dict[str, Any]:
    results: list[tuple[float | None, int, float]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            got = stream(url, request_body(model, c * per_client + r))
            with lock:
                results.append(got)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttft = sorted(r[0] for r in results if r[0] is not None)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
    }


def one_at_a_time(url: str, model: str, requests: int) -> dict[str, Any]:
    started, tokens = time.perf_counter(), 0
    for i in range(requests):
        tokens += stream(url, request_body(model, i))[1]
    wall = time.perf_counter() - started
    return {"requests": requests, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


class Running:
    """A server subprocess; `ready` matches the line that says it listens."""

    def __init__(
        self, argv: list[str], url: str | None, ready: str, env: dict[str, str] | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.url = url
        self.log: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(ready, line)
            if found:
                self.url = self.url or found.group(1)
                break
        else:
            raise RuntimeError(f"{argv[0]} did not start:\n" + "".join(self.log[-20:]))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()  # type: ignore[arg-type]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, server: Running, model: str, sequential: bool) -> dict[str, Any]:
    assert server.url is not None
    stream(server.url, request_body(model, 999))  # warm-up: first-call allocations
    out: dict[str, Any] = {"levels": [at_concurrency(server.url, model, c) for c in CONCURRENCY]}
    if sequential:
        out["one_at_a_time"] = one_at_a_time(server.url, model, max(CONCURRENCY))
    print(f"{name}: " + ", ".join(f"{lv['clients']}: {lv['tokens_per_s']:.1f} tok/s" for lv in out["levels"]))
    return out


def generate_calls(url: str, repeats: int = 5) -> list[float]:
    """Wall seconds of whole `llmkit generate --server URL … -n 1` processes."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(
            [str(BIN / "llmkit"), "generate", "--server", url, "hello", "-n", "1"],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    print(describe_machine())
    model_dir = str(gpt2_small())
    results: dict[str, Any] = {}
    ours = Running(
        [str(BIN / "llmkit"), "serve", "-m", model_dir, "--port", "0", "--dtype", "float32"],
        None,
        r"listening on (http://\S+) ",
    )
    try:
        results["llmkit"] = measure("llmkit serve", ours, model_dir, sequential=True)
        results["generate_server_call_s"] = generate_calls(ours.url or "")
    finally:
        ours.stop()
    # llmkit at its defaults too: --dtype auto is bfloat16 on a CPU that computes it natively.
    auto = Running(
        [str(BIN / "llmkit"), "-v", "serve", "-m", model_dir, "--port", "0"],
        None,
        r"listening on (http://\S+) ",
    )
    try:
        label = "llmkit --dtype auto"
        results[label] = measure("llmkit serve --dtype auto", auto, model_dir, sequential=False)
        results[label]["dtype"] = next((line.strip() for line in auto.log if " on cpu, " in line), "see -v")
    finally:
        auto.stop()
    # The built-in model at serve's defaults: 16 clients against one (target >= 8x).
    builtin = Running(
        [str(BIN / "llmkit"), "serve", "-m", "tiny-shakespeare", "--port", "0"],
        None,
        r"listening on (http://\S+) ",
    )
    try:
        levels = measure("llmkit serve -m tiny-shakespeare", builtin, "tiny-shakespeare", sequential=False)
        results["builtin"] = levels
        rates = {lv["clients"]: lv["tokens_per_s"] for lv in levels["levels"]}
        results["builtin_16_vs_1"] = rates[16] / rates[1]
    finally:
        builtin.stop()
    for label, flags in (
        ("transformers", []),
        ("transformers --continuous-batching", ["--continuous-batching"]),
    ):
        port = free_port()
        theirs = Running(
            [
                str(BIN / "transformers"),
                "serve",
                model_dir,
                "--port",
                str(port),
                "--device",
                "cpu",
                "--dtype",
                "float32",
                *flags,
            ],
            f"http://127.0.0.1:{port}",
            r"Uvicorn running on",  # printed once it listens ("startup complete" comes before the bind)
        )
        try:
            results[label] = measure(label, theirs, model_dir, sequential=False)
        except Exception as exc:  # a baseline that fails is reported, not fatal
            results[label] = {"error": repr(exc), "log": theirs.log[-20:]}
            print(f"{label}: failed: {exc!r}\n" + "".join(theirs.log[-20:]))
        finally:
            theirs.stop()
    rows = [("server", *(f"{c} client{'s' if c > 1 else ''}" for c in CONCURRENCY), "TTFT p50 / p95 at 16")]
    for label in ("llmkit", "llmkit --dtype auto", "transformers", "transformers --continuous-batching"):
        levels = results[label].get("levels")
        if not levels:
            rows.append((label, *("failed" for _ in CONCURRENCY), ""))
            continue
        top = levels[-1]
        rows.append(
            (
                label,
                *(f"{lv['tokens_per_s']:.1f} tok/s" for lv in levels),
                f"{top['ttft_p50']:.2f} / {top['ttft_p95']:.2f} s",
            )
        )
    print(table(rows))
    mine = results["llmkit"]
    speedup = mine["levels"][-1]["tokens_per_s"] / mine["one_at_a_time"]["tokens_per_s"]
    calls = results["generate_server_call_s"]
    print(
        f"llmkit at 16 clients vs the same requests one at a time: {speedup:.2f}x (target >= 4); "
        f"generate --server, 1 token: median {statistics.median(calls):.3f} s per call (target <= 0.3)"
    )
    results["speedup_16_vs_sequential"] = speedup
    cb = results["transformers --continuous-batching"].get("levels")
    if cb:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine["levels"], cb, strict=True)]
        results["vs_continuous_batching"] = ratios
        print(
            "llmkit vs transformers --continuous-batching (float32): "
            + " / ".join(f"{r:.2f}x" for r in ratios)
            + " at "
            + " / ".join(map(str, CONCURRENCY))
            + " clients (target >= 1.2x at 16, >= 1 at 1 and 4)"
        )
    print(f"built-in model, 16 clients vs 1: {results['builtin_16_vs_1']:.2f}x (target >= 8)")
    save("serve", results)


def take_turns(
    servers: dict[str, Running], model: str, levels: tuple[int, ...], rounds: int
) -> dict[str, dict[int, list[float]]]:
    """Tokens/s of each server at each level, `rounds` times: every server warmed up with one request,
    then all of them in turn at each level, their order reversed every other round, so drift in the
    machine hits them alike. The caller stops the servers."""
    runs: dict[str, dict[int, list[float]]] = {name: {c: [] for c in levels} for name in servers}
    for server in servers.values():
        assert server.url is not None
        stream(server.url, request_body(model, 999))
    for r in range(rounds):
        order = list(servers.items()) if r % 2 == 0 else list(reversed(servers.items()))
        for clients in levels:
            for name, server in order:
                assert server.url is not None
                runs[name][clients].append(at_concurrency(server.url, model, clients)["tokens_per_s"])
    return runs


def side_by_side(
    model: str, extra: list[str], envs: dict[str, dict[str, str]], levels: tuple[int, ...], rounds: int
) -> dict[str, Any]:
    """`llmkit serve` once per named environment, all up at once, taking turns (take_turns); their
    rates, medians and the thread counts each chose (from /health at the end)."""
    argv = [str(BIN / "llmkit"), "serve", "-m", model, "--port", "0", *extra]
    servers = {
        name: Running(argv, None, r"listening on (http://\S+) ", env=env) for name, env in envs.items()
    }
    try:
        rates = take_turns(servers, model, levels, rounds)
        health = {}
        for name, server in servers.items():
            with urllib.request.urlopen(f"{server.url}/health", timeout=30) as answer:
                health[name] = json.loads(answer.read())["threads"]
    finally:
        for server in servers.values():
            server.stop()
    medians = {name: {c: statistics.median(v) for c, v in by.items()} for name, by in rates.items()}
    return {"tokens_per_s": rates, "medians": medians, "threads_chosen": health}


def level_rows(
    label: str, got: dict[str, Any], base: str, levels: tuple[int, ...], extra: Any = None
) -> list[tuple]:
    """Table rows of a side_by_side result: tokens/s per level, each server's ratios to `base`, its
    16-vs-1 (`extra(name)` adds a column)."""
    rows = []
    for name, med in got["medians"].items():
        speed = (
            ""
            if name == base
            else " (" + ", ".join(f"{med[c] / got['medians'][base][c]:.2f}x" for c in levels) + ")"
        )
        cells = [
            label,
            name + speed,
            *(f"{med[c]:.1f}" for c in levels),
            f"{med[levels[-1]] / med[levels[0]]:.2f}x",
        ]
        rows.append(tuple(cells + ([extra(name)] if extra else [])))
    return rows


def alternated(rounds: int = 5, levels: tuple[int, ...] = (1, 4)) -> None:
    """`--alternate`: llmkit and `transformers serve --continuous-batching` up side by side, float32,
    measured in turn at 1 and 4 clients `rounds` times: single runs at few clients are too short to
    rank the two on a noisy machine."""
    print(describe_machine())
    model_dir = str(gpt2_small())
    port = free_port()
    servers = {
        "llmkit": Running(
            [str(BIN / "llmkit"), "serve", "-m", model_dir, "--port", "0", "--dtype", "float32"],
            None,
            r"listening on (http://\S+) ",
        ),
        "transformers --continuous-batching": Running(
            [
                *(str(BIN / "transformers"), "serve", model_dir, "--port", str(port)),
                *("--device", "cpu", "--dtype", "float32", "--continuous-batching"),
            ],
            f"http://127.0.0.1:{port}",
            r"Uvicorn running on",
        ),
    }
    try:
        runs = take_turns(servers, model_dir, levels, rounds)
    finally:
        for server in servers.values():
            server.stop()
    ratios = {}
    for clients in levels:
        ours, theirs = (statistics.median(runs[n][clients]) for n in servers)
        ratios[clients] = ours / theirs
        print(
            f"{clients} client{'s' if clients > 1 else ''}: llmkit {ours:.1f} tok/s, continuous batching "
            f"{theirs:.1f} (medians of {rounds}, alternated): {ratios[clients]:.2f}x"
        )
    save("serve_alternated", {"rounds": rounds, "tokens_per_s": runs, "ratios": ratios})


def builtin_ratio(rounds: int = 5) -> None:
    """`--builtin`: the built-in model at serve's defaults, 1 and 16 clients in turn `rounds` times
    (target: 16 clients >= 8x one client's tokens/s)."""
    print(describe_machine())
    server = Running(
        [str(BIN / "llmkit"), "serve", "-m", "tiny-shakespeare", "--port", "0"],
        None,
        r"listening on (http://\S+) ",
    )
    runs: dict[int, list[float]] = {1: [], 16: []}
    try:
        assert server.url is not None
        stream(server.url, request_body("tiny-shakespeare", 999))
        for _ in range(rounds):
            for clients in runs:
                runs[clients].append(at_concurrency(server.url, "tiny-shakespeare", clients)["tokens_per_s"])
    finally:
        server.stop()
    one, sixteen = (statistics.median(runs[c]) for c in (1, 16))
    print(
        f"built-in model: 1 client {one:.1f} tok/s, 16 clients {sixteen:.1f} (medians of {rounds}, "
        f"alternated): {sixteen / one:.2f}x (target >= 8)"
    )
    save("serve_builtin", {"rounds": rounds, "tokens_per_s": runs, "ratio": sixteen / one})


if __name__ == "__main__":
    if "--alternate" in sys.argv[1:]:
        # --levels 1,4,16 --rounds 3: other concurrencies and round counts than 1 and 4, five times
        given = sys.argv[sys.argv.index("--levels") + 1] if "--levels" in sys.argv else "1,4"
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
        alternated(rounds, tuple(int(c) for c in given.split(",")))
    elif "--builtin" in sys.argv[1:]:
        builtin_ratio()
    else:
        main()
