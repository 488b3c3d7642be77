"""The interface every broker client of the bridge implements (MQTT, NATS)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from patterns.bridge.mapping import Message

__all__ = ["BrokerClient", "InboundHandler"]

#: Called for each inbound message on the client's thread with the message and an ``ack``
#: callable; the handler calls ``ack()`` only once the event is in the mesh log (or in the DLQ).
InboundHandler = Callable[[Message, Callable[[], None]], None]


class BrokerClient(Protocol):
    """A connection to one broker, owned by one :class:`~patterns.bridge.bridge.Bridge`."""

    def start(self, inbound: Sequence[str], handler: InboundHandler | None) -> None:
        """Connect (in the background: an unreachable broker is retried, not an error) and
        subscribe to the ``inbound`` topic/subject filters."""

    def connected(self) -> bool:
        """True while the broker connection is up."""

    def publish_batch(self, msgs: Sequence[Message], timeout: float) -> int:
        """Publish ``msgs`` in order and wait up to ``timeout`` for the broker's acks.

        Returns how many messages, from the first, the broker acknowledged (0 when it is
        unreachable). The caller re-sends the rest; the broker may then see duplicates.
        """

    def close(self) -> None:
        """Disconnect and stop the client's threads."""
