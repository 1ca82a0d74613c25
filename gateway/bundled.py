"""Where the files shipped with the gateway are: the Alembic migrations and the UI.

A checkout (and an editable install) keeps them at the top of the repository,
``migrations/`` and ``static/``; a wheel carries them inside the package,
``gateway/migrations`` and ``gateway/static`` (see ``pyproject.toml``)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def bundled_dir(name: str) -> Path:
    """The folder ``name`` (``migrations`` or ``static``), installed or in a checkout."""
    installed = PACKAGE / name
    return installed if installed.is_dir() else PACKAGE.parent / name
