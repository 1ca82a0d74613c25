"""Raw-socket helpers: WebSocket frames by hand and the kernel's view of connections."""

from __future__ import annotations

import base64
import os
import socket
import struct
from pathlib import Path

ESTABLISHED = "01"


def tcp_state(server_port: int, client: socket.socket) -> str | None:
    """The server side's TCP state (``/proc/net/tcp`` hex code, "01" established) of
    ``client``'s connection to ``server_port`` on 127.0.0.1; None once it is gone."""
    client_port = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == server_port and remote_port == client_port:
            return fields[3]
    return None


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (FIN set)."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each complete unmasked server frame in ``data``."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            if i + 2 > len(data):
                break
            (length,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif length == 127:
            if i + 8 > len(data):
                break
            (length,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        if i + length > len(data):
            break
        frames.append((opcode, data[i : i + length]))
        i += length
    return frames


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    """The code of the close frame (opcode 8) among ``frames``, if any."""
    for opcode, payload in frames:
        if opcode == 8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    return None


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything ``sock`` receives until the peer closes (or resets) it."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def open_stalled_socket(port: int, room_id: str) -> socket.socket:
    """Complete a WebSocket handshake on a raw socket, then never read from it."""
    sock = socket.socket()
    # A small receive buffer keeps the kernel from absorbing the whole answer.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/rooms/{room_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
