"""Gateway processes for tests: ``chat-gateway serve`` in a subprocess, as users run it.

Every wait is bounded, and every process is killed (its whole process group) by the
fixtures that start them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx2
import pytest

from gateway.testing.fake_upstream import FakeUpstreamServer
from tests.conftest import scaled

START_TIMEOUT = scaled(30)
# "Exits within a few seconds" of SIGTERM; the wait itself is bounded more loosely so a
# slow shutdown fails with the measured time instead of a bare timeout.
SHUTDOWN_WITHIN = scaled(5)
SHUTDOWN_TIMEOUT = scaled(20)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def gateway_env(
    database_url: str, upstream_server: FakeUpstreamServer, **extra: str | None
) -> dict[str, str]:
    """The caller's environment without any GATEWAY_/OPENAI_ settings, plus ours and
    ``extra`` (a ``None`` value unsets the variable)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GATEWAY_", "OPENAI_"))
    }
    env.update(
        GATEWAY_DATABASE_URL=database_url,
        OPENAI_BASE_URL=upstream_server.base_url,
        OPENAI_API_KEY="x",
        GATEWAY_DEFAULT_MODEL="fake-model",
        GATEWAY_UPSTREAM_MAX_RETRIES="0",
        PYTHONUNBUFFERED="1",
    )
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Served:
    """A ``chat-gateway serve`` subprocess with its logs in files."""

    def __init__(self, command: list[str], env: dict[str, str], workdir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                cwd=workdir,  # no stray .env from the repository is picked up
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, killed as a whole
            )
        self.stop_seconds: float | None = None

    def logs(self) -> str:
        return (
            f"--- stdout\n{self.stdout_path.read_text(errors='replace')}"
            f"--- stderr\n{self.stderr_path.read_text(errors='replace')}"
        )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"gateway exited with {self.process.returncode}:\n{self.logs()}")
            try:
                response = httpx2.get(f"{self.url}/healthz", timeout=1)
                if response.status_code == 200:
                    assert response.json() == {"status": "ok"}
                    return
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not healthy after {START_TIMEOUT}s:\n{self.logs()}")
            time.sleep(0.05)

    def terminate(self) -> int:
        """SIGTERM, then wait (bounded); returns the exit status."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gateway still running {SHUTDOWN_TIMEOUT}s after SIGTERM:\n{self.logs()}")
        self.stop_seconds = time.monotonic() - started
        return code

    def assert_stopped_gracefully(self, code: int) -> None:
        assert self.stop_seconds is not None
        assert self.stop_seconds < SHUTDOWN_WITHIN, (self.stop_seconds, self.logs())
        assert code == 0, (code, self.logs())
        assert "Application shutdown complete" in self.logs()
        assert "Traceback" not in self.logs()

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(scaled(10))
