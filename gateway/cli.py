"""``chat-gateway`` command line: ``serve`` and ``db upgrade|downgrade``."""

from __future__ import annotations

import argparse
import atexit
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway import installed_version, logs
from gateway.settings import Settings, SettingsError, load_settings

log = logging.getLogger("gateway")

DESCRIPTION = """\
Shared, persistent, streaming chat rooms in front of any OpenAI-compatible model.
Settings come from the environment and .env (GATEWAY_*, OPENAI_*: see README)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-gateway", description=DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"chat-gateway {installed_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    serve.add_argument("--log-level", help="GATEWAY_LOG_LEVEL, default info")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (more than 1 needs GATEWAY_REDIS_URL)",
    )

    db = commands.add_parser("db", help="manage the database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    up = db_commands.add_parser("upgrade", help="migrate to the newest revision")
    up.add_argument("revision", nargs="?", default="head")
    down = db_commands.add_parser(
        "downgrade", help="migrate down (default: to empty, which deletes every room)"
    )
    down.add_argument("revision", nargs="?", default="base")
    down.add_argument("--yes", action="store_true", help="yes, drop what the revision drops")

    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key in ("host", "port", "log_level")
        if (value := getattr(args, key, None)) is not None
    }
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)

    if args.command == "db":
        return manage_database(settings, args)

    import uvicorn

    from gateway.app import create_app
    from gateway.server import Server, tune_gc, uvicorn_options

    if args.workers < 1:
        print("chat-gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and not settings.redis_url:
        print(
            f"chat-gateway: --workers {args.workers} needs GATEWAY_REDIS_URL: worker "
            "processes share rooms, live answers and resume history through Redis "
            "(without it, each would be a separate gateway on one port)",
            file=sys.stderr,
        )
        return 2
    try:
        app = create_app(settings)  # also checks what the workers will build
    except SettingsError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    warning = host_warning(settings)
    if warning is not None:
        log.warning(warning)
    # Bound before anything slow (migrations, loading a model): a taken port is said
    # at once, and "listening" is true when printed.
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"chat-gateway: {port_problem(settings.host, settings.port, exc)}", file=sys.stderr)
        return 2
    print(f"chat-gateway listening on http://{settings.host}:{settings.port}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with
    # the previous handlers restored. Make those no-ops, so a clean shutdown exits 0
    # instead of dying by the signal (or printing a KeyboardInterrupt traceback).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    if args.workers > 1:
        sock.close()  # uvicorn binds it again for its workers
        if settings.metrics:
            share_metrics_between_workers()
        # Each worker builds its own app from the environment: pass the command
        # line's choices on to it that way.
        for key, value in overrides.items():
            os.environ[f"GATEWAY_{key.upper()}"] = str(value)
        uvicorn.run(  # each worker tunes its collector in worker_app()
            "gateway.cli:worker_app",
            factory=True,
            workers=args.workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            **uvicorn_options(settings),
        )
        return 0
    tune_gc()
    server = Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            **uvicorn_options(settings),
        )
    )
    server.run(sockets=[sock])
    return 0 if server.started else 3  # uvicorn's exit status for a failed startup


def share_metrics_between_workers() -> None:
    """Give the workers one folder for their metrics (prometheus-client's multiprocess
    mode, read when they start): ``PROMETHEUS_MULTIPROC_DIR`` if set, emptied of an
    earlier run's values, else a new temporary folder removed at exit."""
    from gateway.metrics import MULTIPROCESS_ENV

    folder = os.environ.get(MULTIPROCESS_ENV)
    if folder:
        for stale in Path(folder).glob("*.db"):
            stale.unlink()
        return
    made = tempfile.mkdtemp(prefix="chat-gateway-metrics-")
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    os.environ[MULTIPROCESS_ENV] = made


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``, as uvicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def port_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {host}:{port}: address already in use (another gateway?); "
            "choose another port with --port or GATEWAY_PORT"
        )
    if exc.errno == errno.EACCES:
        return f"cannot listen on {host}:{port}: permission denied (ports below 1024 need root)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc} (check --host and --port)"


def manage_database(settings: Settings, args: argparse.Namespace) -> int:
    """``db upgrade`` and ``db downgrade``, saying what they did."""
    from gateway.store import db as database

    where = database.describe_database(settings.database_url)
    before = database.current_revision(settings.database_url)
    if args.db_command == "downgrade":
        if not args.yes:
            print(
                f"chat-gateway: db downgrade {args.revision} drops tables of {where}"
                f"{' (every room and message)' if args.revision == 'base' else ''}; "
                "run it again with --yes to go ahead",
                file=sys.stderr,
            )
            return 2
        database.downgrade(settings.database_url, args.revision)
    else:
        database.upgrade(settings.database_url, args.revision)
    after = database.current_revision(settings.database_url)
    if before == after:
        print(f"{where}: already at revision {after or 'none (empty)'}; nothing to do")
    else:
        verb = "downgraded" if args.db_command == "downgrade" else "upgraded"
        print(f"{where}: {verb} from {before or 'empty'} to {after or 'empty'}")
    return 0


def host_warning(settings: Settings) -> str | None:
    """What to tell an operator who binds beyond loopback (``--host 0.0.0.0``) but
    left ``GATEWAY_ALLOWED_HOSTS`` at its default; None otherwise."""
    if settings.allowed_hosts_set or is_loopback(settings.host):
        return None
    return (
        f"listening on {settings.host}, but GATEWAY_ALLOWED_HOSTS is not set: requests "
        "addressed to a host name other than localhost are refused (400 "
        "host_not_allowed; IP addresses are served). Set GATEWAY_ALLOWED_HOSTS to the "
        "names clients use, e.g. GATEWAY_ALLOWED_HOSTS=chat.example.com (or '*' behind "
        "a proxy that checks the Host itself)."
    )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def worker_app() -> Any:
    """The app of one ``serve --workers N`` process (settings from the environment)."""
    from gateway.app import create_app
    from gateway.server import tune_gc

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    tune_gc()
    return app


if __name__ == "__main__":
    sys.exit(main())
