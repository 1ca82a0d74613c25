"""Who is in a room: a person's identity, as a connection or request presents it.

With API keys, a person's id is their key's name (it cannot be spoofed) and the
display name is theirs to choose (by default the key's name). Without keys there are
no real identities: a client may keep a stable id of its own choosing (a browser
keeps one in localStorage) and a display name; without one it is a ``guest-xxxx``
for as long as the connection lasts. One person may have several connections (tabs,
processes): presence counts people, not connections.

Pure: nothing here awaits or does I/O.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.access import Viewer
from gateway.errors import BadRequest

MAX_NAME_CHARS = 64
USER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ALLOWED_FORMAT = {"\u200d"}  # the zero-width joiner of emoji sequences


@dataclass(frozen=True, slots=True)
class Person:
    """Someone in a room: a stable ``id`` and the ``name`` others see."""

    id: str
    name: str

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


def check_name(raw: str) -> str:
    """A display name, trimmed; raises ``invalid_name``: blank, over 64 characters,
    or holding control or formatting characters (line breaks, bidi overrides, NUL)."""
    name = raw.strip()
    if not name:
        raise BadRequest("a display name must not be blank", code="invalid_name")
    if len(name) > MAX_NAME_CHARS:
        raise BadRequest(
            f"a display name has at most {MAX_NAME_CHARS} characters, not {len(name)}",
            code="invalid_name",
        )
    for char in name:
        if unicodedata.category(char).startswith("C") and char not in _ALLOWED_FORMAT:
            raise BadRequest(
                f"a display name must not contain the character U+{ord(char):04X}",
                code="invalid_name",
            )
    return name


def check_user_id(raw: str) -> str:
    """A client-chosen id; raises ``invalid_user`` unless 1-64 of ``A-Z a-z 0-9 . _ -``."""
    if not USER_ID.fullmatch(raw):
        raise BadRequest(
            "a user id is 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
            code="invalid_user",
        )
    return raw


def identify(viewer: Viewer, params: Mapping[str, str]) -> Person:
    """The person behind a connection or request, from its ``name`` and ``user``
    query parameters. With keys, ``user`` is ignored: the key names the person."""
    name = params.get("name") or None  # an empty parameter is no parameter
    if name is not None:
        name = check_name(name)
    if viewer.enforced and viewer.key_name is not None:
        return Person(viewer.key_name, name or viewer.key_name)
    user = params.get("user")
    if user:
        user_id = check_user_id(user)
    else:
        user_id = f"guest-{secrets.token_hex(2)}"
    return Person(user_id, name or user_id)
