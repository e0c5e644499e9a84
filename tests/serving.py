"""A real `llmkit serve` subprocess on a free loopback port, for the serving tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+) \(")


class Server:
    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 90) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmkit", "serve", "--port", "0", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Started before the per-test environment is set: float32 whatever the CPU, like every test.
            env={**os.environ, "HF_HUB_OFFLINE": "1", "LLMKIT_CPU_BF16": "0", **(env or {})},
        )
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                found = READY.search(line)
                if found:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None):
        """(status, parsed JSON body) of a POST; never raises for HTTP errors."""
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str, headers: dict[str, str] | None = None):
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_idle(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, health = self.get("/health")
            if health["running"] == 0 and health["waiting"] == 0:
                return health
            time.sleep(0.05)
        raise AssertionError(f"server still busy: {health}")


def with_chat_template(model: Path, out: Path) -> Path:
    """A copy of `model` whose tokenizer has a (simple) chat template."""
    import shutil

    shutil.copytree(model, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out
