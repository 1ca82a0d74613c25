"""What crosses gateway processes: room events, their log, and who runs a room's
generation. :class:`~gateway.broker.base.Broker` is the interface;
:mod:`gateway.broker.memory` serves one process, :mod:`gateway.broker.redis` many."""
