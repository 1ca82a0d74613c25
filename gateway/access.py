"""Who may use the gateway: API keys, and the short-lived tokens minted from them.

A key is a long-lived secret a client sends as ``Authorization: Bearer <key>``. A
browser cannot set that header on a WebSocket or an ``EventSource``, and a key in a
URL ends up in logs, histories and proxies; so a client holding a key asks
``POST /api/tokens`` for a token — signed, naming the key (never containing it), valid
for a minute by default — and passes that in the URL instead.

Keys are configured as ``name=secret`` (or a bare ``secret``, named after a hash of
it) in ``GATEWAY_API_KEYS`` or a file. Only the name is ever logged or put in a token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from gateway.errors import Unauthorized
from gateway.store.models import Room


@dataclass(frozen=True, slots=True)
class Client:
    """An authenticated caller: the name of its key."""

    key_name: str


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking at rooms. ``enforced`` is False when the gateway has no keys:
    then there are no identities, and every room is open to everyone."""

    key_name: str | None = None
    enforced: bool = False

    def can_see(self, room: Room) -> bool:
        """Private rooms: the owner and granted keys only. Others are told the room
        does not exist (404), so room ids cannot be probed."""
        if not self.enforced or not room.private:
            return True
        return self.key_name is not None and (
            self.key_name == room.owner or self.key_name in room.granted
        )

    def sees_in(self, view: Mapping[str, Any]) -> bool:
        """Whether a room's client view (``Room.to_dict()``, as in a ``room`` frame)
        shows that this viewer may see the room. False for a private room it does not
        own: the view has no grants (they are the owner's business), so only the room
        itself can tell."""
        return (
            not self.enforced
            or not view.get("private")
            or (self.key_name is not None and self.key_name == view.get("owner"))
        )

    def owns(self, room: Room) -> bool:
        """May change or delete the room, and read a secret system prompt."""
        return not self.enforced or room.owner is None or self.key_name == room.owner


OPEN = Viewer()
"""The viewer when access control is off."""


def parse_keys(entries: list[str]) -> dict[str, str]:
    """``name=secret`` or ``secret`` entries → ``{secret: name}``. Blank entries and
    ``#`` comments are skipped; raises ValueError for a duplicate name or secret."""
    keys: dict[str, str] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, secret = entry.partition("=")
        if not sep:
            secret = entry
            name = "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        name, secret = name.strip(), secret.strip()
        if not name or not secret:
            raise ValueError(f"an API key entry needs a name and a secret: {name or '?'}=…")
        if secret in keys or name in keys.values():
            raise ValueError(f"API key {name!r} is configured twice")
        keys[secret] = name
    return keys


def read_keys_file(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


class AccessControl:
    """Checks keys and tokens. Disabled (everyone allowed) when no key is configured."""

    def __init__(
        self, keys: dict[str, str], *, token_secret: str | None = None, token_ttl: float = 60
    ) -> None:
        # Look keys up by their digest: the comparison then takes the same time
        # whatever the presented key shares with a real one.
        self._by_digest = {_digest(secret): name for secret, name in keys.items()}
        self.token_ttl = token_ttl
        # Without a configured secret, tokens are valid in this process only.
        self._tokens = URLSafeTimedSerializer(
            token_secret or secrets.token_urlsafe(32), salt="chat-gateway ws token"
        )

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def check_key(self, key: str | None) -> Client:
        """The client a bearer key belongs to; raises :class:`Unauthorized`."""
        if key:
            digest = _digest(key)
            for known, name in self._by_digest.items():
                if hmac.compare_digest(known, digest):
                    return Client(name)
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")

    def mint_token(self, client: Client) -> str:
        return self._tokens.dumps({"k": client.key_name})

    def check_token(self, token: str | None) -> Client:
        """The client a URL token was minted for; raises :class:`Unauthorized`."""
        if not token:
            raise Unauthorized("a token is required: get one from POST /api/tokens")
        try:
            data = self._tokens.loads(token, max_age=self.token_ttl)
        except SignatureExpired:
            raise Unauthorized(
                "the token has expired: get a new one from POST /api/tokens"
            ) from None
        except BadSignature:
            raise Unauthorized("the token is not valid") from None
        name = data.get("k") if isinstance(data, dict) else None
        if name not in self._by_digest.values():
            raise Unauthorized("the token's key is no longer configured")
        return Client(name)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
