"""Child process for the request/reply tests: one node running one service.

Usage: python -c "import tests.reqrep_child as c; c.main()" DATA_DIR MESH PEER NAME RECORD
       CONCURRENCY DELAY_MS DROP_REPLIES

The handler appends the request id to RECORD.started when it starts, sleeps DELAY_MS, then
appends the request id to RECORD (one line per completed execution, O_APPEND so a kill never
interleaves lines) and returns the payload. Prints
``READY <node id>`` once the service is offered, then runs until killed.

Environment: ``ZM_CHILD_GIL_MS`` makes the handler hold the GIL that long after it starts (a
C call that never releases it, as a long NumPy or regex call would); ``ZM_CHILD_GONE_S`` sets
the node's presence ``gone_s`` (default 0.6).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

from mesh.node import Node, PresenceConfig
from patterns.reqrep import Incoming, Service

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)
GIL_MS = int(os.environ.get("ZM_CHILD_GIL_MS", "0"))
GONE_S = float(os.environ.get("ZM_CHILD_GONE_S", "0"))


def hold_gil(ms: int) -> None:
    """Sleep ``ms`` in C with the GIL held: no other thread of this process runs Python."""
    ctypes.PyDLL(None).usleep(ms * 1000)  # PyDLL: the call keeps the GIL


def main() -> None:
    data_dir, mesh, peer, name, record = sys.argv[1:6]
    concurrency, delay_ms, drop = (int(x) for x in sys.argv[6:9])
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    started = os.open(record + ".started", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def handler(req: Incoming) -> object:
        os.write(started, f"{req.id}\n".encode())
        if GIL_MS:
            hold_gil(GIL_MS)
        if delay_ms:
            time.sleep(delay_ms / 1000)
        os.write(fd, f"{req.id}\n".encode())
        if req.payload == "boom":
            raise KeyError("boom")
        return req.payload

    node = Node(data_dir=data_dir, name=name + "-" + str(os.getpid()), mesh=mesh,
                interface="127.0.0.1", mdns=False,
                presence=PresenceConfig(0.1, 0.3, GONE_S) if GONE_S else PRESENCE,
                static_peers=(peer,) if peer else ())
    # Offer only once the hub is live: an offer made before that is not announced to it
    #.
    deadline = time.monotonic() + 10
    while peer and not node.peers.list() and time.monotonic() < deadline:
        time.sleep(0.005)  # a poll, not a timed wait for an outcome
    svc = Service(node, name, handler, concurrency=concurrency)
    svc.drop_replies = drop
    print(f"READY {node.id}", flush=True)
    threading.Event().wait()  # until SIGKILL / SIGTERM


CODE = "import tests.reqrep_child as c; c.main()"

if __name__ == "__main__":
    main()
