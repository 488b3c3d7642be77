"""Request/reply benchmark: zeromesh against raw pyzmq DEALER/ROUTER, in one run.

    python bench/bench_reqrep.py            # full (about 60 s)
    python bench/bench_reqrep.py --quick    # about 20 s

For tcp loopback and ipc: round trip p50/p99/p99.9 one request at a time (100 B), and
throughput with 64 requests in flight; every zeromesh figure is printed beside raw pyzmq
measured in the same run, as a ratio. The responder runs in another process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mesh.node import Node  # noqa: E402
from patterns.reqrep import AsyncClient, Client  # noqa: E402

PAYLOAD = b"x" * 100

RAW_SERVER = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("READY", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""

MESH_SERVER = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from mesh.node import Node
from patterns.reqrep import Service
node = Node(data_dir=sys.argv[2], mesh=sys.argv[3], interface="127.0.0.1", mdns=False,
            static_peers=(sys.argv[4],))
while not node.peers.list():
    time.sleep(0.01)
Service(node, "echo", lambda r: r.payload, concurrency=4, inline=sys.argv[5] == "inline")
print("READY", flush=True)
threading.Event().wait()
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6


def child(code: str, *args: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().startswith(b"READY")
    return p


def raw_bench(ep: str, n: int, inflight: int) -> tuple[list[float], float]:
    p = child(RAW_SERVER, ep)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(ep)
    try:
        for _ in range(200):
            s.send(PAYLOAD)
            s.recv()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            s.send(PAYLOAD)
            s.recv()
            lat.append(time.perf_counter() - t)
        total = n * 4
        t = time.perf_counter()
        for _ in range(inflight):
            s.send(PAYLOAD)
        for i in range(total):
            s.recv()
            if i + inflight < total:
                s.send(PAYLOAD)
        rate = total / (time.perf_counter() - t)
        return lat, rate
    finally:
        s.close(0)
        ctx.term()
        p.kill()
        p.wait()


def measure_client(node: Node, payload: bytes, n: int, inflight: int) -> tuple[list[float], float]:
    """Round-trip latencies of ``n`` sequential requests to ``echo`` (after 200 warm-up ones),
    then the rate of ``4 n`` requests with ``inflight`` in flight from one AsyncClient."""
    client = Client(node)
    for _ in range(200):
        client.request("echo", payload, timeout=5)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        client.request("echo", payload, timeout=5)
        lat.append(time.perf_counter() - t)
    client.close()
    total = n * 4

    async def pipelined() -> float:
        ac = AsyncClient(node)
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await ac.request("echo", payload, timeout=10)

        await ac.request("echo", payload, timeout=5)
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        rate = total / (time.perf_counter() - t)
        ac.close()
        return rate

    return lat, asyncio.run(pipelined())


def mesh_bench(transport: str, n: int, inflight: int, mode: str) -> tuple[list[float], float]:
    tmp = tempfile.mkdtemp(prefix="rrbench-")
    mesh = f"bench-{os.getpid()}-{transport}-{mode}"
    node = Node(data_dir=f"{tmp}/c", mesh=mesh, interface="127.0.0.1", mdns=False,
                transports=(transport,))
    ctl = node.info().endpoints["control"][0]
    p = child(MESH_SERVER, REPO, f"{tmp}/s", mesh, ctl, mode)
    try:
        while not node.who_offers("service", "echo"):
            time.sleep(0.01)
        return measure_client(node, PAYLOAD, n, inflight)
    finally:
        p.kill()
        p.wait()
        node.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (3000 if args.quick else 20000)
    tmp = tempfile.mkdtemp(prefix="rrbench-raw-")
    rows = []
    for transport in ("tcp", "ipc"):
        ep = f"tcp://127.0.0.1:{40000 + os.getpid() % 20000}" if transport == "tcp" \
            else f"ipc://{tmp}/raw.sock"
        raw_lat, raw_rate = raw_bench(ep, n, 64)
        rows.append((transport, "raw pyzmq DEALER/ROUTER", raw_lat, raw_rate, None))
        for mode in ("inline", "pool"):
            lat, rate = mesh_bench(transport, n, 64, mode)
            rows.append((transport, f"zeromesh reqrep ({mode} handler)", lat, rate,
                         (raw_lat, raw_rate)))
    print(f"\n{n} one-at-a-time round trips of 100 B; throughput with 64 in flight "
          f"({n * 4} requests)\n")
    print("| transport | system | p50 µs | p99 µs | p99.9 µs | req/s (64 in flight) "
          "| p50 ratio | p99 ratio | throughput ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for transport, name, lat, rate, raw in rows:
        p50, p99, p999 = pct(lat, 0.5), pct(lat, 0.99), pct(lat, 0.999)
        if raw is None:
            ratios = "1.00 | 1.00 | 1.00"
        else:
            rl, rr = raw
            ratios = (f"{p50 / pct(rl, 0.5):.2f} | {p99 / pct(rl, 0.99):.2f} | "
                      f"{rate / rr:.2f}")
        print(f"| {transport} | {name} | {p50:.0f} | {p99:.0f} | {p999:.0f} | {rate:,.0f} | "
              f"{ratios} |")


if __name__ == "__main__":
    main()
