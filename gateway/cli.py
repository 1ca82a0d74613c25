"""``chat-gateway`` command line: ``serve`` and ``db upgrade|downgrade``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from gateway.settings import SettingsError, load_settings

# How uvicorn runs the gateway (the test suite and benchmarks use the same options).
UVICORN_OPTIONS: dict[str, object] = {
    # Frames above this are refused by uvicorn itself (close 1009); below it, frames
    # over GATEWAY_MAX_FRAME_BYTES get an error frame and the connection stays open.
    "ws_max_size": 4 * 1024 * 1024,
    # Token frames are a few dozen bytes: compressing each costs more CPU (measured
    # 25-35 us per token) than it saves on the wire.
    "ws_per_message_deflate": False,
    "timeout_graceful_shutdown": 10,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    serve.add_argument("--log-level", help="GATEWAY_LOG_LEVEL, default info")

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
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else logging.DEBUG,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    if args.command == "db":
        from gateway.store import db as database

        if args.db_command == "upgrade":
            database.upgrade(settings.database_url, args.revision)
        else:
            database.downgrade(settings.database_url, args.revision)
        return 0

    import uvicorn

    from gateway.app import create_app

    try:
        app = create_app(settings)
    except SettingsError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    print(f"chat-gateway listening on http://{settings.host}:{settings.port}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with
    # the previous handlers restored. Make those no-ops, so a clean shutdown exits 0
    # instead of dying by the signal (or printing a KeyboardInterrupt traceback).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        **UVICORN_OPTIONS,  # type: ignore[arg-type]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
