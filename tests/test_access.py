"""Access control: API keys, short-lived URL tokens, and the WebSocket Origin check.

Every refusal happens before any room data is sent, and nothing is stored or sent
upstream for a refused request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
import websockets

from gateway.testing.fake_upstream import FakeUpstream
from tests.conftest import Client, Gateway, SSEClient, scaled

KEY = "sk-alice-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def locked(start_gateway: Any) -> Gateway:
    """A gateway that needs a key."""
    return start_gateway(api_keys=[f"alice={KEY}", "bob=sk-bob-9876543210"])


async def new_room(gateway: Gateway, headers: dict[str, str]) -> dict[str, Any]:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        response = await http.post("/api/rooms", json={"name": "r"}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def token_for(gateway: Gateway, headers: dict[str, str] = AUTH) -> str:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        response = await http.post("/api/tokens", headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["expires_in"] > 0
    return response.json()["token"]


async def refused_websocket(url: str, **options: Any) -> websockets.ConnectionClosed:
    """Connect to ``url`` and expect a close 1008 with no frame before it."""
    async with websockets.connect(url, **options) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            frame = await asyncio.wait_for(ws.recv(), scaled(5))
            pytest.fail(f"got a frame from a refused connection: {frame}")
    assert ws.close_code == 1008
    return closed.value


# --------------------------------------------------------------------------- REST


async def test_without_keys_configured_the_api_is_open(gateway: Gateway) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        assert (await http.get("/api/rooms")).status_code == 200
        assert (await http.post("/api/tokens")).status_code == 201


async def test_api_needs_a_valid_bearer_key(locked: Gateway, upstream: FakeUpstream) -> None:
    async with httpx2.AsyncClient(base_url=locked.url, timeout=scaled(10)) as http:
        for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": KEY}]:
            response = await http.get("/api/rooms", headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await http.get("/api/rooms", headers=AUTH)).status_code == 200
        # The UI's files and the health check stay open.
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/healthz")).status_code == 200

        room = await new_room(locked, AUTH)
        refused = await http.post(f"/api/rooms/{room['id']}/messages", json={"content": "hi"})
        assert refused.status_code == 401
        messages = await http.get(f"/api/rooms/{room['id']}/messages", headers=AUTH)
        assert messages.json()["messages"] == []
    assert upstream.requests == []


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_needs_a_token_minted_from_a_key(
    locked: Gateway, upstream: FakeUpstream
) -> None:
    room = await new_room(locked, AUTH)
    url = locked.ws_url(room["id"])
    await refused_websocket(url)  # no token
    await refused_websocket(f"{url}?token={KEY}")  # the long-lived key is not a token
    token = await token_for(locked)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    await refused_websocket(f"{url}?token={tampered}")

    async with websockets.connect(f"{url}?token={token}") as ws:
        client = Client(ws)
        assert (await client.recv())["type"] == "ready"
        await client.send({"type": "send", "content": "hi [[fake count=2]]"})
        assert (await client.until("done"))["message"]["content"] == "tok0 tok1 "


async def test_websocket_and_event_stream_take_the_key_as_a_bearer_header_too(
    locked: Gateway,
) -> None:
    """Scripts (``wscat -H``, curl) can send the header a browser cannot."""
    room = await new_room(locked, AUTH)
    url = locked.ws_url(room["id"])
    async with websockets.connect(url, additional_headers=AUTH) as ws:
        assert (await Client(ws).recv())["type"] == "ready"
    wrong = {"authorization": "Bearer sk-wrong-0000000000"}
    closed = await refused_websocket(url, additional_headers=wrong)
    assert closed.rcvd is not None and closed.rcvd.reason == "unauthorized"
    # A wrong key is refused even beside a valid token: the header is what was meant.
    await refused_websocket(f"{url}?token={await token_for(locked)}", additional_headers=wrong)

    path = f"/api/rooms/{room['id']}/events"
    async with httpx2.AsyncClient(base_url=locked.url, timeout=scaled(10)) as http:
        async with http.stream("GET", path, headers=AUTH) as response:
            assert response.status_code == 200
            assert (await SSEClient(response).next()).type == "ready"
        assert (await http.get(path, headers=wrong)).status_code == 401


async def test_an_expired_token_is_refused(start_gateway: Any) -> None:
    gateway = start_gateway(api_keys=[f"alice={KEY}"], token_ttl=1)
    room = await new_room(gateway, AUTH)
    token = await token_for(gateway)
    await asyncio.sleep(2.1)  # the signature's timestamp has a resolution of 1 s
    await refused_websocket(f"{gateway.ws_url(room['id'])}?token={token}")


async def test_tokens_signed_with_another_secret_are_refused(start_gateway: Any) -> None:
    one = start_gateway(api_keys=[f"alice={KEY}"], token_secret="secret-one")
    token = await token_for(one)
    one.stop()
    other = start_gateway(api_keys=[f"alice={KEY}"], token_secret="secret-two")
    room = await new_room(other, AUTH)
    await refused_websocket(f"{other.ws_url(room['id'])}?token={token}")
    again = start_gateway(api_keys=[f"alice={KEY}"], token_secret="secret-two")
    async with websockets.connect(
        f"{again.ws_url(room['id'])}?token={await token_for(other)}"
    ) as ws:
        assert (await Client(ws).recv())["type"] == "ready"  # same secret: any process


async def test_event_stream_takes_a_token_in_the_url(locked: Gateway) -> None:
    room = await new_room(locked, AUTH)
    async with httpx2.AsyncClient(base_url=locked.url, timeout=scaled(10)) as http:
        path = f"/api/rooms/{room['id']}/events"
        assert (await http.get(path)).status_code == 401
        assert (await http.get(path, params={"token": "forged"})).status_code == 401
        token = await token_for(locked)
        async with http.stream("GET", path, params={"token": token}) as response:
            assert response.status_code == 200
            assert (await SSEClient(response).next()).type == "ready"


# --------------------------------------------------------------------------- Origin


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "null",
        "https://app.example.com.evil.example",
        "https://evil.example/https://app.example.com",
        "http://app.example.com",  # scheme differs
    ],
)
async def test_websocket_from_a_foreign_origin_is_refused(start_gateway: Any, origin: str) -> None:
    gateway = start_gateway(allowed_origins=["https://app.example.com"])
    room = await new_room(gateway, {})
    closed = await refused_websocket(gateway.ws_url(room["id"]), origin=origin)
    assert closed.rcvd is not None and closed.rcvd.reason == "origin_not_allowed"


async def test_websocket_from_an_allowed_origin_or_none_is_accepted(start_gateway: Any) -> None:
    gateway = start_gateway(allowed_origins=["https://app.example.com"])
    room = await new_room(gateway, {})
    for options in [{"origin": "https://app.example.com"}, {}]:
        async with websockets.connect(gateway.ws_url(room["id"]), **options) as ws:
            assert (await Client(ws).recv())["type"] == "ready"


async def test_by_default_only_the_same_origin_may_open_a_websocket(gateway: Gateway) -> None:
    room = await new_room(gateway, {})
    async with websockets.connect(gateway.ws_url(room["id"]), origin=gateway.url) as ws:
        assert (await Client(ws).recv())["type"] == "ready"
    await refused_websocket(gateway.ws_url(room["id"]), origin="http://localhost:1")


async def test_cors_allows_exactly_the_configured_origins(start_gateway: Any) -> None:
    gateway = start_gateway(allowed_origins=["https://app.example.com"], api_keys=[KEY])
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        allowed = await http.options(
            "/api/rooms", headers={"origin": "https://app.example.com", **preflight}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        foreign = await http.options(
            "/api/rooms", headers={"origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in foreign.headers
        anonymous = await http.get("/api/rooms", headers={"origin": "https://app.example.com"})
        assert anonymous.status_code == 401  # an allowed origin is not a credential
        keyed = await http.get("/api/rooms", headers={"origin": "https://app.example.com", **AUTH})
        assert keyed.status_code == 200
        assert keyed.headers["access-control-allow-origin"] == "https://app.example.com"


# --------------------------------------------------------------------------- Host


async def refused_host(gateway: Gateway, host: str) -> None:
    """Every route but /healthz refuses ``host`` (DNS rebinding): REST, the UI, SSE
    with 400 ``host_not_allowed``, WebSocket with 1008; nothing is created."""
    origin = f"http://{host}"  # the page's own origin, as a rebound page has
    headers = {"host": host, "origin": origin}
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        rooms = (await http.get("/api/rooms")).json()["rooms"]
        for method, path in [
            ("POST", "/api/rooms"),
            ("GET", "/api/rooms"),
            ("GET", "/"),
            ("GET", "/api/rooms/room_x/events"),
            ("POST", "/api/tokens"),
            ("GET", "/readyz"),
        ]:
            response = await http.request(method, path, headers=headers, json={"name": "r"})
            assert response.status_code == 400, (host, path, response.text)
            assert response.json()["error"]["code"] == "host_not_allowed"
        assert (await http.get("/healthz", headers=headers)).status_code == 200
        assert (await http.get("/api/rooms")).json()["rooms"] == rooms
    port = gateway.server.port
    closed = await refused_websocket(
        f"ws://{host}/ws/rooms/room_x", host="127.0.0.1", port=port, origin=origin
    )
    assert closed.rcvd is not None and closed.rcvd.reason == "host_not_allowed"


async def allowed_host(gateway: Gateway, host: str) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        response = await http.post(
            "/api/rooms", json={"name": "r"}, headers={"host": host, "origin": f"http://{host}"}
        )
        assert response.status_code == 201, (host, response.text)
    url = f"ws://{host}/ws/rooms/{response.json()['id']}"
    async with websockets.connect(
        url, host="127.0.0.1", port=gateway.server.port, origin=f"http://{host.lower()}"
    ) as ws:
        assert (await Client(ws).recv())["type"] == "ready", host


async def test_by_default_only_loopback_names_and_addresses_are_served(gateway: Gateway) -> None:
    port = gateway.server.port
    for host in [f"rebind.evil.example:{port}", "localhost.evil.example", "evil.localhost"]:
        await refused_host(gateway, host)
    # IP addresses cannot be rebound: any is served (a load balancer's probe, a LAN).
    for host in [
        f"localhost:{port}",
        "LocalHost.",
        f"127.0.0.1:{port}",
        f"[::1]:{port}",
        "10.0.0.7",
    ]:
        await allowed_host(gateway, host)


async def test_allowed_hosts_name_the_hosts_of_a_deployment(start_gateway: Any) -> None:
    gateway = start_gateway(allowed_hosts=["chat.example.com", "*.example.org"])
    for host in ["chat.example.com:8443", "a.b.example.org", "[::1]"]:
        await allowed_host(gateway, host)
    for host in ["example.org", "chat.example.com.evil.example", "localhost", "evilexample.org"]:
        await refused_host(gateway, host)
    anything = start_gateway(allowed_hosts=["*"])
    await allowed_host(anything, "rebind.evil.example")
