"""IPC between local processes: the same API over ipc:// (Unix domain sockets), no TCP.

    python -m examples.ipc_local

The parent starts a node that binds only ipc:// endpoints, then starts a child *process* (this
script with the argument ``child``) whose node also uses only ipc:// and names the parent's
control endpoint as its static peer. The child publishes readings; the parent subscribes and
prints them. Nothing listens on a network port.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from mesh.node import Node
from patterns.pubsub import Publisher, Start, Subscriber

N = 10


def child(data_dir: str, parent_ep: str) -> None:
    with Node(data_dir=data_dir, name="ipc-child", transports=("ipc",), mdns=False,
              static_peers=(parent_ep,)) as node, Publisher(node, "local.readings") as pub:
        for i in range(N):
            pub.publish({"i": i}, type="reading")
        # Stay up until the parent has read everything (it may replay from our log).
        sys.stdin.read()


def main(tmp: str) -> None:
    with Node(data_dir=f"{tmp}/parent", name="ipc-parent", transports=("ipc",),
              mdns=False) as node:
        eps = node.info().endpoints["control"]
        assert all(e.startswith("ipc://") for e in eps), eps
        print("parent control endpoint:", eps[0])
        proc = subprocess.Popen([sys.executable, "-m", __spec__.name if __spec__ else "examples.ipc_local", "child", f"{tmp}/child", eps[0]],
                                stdin=subprocess.PIPE)
        try:
            got = []
            with Subscriber(node, "local.", start=Start.beginning(), durable="p") as sub:
                deadline = time.monotonic() + 20
                while len(got) < N and time.monotonic() < deadline:
                    ev = sub.recv(timeout=0.5)
                    if ev is not None:
                        got.append(ev.data["i"])
                        print("from child process", proc.pid, "over ipc:", ev.data)
            assert got == list(range(N)), got
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)
    print(f"{N} events across processes over ipc://")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
