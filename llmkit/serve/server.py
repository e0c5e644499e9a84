"""uvicorn with llmkit's manners: bind first (a clear error), one ready line, and on SIGINT/SIGTERM
stop accepting, let requests in flight end (a few seconds at most), then exit 130/143."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from llmkit.errors import LlmkitError

GRACE_S = 5


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LlmkitError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            "pick another --port (0 picks a free one), or stop what is using it",
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app: Any, sock: socket.socket, on_ready: Callable[[], None], on_stop: Callable[[], None]) -> int:
    """Serve until a signal; returns the exit status (0, or 128 + the signal)."""
    import uvicorn

    class Server(uvicorn.Server):
        received: int | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.received is None:
                self.received = sig
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                on_ready()

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            on_stop()
            self._captured_signals.clear()  # we exit with 128 + signal ourselves, after cleaning up

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,
        lifespan="off",
    )
    server = Server(config)
    server.run(sockets=[sock])
    if server.received is not None:
        return 128 + server.received
    return 0
