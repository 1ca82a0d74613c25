"""What the wheel carries (``.ci/check-wheel`` installs it and serves from it): every
package of ``gateway/``, the migrations and the UI."""

from __future__ import annotations

import tomllib
from pathlib import Path

from gateway.bundled import bundled_dir

REPO = Path(__file__).resolve().parent.parent


def test_every_package_of_the_gateway_is_in_the_wheel() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "gateway").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    for package in on_disk:
        assert (REPO / package.replace(".", "/") / "__init__.py").is_file(), package
    assert setuptools["package-dir"] == {
        "gateway.migrations": "migrations",
        "gateway.static": "static",
    }


def test_a_checkout_finds_its_migrations_and_ui_at_the_top() -> None:
    assert bundled_dir("migrations") == REPO / "migrations"
    assert (bundled_dir("migrations") / "env.py").is_file()
    assert (bundled_dir("static") / "index.html").is_file()
