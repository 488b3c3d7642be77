"""Socket calls of the hot path (the only I/O helpers of request/reply).

They call pyzmq's Cython socket methods with plain int flags: pyzmq's Python layer
(``send_multipart``, ``recv_multipart``, ``Poller``, IntFlag arithmetic) cost about 6 µs per
4-frame send against 0.6 µs this way (measured on this VM; see BENCHMARKS.md).
"""

from __future__ import annotations

import zmq
from zmq.backend import Socket as _ZSocket

__all__ = ["MORE_NB", "NB", "POLLIN", "readable", "recv_frames", "send_frames", "zsend"]

_zsend = _ZSocket.send
_zrecv = _ZSocket.recv
_zget = _ZSocket.get
_MORE_NB = int(zmq.SNDMORE | zmq.NOBLOCK)
_NB = int(zmq.NOBLOCK)
#: the raw Cython send and its flags, for callers that send a known two-frame message inline
zsend = _zsend
MORE_NB = _MORE_NB
NB = _NB
_RCVMORE = int(zmq.RCVMORE)
POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


def send_frames(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """Send one multipart message without blocking (the first frame is the routing id).

    Raises:
        zmq.ZMQError: from the first frame (EHOSTUNREACH, EAGAIN); nothing was sent then, as a
            ROUTER refuses a message at its routing-id frame.
    """
    last = len(frames) - 1
    for i in range(last):
        _zsend(sock, frames[i], _MORE_NB)
    _zsend(sock, frames[last], _NB)


def recv_frames(sock: zmq.Socket[bytes], max_bytes: int) -> list[bytes] | None:
    """Receive one whole multipart message from a ROUTER without blocking; None when none is
    waiting.

    A ROUTER message is its routing id and at least one more frame, so the second frame is
    read without asking ``RCVMORE`` first, and as a zero-copy frame whose ``more`` says
    whether a third follows: a ``getsockopt`` through pyzmq builds an enum per call (about
    1 µs each, two per message before). A message whose frames add up to more than
    ``max_bytes`` is drained without copying and returned as ``[]`` (the caller counts it):
    MAXMSGSIZE bounds each frame, not a message (see :func:`mesh.transport.recv_bounded`,
    the same rule for the node's sockets).
    """
    try:
        first = _zrecv(sock, _NB)
    except zmq.Again:
        return None
    frame = _zrecv(sock, _NB, False)
    total = len(first) + len(frame)
    if not frame.more:
        return [first, frame.bytes] if total <= max_bytes else []
    out = [first, frame.bytes]
    while _zget(sock, _RCVMORE):
        if total > max_bytes:
            while _zget(sock, _RCVMORE):
                _zrecv(sock, _NB, False)  # zero-copy frames, released at once
            return []
        part = _zrecv(sock, _NB)
        total += len(part)
        out.append(part)
    return out if total <= max_bytes else []


def readable(sock: zmq.Socket[bytes]) -> bool:
    """True while a message is waiting (``ZMQ_EVENTS`` as a plain int: the sugar getsockopt
    builds an enum per call)."""
    ev = _zget(sock, _EVENTS)
    return isinstance(ev, int) and bool(ev & POLLIN)
