"""The real command line, run as a user runs it: ``chat-gateway`` in a subprocess.

Each test starts the installed console script (or ``python -m gateway``) against a
temporary SQLite file and the session's fake upstream, talks to it over real HTTP and
WebSocket, and stops it with SIGTERM. Every wait is bounded and every process is
killed (its whole process group) in ``finally``.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from alembic.script import ScriptDirectory
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from gateway.store.db import alembic_config
from gateway.testing.fake_upstream import FakeUpstream, FakeUpstreamServer, Scenario
from tests.conftest import console_script, scaled
from tests.processes import Served, gateway_env, sqlite_url

pytestmark = pytest.mark.slow


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def sqlite_tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows if not name.startswith("sqlite_")}


def alembic_versions(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [v for (v,) in conn.execute("SELECT version_num FROM alembic_version")]


@pytest.fixture
def serve(tmp_path: Path, upstream: FakeUpstream, upstream_server: FakeUpstreamServer) -> Any:
    """``served = serve()`` starts ``chat-gateway serve`` on ``tmp_path/g.db`` and waits
    until ``/healthz`` answers; all processes are killed at teardown."""
    started: list[Served] = []

    def start(command: list[str] | None = None, **extra_env: str | None) -> Served:
        served = Served(
            command or [console_script("chat-gateway"), "serve"],
            gateway_env(sqlite_url(tmp_path / "g.db"), upstream_server, **extra_env),
            tmp_path,
            f"serve{len(started) + 1}",
        )
        started.append(served)
        served.wait_healthy()
        return served

    try:
        yield start
    finally:
        for served in started:
            served.kill()


@contextlib.contextmanager
def websocket(served: Served, room_id: str) -> Iterator[ClientConnection]:
    url = f"ws://127.0.0.1:{served.port}/ws/rooms/{room_id}"
    with ws_connect(url, open_timeout=scaled(10), close_timeout=scaled(2)) as ws:
        ready = recv(ws)
        assert ready["type"] == "ready", ready
        yield ws


def recv(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    return orjson.loads(ws.recv(timeout=scaled(timeout)))


def until(ws: ClientConnection, kind: str, frames: list[dict[str, Any]] | None = None) -> dict:
    """Receive frames (kept in ``frames``) until one of type ``kind``; fail on errors."""
    while True:
        frame = recv(ws)
        if frames is not None:
            frames.append(frame)
        if frame["type"] == kind:
            return frame
        assert frame["type"] != "error", frame


def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    ws.send(orjson.dumps(frame).decode())


def create_room(served: Served, name: str = "cli room") -> dict[str, Any]:
    response = httpx2.post(
        f"{served.url}/api/rooms",
        json={"name": name, "persona": {"system_prompt": "Be brief."}},
        timeout=scaled(10),
    )
    assert response.status_code == 201, response.text
    return response.json()


def get_json(served: Served, path: str) -> Any:
    response = httpx2.get(f"{served.url}{path}", timeout=scaled(10))
    assert response.status_code == 200, response.text
    return response.json()


def full_answer(count: int) -> str:
    return "".join(f"tok{i} " for i in range(count))


# --------------------------------------------------------------------------- serve


def test_serve_creates_schema_serves_and_chats(serve: Any, tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    assert not db.exists()
    served = serve()

    # The schema was created by the server itself, at the newest revision.
    assert {"rooms", "messages", "alembic_version"} <= sqlite_tables(db)
    assert alembic_versions(db) == [head_revision()]

    room = create_room(served)
    with websocket(served, room["id"]) as ws:
        send(ws, {"type": "send", "content": "hi [[fake count=5 delay=0.01]]", "id": "c1"})
        frames: list[dict[str, Any]] = []
        done = until(ws, "done", frames)
    tokens = "".join(f["text"] for f in frames if f["type"] == "token")
    assert tokens == full_answer(5)
    assert done["message"]["content"] == full_answer(5)
    assert done["message"]["status"] == "complete"
    assert [f["type"] for f in frames][:2] == ["message", "start"]

    code = served.terminate()
    served.assert_stopped_gracefully(code)
    logs = served.logs()
    assert "provider openai" in logs, logs
    assert f"listening on http://127.0.0.1:{served.port}" in logs
    # Which database it opened, as an absolute path (a relative URL depends on the
    # folder it was started in); no alembic plugin lines.
    assert f"INFO gateway: database sqlite+aiosqlite:///{db}" in logs, logs
    assert "alembic.runtime.plugins" not in logs and "Context impl" not in logs


def test_serve_without_upstream_logs_the_local_model_it_chose(serve: Any) -> None:
    pytest.importorskip("llama_cpp", reason="needs the local extra: pip install -e '.[local]'")
    served = serve(
        OPENAI_BASE_URL=None,
        OPENAI_API_KEY=None,
        GATEWAY_DEFAULT_MODEL=None,
        GATEWAY_DEFAULT_MAX_TOKENS="40",
    )
    room = create_room(served)
    with websocket(served, room["id"]) as ws:
        send(ws, {"type": "send", "content": "Say hello."})
        start = until(ws, "start")
        done = until(ws, "done")
    assert start["message"]["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert done["message"]["content"]
    served.assert_stopped_gracefully(served.terminate())
    assert "provider local, default model SmolLM2-135M-Instruct.Q4_1" in served.logs()


def test_keys_and_tokens_never_appear_in_the_logs(serve: Any) -> None:
    key = "sk-never-log-me-123456"
    served = serve(GATEWAY_API_KEYS=f"alice={key}", GATEWAY_LOG_LEVEL="debug")
    auth = {"authorization": f"Bearer {key}"}
    room = httpx2.post(f"{served.url}/api/rooms", json={"name": "r"}, headers=auth).json()
    token = httpx2.post(f"{served.url}/api/tokens", headers=auth).json()["token"]
    url = f"ws://127.0.0.1:{served.port}/ws/rooms/{room['id']}?token={token}"
    with ws_connect(url, open_timeout=scaled(10)) as ws:
        assert recv(ws)["type"] == "ready"
    events = f"{served.url}/api/rooms/{room['id']}/events"
    with httpx2.stream("GET", events, params={"token": token}, timeout=scaled(10)) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    served.assert_stopped_gracefully(served.terminate())
    logs = served.logs()
    assert "token=[redacted]" in logs, logs
    assert token not in logs
    assert key not in logs


def test_secrets_sent_in_other_query_parameters_never_appear_in_the_logs(serve: Any) -> None:
    """A key wrongly sent as ``?api_key=`` (or ``key=``, ``access_token=``...) is
    redacted like a token, in the access log and in the WebSocket lines."""
    key = "sk-misplaced-key-987654"
    served = serve(GATEWAY_API_KEYS=f"alice={key}")
    for name in ("api_key", "key", "access_token", "apikey", "password", "secret"):
        assert httpx2.get(f"{served.url}/api/rooms?{name}={key}&limit=5").status_code == 401
    url = f"ws://127.0.0.1:{served.port}/ws/rooms/room_x?last_event_id=1&api_key={key}"
    with ws_connect(url, open_timeout=scaled(10)) as ws, pytest.raises(ConnectionClosed):
        recv(ws)
    served.assert_stopped_gracefully(served.terminate())
    logs = served.logs()
    assert key not in logs, logs
    assert "/api/rooms?api_key=[redacted]&limit=5" in logs, logs
    assert "last_event_id=1&api_key=[redacted]" in logs, logs


def test_python_dash_m_gateway_serves(serve: Any) -> None:
    served = serve([sys.executable, "-m", "gateway", "serve"])
    code = served.terminate()
    served.assert_stopped_gracefully(code)


def test_sigterm_exits_with_status_0(serve: Any) -> None:
    served = serve()
    assert served.terminate() == 0, served.logs()


# --------------------------------------------------------------------------- restarts


def test_rooms_and_all_answer_versions_survive_a_restart(
    serve: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["first ", "answer"]), Scenario(tokens=["second ", "answer"]))
    served = serve()
    room = create_room(served, "kept")
    with websocket(served, room["id"]) as ws:
        send(ws, {"type": "send", "content": "hello", "id": "c1"})
        first = until(ws, "done")["message"]
        send(ws, {"type": "regenerate", "message_id": first["id"]})
        second = until(ws, "done")["message"]
    assert (first["content"], second["content"]) == ("first answer", "second answer")
    before = get_json(served, f"/api/rooms/{room['id']}/messages")["messages"]
    assert [m["content"] for m in before] == ["hello", "second answer"]
    assert before[1]["siblings"] == [first["id"], second["id"]]
    served.assert_stopped_gracefully(served.terminate())

    again = serve()
    assert [r["id"] for r in get_json(again, "/api/rooms")["rooms"]] == [room["id"]]
    assert get_json(again, f"/api/rooms/{room['id']}")["name"] == "kept"
    assert get_json(again, f"/api/rooms/{room['id']}/messages")["messages"] == before

    # The older version is still stored too: switch the room's branch back to it.
    with websocket(again, room["id"]) as ws:
        send(ws, {"type": "select", "message_id": first["id"]})
        branch = until(ws, "branch")
    assert branch["active_leaf_id"] == first["id"]
    after = get_json(again, f"/api/rooms/{room['id']}/messages")["messages"]
    assert [(m["role"], m["content"], m["status"]) for m in after] == [
        ("user", "hello", "complete"),
        ("assistant", "first answer", "complete"),
    ]
    assert after[1]["siblings"] == [first["id"], second["id"]]
    again.assert_stopped_gracefully(again.terminate())


def test_sigterm_mid_answer_stores_it_as_interrupted(serve: Any) -> None:
    served = serve()
    room = create_room(served)
    seen = ""
    with websocket(served, room["id"]) as ws:
        send(ws, {"type": "send", "content": "long one [[fake count=500 delay=0.02]]"})
        tokens = 0
        while tokens < 3:
            frame = until(ws, "token")
            seen += frame["text"]
            tokens += 1
        code = served.terminate()
    served.assert_stopped_gracefully(code)

    again = serve()
    messages = get_json(again, f"/api/rooms/{room['id']}/messages")["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    answer = messages[1]
    assert answer["status"] == "interrupted", answer
    assert answer["error"]["code"] == "interrupted"
    # Everything streamed before the stop was kept (not just the last checkpoint),
    # and the answer really was cut short.
    assert answer["content"].startswith(seen), (seen, answer["content"])
    assert full_answer(500).startswith(answer["content"])
    assert answer["content"] != full_answer(500)
    # Stored by the graceful shutdown, not repaired at the next start.
    assert "left streaming by a crash" not in again.logs()
    again.assert_stopped_gracefully(again.terminate())


# --------------------------------------------------------------------------- config


def run_cli(
    tmp_path: Path, upstream_server: FakeUpstreamServer, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``chat-gateway ARGS`` to completion, on ``tmp_path/g.db``."""
    return subprocess.run(
        [console_script("chat-gateway"), *args],
        env=gateway_env(sqlite_url(tmp_path / "g.db"), upstream_server, **env),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def test_bad_port_setting_exits_2_naming_the_variable(
    tmp_path: Path, upstream_server: FakeUpstreamServer
) -> None:
    result = run_cli(tmp_path, upstream_server, "serve", GATEWAY_PORT="notaport")
    assert result.returncode == 2, result
    assert "GATEWAY_PORT" in result.stderr
    assert "notaport" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "g.db").exists()


