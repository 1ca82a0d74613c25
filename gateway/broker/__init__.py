"""What crosses gateway processes: room events, their log, and who runs a room's
generation. :mod:`gateway.broker.base` has the two interfaces,
:class:`~gateway.broker.base.EventBus` and :class:`~gateway.broker.base.RoomLeases`;
:mod:`gateway.broker.memory` serves one process, :mod:`gateway.broker.redis` many."""
