"""Errors of the request/reply pattern.

They derive from :mod:`mesh.errors` so callers can catch the mesh-wide classes::

    MeshError
    ├── ProtocolError (ValueError)
    │   └── (frames.decode_* raise ProtocolError itself)
    ├── PeerError
    │   └── PeerUnreachable
    │       └── NoResponders          nobody offered the service before the deadline
    ├── RemoteError                   the handler raised; carries its type and message
    │   └── ServiceBusy               every responder refused for lack of capacity
    └── MeshTimeout (TimeoutError)
        └── RequestTimeout            responders exist but no reply came before the deadline
"""

from __future__ import annotations

from mesh.errors import MeshError, MeshTimeout, PeerUnreachable

__all__ = ["NoResponders", "RemoteError", "RequestTimeout", "ServiceBusy"]


class NoResponders(PeerUnreachable):
    """No live node offered the service at any time before the deadline.

    Attributes:
        service: the service name.
        waited: seconds spent waiting for a responder.
    """

    def __init__(self, service: str, waited: float) -> None:
        super().__init__(f"no responder for service {service!r} within {waited:.3f}s")
        self.service = service
        self.waited = waited


class RequestTimeout(MeshTimeout):
    """The deadline passed before a reply arrived (also a built-in ``TimeoutError``).

    Attributes:
        service: the service name.
        request_id: the request id (a retry with the same id is deduplicated by responders).
        timeout: the total deadline the caller gave, in seconds.
        attempts: how many times the request was sent.
    """

    def __init__(self, service: str, request_id: str, timeout: float, attempts: int) -> None:
        super().__init__(
            f"request {request_id} to {service!r} got no reply within {timeout:.3f}s "
            f"({attempts} attempt(s))"
        )
        self.service = service
        self.request_id = request_id
        self.timeout = timeout
        self.attempts = attempts


class RemoteError(MeshError):
    """The remote handler raised an exception; its type name and message came back.

    Attributes:
        type: the exception class name on the responder (e.g. ``"ValueError"``).
        message: ``str(exception)`` on the responder.
        service: the service name.
        responder: node id of the responder that ran the handler.
    """

    def __init__(self, type: str, message: str, *, service: str = "", responder: str = "") -> None:
        super().__init__(f"{type}: {message}" + (f" (service {service!r})" if service else ""))
        self.type = type
        self.message = message
        self.service = service
        self.responder = responder


class ServiceBusy(RemoteError):
    """Every responder tried refused the request because its queue was full."""