def test_serving_beyond_loopback_without_allowed_hosts_warns_at_start(
    tmp_path: Path, upstream_server: FakeUpstreamServer
) -> None:
    # Port taken on loopback: binding 0.0.0.0 then fails, so nothing is ever exposed;
    # the warning has been logged by then.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        warned = run_cli(tmp_path, upstream_server, "serve", "--host", "0.0.0.0", "--port", port)
        configured = run_cli(
            tmp_path,
            upstream_server,
            *("serve", "--host", "0.0.0.0", "--port", port),
            GATEWAY_ALLOWED_HOSTS="chat.example.com",
        )
    assert "WARNING gateway: listening on 0.0.0.0, but GATEWAY_ALLOWED_HOSTS" in warned.stderr
    assert "GATEWAY_ALLOWED_HOSTS=chat.example.com" in warned.stderr, warned.stderr
    assert "GATEWAY_ALLOWED_HOSTS" not in configured.stderr, configured.stderr
    assert "address already in use" in configured.stderr.lower(), configured.stderr


def test_a_taken_port_is_said_at_once_naming_the_option(
    tmp_path: Path, upstream_server: FakeUpstreamServer
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli(tmp_path, upstream_server, "serve", "--port", port)
    assert result.returncode == 2, result
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr
    assert "--port or GATEWAY_PORT" in result.stderr
    assert "listening" not in result.stdout
    assert not (tmp_path / "g.db").exists()  # before migrating or loading anything


def test_a_local_model_that_is_not_a_file_is_refused_whatever_the_provider(
    tmp_path: Path, upstream_server: FakeUpstreamServer
) -> None:
    for provider in ("auto", "openai", "local"):
        result = run_cli(
            tmp_path,
            upstream_server,
            "serve",
            GATEWAY_PROVIDER=provider,
            GATEWAY_LOCAL_MODEL=str(tmp_path / "missing.gguf"),
        )
        assert result.returncode == 2, (provider, result)
        assert f"GATEWAY_LOCAL_MODEL={tmp_path / 'missing.gguf'} is not a file" in result.stderr
        assert "Traceback" not in result.stderr


def test_version_and_a_clean_help(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    version = run_cli(tmp_path, upstream_server, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == "chat-gateway 0.1.0"
    for args in ((), ("serve",), ("db",), ("db", "downgrade")):
        shown = run_cli(tmp_path, upstream_server, *args, "--help")
        assert shown.returncode == 0, shown
        assert "``" not in shown.stdout and "usage: chat-gateway" in shown.stdout


def test_a_bad_allowed_host_exits_2_naming_the_variable(
    tmp_path: Path, upstream_server: FakeUpstreamServer
) -> None:
    result = run_cli(
        tmp_path, upstream_server, "serve", GATEWAY_ALLOWED_HOSTS="https://chat.example.com"
    )
    assert result.returncode == 2
    assert "GATEWAY_ALLOWED_HOSTS" in result.stderr and "no scheme" in result.stderr


def test_several_workers_without_redis_is_refused_with_a_clear_error(
    tmp_path: Path, upstream_server: FakeUpstreamServer
) -> None:
    result = run_cli(tmp_path, upstream_server, "serve", "--workers", "2")
    assert result.returncode == 2, result
    assert "--workers 2 needs GATEWAY_REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- db


def run_db(tmp_path: Path, upstream_server: FakeUpstreamServer, *args: str) -> str:
    """``chat-gateway db ARGS``; what it printed."""
    result = run_cli(tmp_path, upstream_server, "db", *args)
    assert result.returncode == 0, result
    return result.stdout


def test_db_upgrade_then_downgrade(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    db = tmp_path / "g.db"
    db.touch()  # an empty file, as a fresh deployment might have
    said = run_db(tmp_path, upstream_server, "upgrade")
    assert said == f"sqlite+aiosqlite:///{db}: upgraded from empty to {head_revision()}\n"
    assert {"rooms", "messages", "alembic_version"} <= sqlite_tables(db)
    assert alembic_versions(db) == [head_revision()]

    said = run_db(tmp_path, upstream_server, "upgrade")  # already at head: a no-op
    assert said.endswith(f": already at revision {head_revision()}; nothing to do\n")
    assert alembic_versions(db) == [head_revision()]

    refused = run_cli(tmp_path, upstream_server, "db", "downgrade")
    assert refused.returncode == 2
    assert "drops tables" in refused.stderr and "--yes" in refused.stderr
    assert alembic_versions(db) == [head_revision()]  # nothing dropped

    said = run_db(tmp_path, upstream_server, "downgrade", "--yes")
    assert said.endswith(f": downgraded from {head_revision()} to empty\n")
    assert not {"rooms", "messages"} & sqlite_tables(db)
    assert alembic_versions(db) == []


def test_sigterm_with_websocket_and_event_stream_clients_mid_answer(serve: Any) -> None:
    served = serve()
    room = create_room(served)
    lines: list[str] = []
    events_url = f"{served.url}/api/rooms/{room['id']}/events"

    streaming = threading.Event()

    def read_events() -> None:
        with httpx2.stream("GET", events_url, timeout=scaled(20)) as response:
            for line in response.iter_lines():  # until the server ends the stream
                lines.append(line)
                streaming.set()

    sse = threading.Thread(target=read_events)
    sse.start()
    # Subscribed before the answer starts (its first token may come within a few ms).
    assert streaming.wait(scaled(10))
    with websocket(served, room["id"]) as ws:
        send(ws, {"type": "send", "content": "long one [[fake count=1000 delay=0.02]]"})
        until(ws, "token")
        code = served.terminate()
        frames = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                frames.append(recv(ws))
        assert ws.close_code == 1012
    sse.join(scaled(10))
    served.assert_stopped_gracefully(code)
    assert "Exception in ASGI application" not in served.logs()
    assert "Cancel" not in served.logs()
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "interrupted", frames[-3:]
    assert "event: error" in lines and '"code":"interrupted"' in "".join(lines), lines[-6:]


def test_json_logs_have_a_line_per_answer_and_per_connection(serve: Any) -> None:
    key = "sk-json-logs-123456"
    served = serve(GATEWAY_LOG_FORMAT="json", GATEWAY_API_KEYS=f"alice={key}")
    headers = {"authorization": f"Bearer {key}"}
    response = httpx2.post(
        f"{served.url}/api/rooms",
        json={"name": "logged"},
        headers={**headers, "x-request-id": "trace-abc-123"},
        timeout=scaled(10),
    )
    assert response.headers["x-request-id"] == "trace-abc-123"  # a proxy's id, kept
    room = response.json()
    url = f"ws://127.0.0.1:{served.port}/ws/rooms/{room['id']}?name=Alice"
    with ws_connect(url, additional_headers=headers, open_timeout=scaled(10)) as ws:
        assert recv(ws)["type"] == "ready"
        send(ws, {"type": "send", "content": "hi [[fake count=5 delay=0.01]]"})
        until(ws, "done")
    served.assert_stopped_gracefully(served.terminate())

    text = served.stderr_path.read_text()
    assert key not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]  # all JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    answer = next(line for line in lines if line.get("event") == "answer")
    assert answer["logger"] == "gateway.answers"
    assert (answer["room"], answer["status"], answer["tokens"]) == (room["id"], "complete", 5)
    assert answer["model"] == "fake-model" and answer["sender"] == "key:alice"
    assert answer["ttft_ms"] >= 0 and answer["duration_ms"] >= answer["ttft_ms"]
    closed = next(line for line in lines if line.get("event") == "connection closed")
    assert closed["transport"] == "websocket" and closed["person"] == "alice"
    assert closed["reason"] == "client_left" and closed["seconds"] > 0
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any(line.get("request_id") == "trace-abc-123" for line in access), access
    # The socket's own id (none was sent), on its answer's line too.
    assert closed["request_id"].startswith("req_")
    assert answer["request_id"] == closed["request_id"]
    assert any(line["message"].startswith("database sqlite") for line in lines)
