"""chat-gateway: shared, persistent, streaming chat rooms in front of any model."""

from importlib.metadata import PackageNotFoundError, version


def installed_version() -> str:
    """The installed distribution's version; ``unknown`` in a checkout not installed."""
    try:
        return version("chat-gateway")
    except PackageNotFoundError:
        return "unknown"
