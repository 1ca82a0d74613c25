"""Run an ASGI app under a real uvicorn server in a background thread.

Used by the test suite and the benchmarks: the app gets a real socket on loopback,
its own event loop and the full uvicorn stack (HTTP parser, WebSocket protocol,
lifespan), exactly as in production.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from gateway.server import Server


class ThreadedServer:
    """``with ThreadedServer(app) as server:`` serves ``app`` on ``server.port``."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        config.setdefault("log_level", "warning")
        self.server = Server(uvicorn.Config(app, host=host, port=self.port, **config))
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"uvicorn:{self.port}")
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    def start(self, timeout: float = 30.0) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.01)
        # For diagnostics (see _tasks).
        self._loop = self.server.servers[0].get_loop() if self.server.servers else None
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise TimeoutError(f"server did not stop; its tasks:\n{self._tasks()}")

    def _tasks(self) -> str:
        """The stacks of the server loop's tasks (to see what a stuck shutdown awaits)."""
        loop = self._loop
        if loop is None:
            return "(loop unknown)"
        out = io.StringIO()
        for task in asyncio.all_tasks(loop):
            task.print_stack(file=out)
        return out.getvalue()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
