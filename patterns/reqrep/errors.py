"""Errors of the request/reply pattern.

They derive from :mod:`mesh.errors` so callers can catch the mesh-wide classes::

    MeshError
    ├── ProtocolError (ValueError)
    │   └── (frames.decode_* raise ProtocolError itself)
    ├── PeerError
    │   └── PeerUnreachable
    │       └── NoResponders          nobody offered the service before the deadline
    ├── RemoteError                   the handler raised; carries its type and message
    │   ├── ServiceBusy               every responder refused for lack of capacity
    │   ├── RequestIdReused           same caller, same request id, another payload: refused
    │   └── ReplyNotCached            it ran once; its reply was too large to keep for a retry
    └── MeshTimeout (TimeoutError)
        └── RequestTimeout            responders exist but no reply came before the deadline
"""

from __future__ import annotations

from mesh.errors import MeshError, MeshTimeout, PeerUnreachable

__all__ = ["NoResponders", "OutcomeUnknown", "RemoteError", "ReplyNotCached", "RequestIdReused",
           "RequestTimeout", "ServiceBusy"]


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

    def __new__(cls, type: str = "", message: str = "", **kw: str) -> RemoteError:
        # A reserved error code of the responder (frames.ERR_*) becomes its own class, so
        # ``RemoteError(reply.error_type, ...)`` raised by any client is already typed.
        if cls is RemoteError:
            sub = _CODED.get(type)
            if sub is not None:
                return super().__new__(sub)
        return super().__new__(cls)

    def __init__(self, type: str, message: str, *, service: str = "", responder: str = "") -> None:
        super().__init__(f"{type}: {message}" + (f" (service {service!r})" if service else ""))
        self.type = type
        self.message = message
        self.service = service
        self.responder = responder


class ServiceBusy(RemoteError):
    """Every responder tried refused the request because its queue was full."""


class RequestIdReused(RemoteError):
    """The responder already holds this request id from this caller with another payload.

    Not run. Request ids must be unique per logical request; reuse one only to retry the very
    same payload (then the stored reply comes back)."""


class ReplyNotCached(RemoteError):
    """The request ran once, but its reply was larger than the responder's per-entry cache
    limit, so a retry cannot get it again; the request is not run a second time."""


class OutcomeUnknown(RemoteError):
    """The request was running when the responder died (kill -9, crash): its durable outcome
    log recorded RUNNING but no reply. It may or may not have taken effect; the responder does
    not run it again under the same request id. Check the effect before resubmitting it under
    a new id."""


_CODED: dict[str, type[RemoteError]] = {
    "zeromesh.RequestIdReused": RequestIdReused,
    "zeromesh.ReplyNotCached": ReplyNotCached,
    "zeromesh.OutcomeUnknown": OutcomeUnknown,
}
