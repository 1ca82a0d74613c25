"""``chat-gateway`` command line: ``serve`` and ``db upgrade|downgrade``."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from typing import Any

from gateway.settings import Settings, SettingsError, load_settings

log = logging.getLogger("gateway")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-gateway", description=__doc__)
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
    down = db_commands.add_parser("downgrade", help="migrate down (default: to empty)")
    down.add_argument("revision", nargs="?", default="base")

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
    configure_logging(settings.log_level)

    if args.command == "db":
        from gateway.store import db as database

        if args.db_command == "upgrade":
            database.upgrade(settings.database_url, args.revision)
        else:
            database.downgrade(settings.database_url, args.revision)
        return 0

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
    print(f"chat-gateway listening on http://{settings.host}:{settings.port}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with
    # the previous handlers restored. Make those no-ops, so a clean shutdown exits 0
    # instead of dying by the signal (or printing a KeyboardInterrupt traceback).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    if args.workers > 1:
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
    server.run()
    return 0 if server.started else 3  # uvicorn's exit status for a failed startup


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


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper() if level != "trace" else logging.DEBUG,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def worker_app() -> Any:
    """The app of one ``serve --workers N`` process (settings from the environment)."""
    from gateway.app import create_app
    from gateway.server import tune_gc

    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    tune_gc()
    return app


if __name__ == "__main__":
    sys.exit(main())
