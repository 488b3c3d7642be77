"""Discovery benchmark on loopback: time from a node's start to every peer seeing it, and
(with real nodes) from SIGKILL to every peer reporting it gone. Median over repeated runs.

    python bench/bench_discovery.py --runs 10 --peers 2 --mode node
    python bench/bench_discovery.py --runs 10 --peers 2 --mode standin

``standin``: mDNS only (MdnsDiscovery on a stand-in node; "seen" = upserted by discovery).
``node``: real mesh.node.Node processes ("seen" = a JOINED event, i.e. mDNS + dial + HELLO;
"gone" = a LEFT event from heartbeat presence; heartbeat 0.2 s, gone after 1.2 s).
Times are wall-clock across processes of one host; the start time is taken in the new
process right before it starts its node (interpreter start-up and imports are excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Proc:
    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([sys.executable, "-m", "tests.discovery_child", *args],
                                  cwd=REPO, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self.lock:
                self.events.append(json.loads(line))

    def first(self, kind: str, node_id: str | None = None) -> dict[str, Any] | None:
        with self.lock:
            for e in self.events:
                if e["event"] == kind and (node_id is None or e["id"] == node_id):
                    return e
        return None

    def wait(self, kind: str, node_id: str | None = None, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.first(kind, node_id)
            if e:
                return e
            time.sleep(0.002)
        raise TimeoutError(f"no {kind} for {node_id}")

    def stop(self) -> None:
        if self.p.poll() is None:
            assert self.p.stdin is not None
            self.p.stdin.close()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--mode", choices=("node", "standin"), default="node")
    args = ap.parse_args()
    stype = f"_zm-{uuid.uuid4().hex[:8]}._tcp.local."
    mesh = f"bench-{uuid.uuid4().hex[:6]}"
    tmp = tempfile.mkdtemp(prefix="zm-bench-")
    seen_kind = "joined" if args.mode == "node" else "upsert"

    def spawn(name: str) -> Proc:
        extra = ["--node", os.path.join(tmp, name)] if args.mode == "node" else []
        return Proc(["--mesh", mesh, "--service-type", stype, "--name", name,
                     "--interface", "127.0.0.1", *extra])

    observers = [spawn(f"obs{i}") for i in range(args.peers)]
    joins: list[float] = []
    gones: list[float] = []
    try:
        for o in observers:
            o.wait("ready")
        for run in range(args.runs):
            new = spawn(f"new{run}")
            ready = new.wait("ready")
            nid, t0 = ready["id"], ready["t"]
            joins.append(max(o.wait(seen_kind, nid)["t"] for o in observers) - t0)
            if args.mode == "node":
                t_kill = time.time()
                new.p.send_signal(signal.SIGKILL)
                new.p.wait()
                gones.append(max(o.wait("left", nid)["t"] for o in observers) - t_kill)
            else:
                new.stop()
                for o in observers:
                    o.wait("goodbye", nid)
    finally:
        for o in observers:
            o.stop()

    def fmt(xs: list[float]) -> str:
        ms = sorted(x * 1000 for x in xs)
        return (f"median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, "
                f"max {ms[-1]:.0f} ms (n={len(ms)})")

    print(f"mode={args.mode} peers={args.peers} runs={args.runs}")
    print(f"start -> seen by every peer: {fmt(joins)}")
    if gones:
        print(f"SIGKILL -> gone at every peer (gone_s=1.2 s, heartbeat 0.2 s): {fmt(gones)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
