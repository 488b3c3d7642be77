"""Durable requests (Titanic): stored before sending, retried across a caller restart."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from patterns.reqrep import DurableClient, Incoming, RemoteError, Service
from tests.test_reqrep_real import ctrl, make_node, responders
from tests.util import python_child, unique, wait_until

SUBMIT = """
import sys, time
from mesh.node import Node
from patterns.reqrep import DurableClient
node = Node(data_dir=sys.argv[1], mesh=sys.argv[2], interface="127.0.0.1", mdns=False)
dc = DurableClient(node)
for i in range(5):
    print(dc.submit(sys.argv[3], i), flush=True)
print("STORED", flush=True)
time.sleep(60)
"""


def test_requests_stored_before_sending_survive_a_caller_kill(tmp_path: Path) -> None:
    mesh, name = unique("m"), unique("svc")
    caller_dir = tmp_path / "caller"
    # 1. the caller stores 5 requests while no responder exists, then is SIGKILLed
    p = python_child(SUBMIT, str(caller_dir), mesh, name, stdout=subprocess.PIPE)
    assert p.stdout is not None
    ids = [p.stdout.readline().decode().strip() for _ in range(5)]
    assert p.stdout.readline().strip() == b"STORED"
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    # 2. a responder appears; the caller node restarts from the same data dir and sends them
    hub = make_node(caller_dir, mesh)
    srv = make_node(tmp_path / "srv", mesh, ctrl(hub))
    seen: list[str] = []

    def handler(req: Incoming) -> object:
        seen.append(req.id)
        if req.payload == 3:
            raise ValueError("three")
        return req.payload * 10

    svc = Service(srv, name, handler)
    try:
        responders(hub, name, 1)
        with DurableClient(hub) as dc:
            assert sorted(dc.pending()) == sorted(ids)
            assert [dc.result(rid, timeout=10) for rid in ids[:3]] == [0, 10, 20]
            try:
                dc.result(ids[3], timeout=10)
                raise AssertionError("expected a RemoteError")
            except RemoteError as exc:
                assert exc.type == "ValueError"
            assert dc.result(ids[4], timeout=10) == 40
            wait_until(lambda: not dc.pending(), 5)
        assert sorted(seen) == sorted(ids)  # each ran exactly once
        # 3. a third open finds nothing left to send, and the answers are still there
        with DurableClient(hub) as dc:
            assert dc.pending() == [] and dc.result(ids[0]) == 0
    finally:
        svc.close()
        srv.close()
        hub.close()
