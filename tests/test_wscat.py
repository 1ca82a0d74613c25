"""The README's ``wscat`` example, run with the real ``wscat`` binary::

    wscat -c 'ws://127.0.0.1:8000/ws/rooms/ROOM_ID?name=Alice' \\
        -x '{"type":"send","content":"Hello!"}' -w 3

``-x`` sends the frame once connected, ``-w 3`` waits three seconds and closes.
Without a terminal wscat prints each received frame on its own line.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import Gateway, covered_seqs, numbered, scaled

pytestmark = pytest.mark.slow


def run_wscat(
    wscat: str, url: str, frame: str, workdir: Path, *options: str
) -> tuple[int, str, str]:
    """Run the README command (plus ``options``); return (exit status, stdout, stderr)."""
    stdout_path, stderr_path = workdir / "wscat.stdout", workdir / "wscat.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [wscat, "-c", url, *options, "-x", frame, "-w", "3"],
            # stdin stays open: wscat quits at once, printing nothing, on end of input.
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        code = process.wait(scaled(20))
    finally:
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(scaled(10))
        assert process.stdin is not None
        process.stdin.close()
    return code, stdout_path.read_text(), stderr_path.read_text()


@pytest.fixture
def wscat() -> str:
    """The wscat command (CI installs it: .ci/run)."""
    found = shutil.which("wscat")
    if found is None:
        pytest.skip("wscat not installed: npm install -g wscat")
    return found


async def test_readme_wscat_example(
    wscat: str, gateway: Gateway, room: dict[str, Any], http: Any, tmp_path: Path
) -> None:
    frame = orjson.dumps({"type": "send", "content": "Hello! [[fake count=5 delay=0.01]]"})

    code, stdout, stderr = await asyncio.to_thread(
        run_wscat, wscat, gateway.ws_url(room["id"], "?name=Alice"), frame.decode(), tmp_path
    )

    assert code == 0, (code, stdout, stderr)
    assert stderr == ""
    printed = [orjson.loads(line) for line in stdout.splitlines() if line.strip()]
    # A moment after joining, the room (Alice included) hears that she came.
    arrivals = [f["joined"] for f in printed if f["type"] == "presence"]
    assert arrivals == [[printed[0]["you"]]], stdout
    frames = [f for f in printed if f["type"] != "presence"]
    kinds = [f["type"] for f in frames]
    assert kinds[:1] == ["ready"], (kinds, stdout, stderr)
    assert frames[0]["room"]["id"] == room["id"]
    assert frames[0]["members"] == [frames[0]["you"]]
    assert frames[0]["you"]["name"] == "Alice"
    assert "message" in kinds
    sent = next(f for f in frames if f["type"] == "message")
    assert sent["message"]["author"] == {**frames[0]["you"], "kind": "user"}
    assert kinds[-1] == "done", kinds
    tokens = [f for f in frames if f["type"] == "token"]
    assert len(tokens) >= 2, kinds
    assert numbered(covered_seqs(tokens))
    text = "".join(t["text"] for t in tokens)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    done = frames[-1]
    assert done["message"]["content"] == text
    assert done["message"]["status"] == "complete"

    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert stored[0]["content"] == "Hello! [[fake count=5 delay=0.01]]"
    assert stored[1]["content"] == text


async def test_wscat_with_the_key_as_a_header(
    wscat: str, start_gateway: Any, tmp_path: Path
) -> None:
    """``wscat -H "Authorization: Bearer $KEY"``: no token needed by a script."""
    key = "sk-alice-0123456789"
    gateway = start_gateway(api_keys=[f"alice={key}"])
    room = await create_room_as(gateway, key)
    frame = orjson.dumps({"type": "ping", "id": "p-1"}).decode()
    url = gateway.ws_url(room["id"])

    code, stdout, stderr = await asyncio.to_thread(
        run_wscat, wscat, url, frame, tmp_path, "-H", f"Authorization: Bearer {key}"
    )

    assert code == 0, (code, stdout, stderr)
    frames = [orjson.loads(line) for line in stdout.splitlines() if line.strip()]
    assert [f["type"] for f in frames] == ["ready", "pong", "presence"], (stdout, stderr)
    assert frames[0]["you"] == {"id": "alice", "name": "alice"}  # the key's name
    assert frames[2]["joined"] == [frames[0]["you"]]


async def create_room_as(gateway: Gateway, key: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        response = await http.post(
            "/api/rooms", json={"name": "r"}, headers={"authorization": f"Bearer {key}"}
        )
    assert response.status_code == 201, response.text
    return response.json()
