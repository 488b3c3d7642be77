"""Raw pub/sub protocol 2 peers for tests: plain pyzmq sockets, no zeromesh objects.

:class:`RawPublisher` stands where tests used a raw PUB socket as a subscriber's static
endpoint: a ROUTER that learns each connection from its subscription request and sends every
message to every connection that asked. :func:`raw_subscriber` is a DEALER on a publisher's
data ROUTER that asked for one stream.
"""

from __future__ import annotations

from typing import Any

import zmq

from patterns.pubsub import frames


class RawPublisher:
    """A ROUTER that sends each message to every connection that sent a subscription."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.rids: list[bytes] = []

    def bind_to_random_port(self, addr: str) -> int:
        return int(self.sock.bind_to_random_port(addr))

    def _learn(self) -> None:
        while self.sock.poll(0):
            rid = self.sock.recv_multipart()[0]
            if rid not in self.rids:
                self.rids.append(rid)

    def send_multipart(self, msg: list[bytes]) -> None:
        self._learn()
        for rid in self.rids:
            try:
                self.sock.send_multipart([rid, *msg], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def close(self, linger: int = 0) -> None:
        self.sock.close(linger=linger)


def raw_subscriber(ctx: zmq.Context[Any], endpoint: str, stream: str, *,
                   prefix: bool = False) -> zmq.Socket[Any]:
    """A DEALER connected to ``endpoint`` (a publisher's data ROUTER) that asked for
    ``stream``; it receives ``[topic, header, envelopes...]`` as a SUB did."""
    sub = ctx.socket(zmq.DEALER)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    sub.send_multipart(frames.encode_subscribe(stream.encode(), prefix=prefix))
    return sub
