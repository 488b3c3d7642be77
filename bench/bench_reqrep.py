"""Request/reply benchmark: zeromesh against raw pyzmq DEALER/ROUTER, in one run.

    python bench/bench_reqrep.py            # full (about 60 s)
    python bench/bench_reqrep.py --quick    # about 20 s

For tcp loopback and ipc: round trip p50/p99/p99.9 one request at a time (100 B), and
throughput with 64 requests in flight; every zeromesh figure is printed beside raw pyzmq
measured in the same run, as a ratio. The responder runs in another process.

Latencies are measured *interleaved* (:func:`paired`): both responders run at once and the
client alternates blocks of 100 raw and 100 zeromesh round trips, so a burst of load from
elsewhere on a shared machine lands on both sides of the ratio instead of on one of them
(sequential runs of raw then zeromesh swung the p50 ratio by 2x on the 2-core VM).
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
from mesh.uuid7 import uuid7  # noqa: E402
from patterns.reqrep import AsyncClient, Client  # noqa: E402
from patterns.reqrep import frames as fr  # noqa: E402

PAYLOAD = b"x" * 100

RAW_SERVER = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("READY", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""

# The floor of any Python implementation of the protocol: a bare ROUTER loop that decodes each
# request and encodes its reply with patterns.reqrep.frames, and does nothing else (no reply
# cache, no metrics, no tracing, no capacity). Driven by a raw DEALER, beside the raw echo.
FLOOR_SERVER = """
import sys, zmq
sys.path.insert(0, sys.argv[1])
from patterns.reqrep import frames as fr
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[2]); print("READY", flush=True)
while True:
    msg = s.recv_multipart()
    m = fr.decode(msg[1:])
    s.send_multipart([msg[0], *fr.encode_reply(fr.Reply(m.id, fr.Status.OK, 1, m.format,
                                                          body=m.body))])
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
        return raw_client(s, PAYLOAD, n, inflight)
    finally:
        s.close(0)
        ctx.term()
        p.kill()
        p.wait()
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
    return lat, asyncio.run(_pipelined(node, payload, n * 4, inflight))


async def _pipelined(node: Node, payload: bytes, total: int, inflight: int) -> float:
    """Requests per second of ``total`` echo requests from one AsyncClient, ``inflight`` at
    once."""
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


BLOCK = 100  # round trips per turn when raw and zeromesh latencies are interleaved


def raw_client(sock: zmq.Socket[bytes], payload: bytes, n: int,
               inflight: int) -> tuple[list[float], float]:
    """A raw DEALER against an echo: latencies of ``n`` round trips one at a time (after 200
    warm-up ones), then the rate of ``4 n`` with ``inflight`` in flight (plain and CURVE)."""
    for _ in range(200):
        sock.send(payload)
        sock.recv()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        sock.send(payload)
        sock.recv()
        lat.append(time.perf_counter() - t)
    return lat, raw_rate(sock, n * 4, inflight, payload)


def raw_rate(sock: zmq.Socket[bytes], total: int, inflight: int,
             payload: bytes | None = None) -> float:
    """Requests per second of ``total`` echo round trips with ``inflight`` in flight."""
    msg = PAYLOAD if payload is None else payload
    t = time.perf_counter()
    for _ in range(inflight):
        sock.send(msg)
    for i in range(total):
        sock.recv()
        if i + inflight < total:
            sock.send(msg)
    return total / (time.perf_counter() - t)


def _endpoint(transport: str, tmp: str, name: str) -> str:
    if transport == "ipc":
        return f"ipc://{tmp}/{name}.sock"
    probe = zmq.Context.instance().socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)
    return f"tcp://127.0.0.1:{port}"


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of another process so far (Linux /proc; 10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def paired(transport: str, n: int, inflight: int, mode: str,
           cpu: dict[str, tuple[float, float]] | None = None
           ) -> tuple[list[float], float, list[float], float, list[float]]:
    """Raw pyzmq and zeromesh side by side: ``(raw latencies, raw req/s, zeromesh latencies,
    zeromesh req/s, floor latencies)``. ``n`` round trips each, one at a time, interleaved in
    blocks of :data:`BLOCK` (raw echo, then the Python floor of :data:`FLOOR_SERVER` driven by
    a raw DEALER, then zeromesh's Client and Service); then the throughputs (``4 n`` requests,
    ``inflight`` in flight) one after the other. ``cpu``, when given, gets ``"raw"`` and
    ``"mesh"``: CPU µs per request of the throughput phase, (client process, server process)."""
    tmp = tempfile.mkdtemp(prefix="rrbench-")
    ep = _endpoint(transport, tmp, "raw")
    floor_ep = _endpoint(transport, tmp, "floor")
    raw_srv = child(RAW_SERVER, ep)
    floor_srv = child(FLOOR_SERVER, REPO, floor_ep)
    mesh = f"bench-{os.getpid()}-{transport}-{mode}"
    node = Node(data_dir=f"{tmp}/c", mesh=mesh, interface="127.0.0.1", mdns=False,
                transports=(transport,))
    ctl = node.info().endpoints["control"][0]
    mesh_srv = child(MESH_SERVER, REPO, f"{tmp}/s", mesh, ctl, mode)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(ep)
    floor = ctx.socket(zmq.DEALER)
    floor.connect(floor_ep)
    try:
        while not node.who_offers("service", "echo"):
            time.sleep(0.01)
        client = Client(node)

        def floor_call() -> None:
            floor.send_multipart(fr.encode_request(fr.Request(
                uuid7(), "echo", 5000, 0, fr.Format.BYTES, {}, PAYLOAD)))
            fr.decode(floor.recv_multipart())

        def raw_call() -> None:
            raw.send(PAYLOAD)
            raw.recv()

        def mesh_call() -> None:
            client.request("echo", PAYLOAD, timeout=5)

        cases = (raw_call, floor_call, mesh_call)
        lats: tuple[list[float], ...] = ([], [], [])
        for call in cases:
            for _ in range(200):
                call()
        perf = time.perf_counter
        for _ in range(max(1, n // BLOCK)):
            for call, lat in zip(cases, lats, strict=True):
                for _ in range(BLOCK):
                    t = perf()
                    call()
                    lat.append(perf() - t)
        client.close()
        c0, s0 = time.process_time(), proc_cpu(raw_srv.pid)
        rrate = raw_rate(raw, n * 4, inflight)
        c1, s1 = time.process_time(), proc_cpu(raw_srv.pid)
        m0 = proc_cpu(mesh_srv.pid)
        mrate = asyncio.run(_pipelined(node, PAYLOAD, n * 4, inflight))
        c2, m1 = time.process_time(), proc_cpu(mesh_srv.pid)
        if cpu is not None:
            k = 1e6 / (n * 4)
            cpu["raw"] = ((c1 - c0) * k, (s1 - s0) * k)
            cpu["mesh"] = ((c2 - c1) * k, (m1 - m0) * k)
        return lats[0], rrate, lats[2], mrate, lats[1]
    finally:
        raw.close(0)
        floor.close(0)
        ctx.term()
        for p in (raw_srv, floor_srv, mesh_srv):
            p.kill()
            p.wait()
        node.close()


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
    rows = []
    for transport in ("tcp", "ipc"):
        for mode in ("inline", "pool"):
            raw_lat, rrate, lat, rate, floor_lat = paired(transport, n, 64, mode)
            rows.append((transport, f"raw pyzmq DEALER/ROUTER (beside {mode})", raw_lat,
                         rrate, None))
            rows.append((transport, "Python floor: DEALER + ZRR decode/encode echo",
                         floor_lat, float("nan"), (raw_lat, rrate)))
            rows.append((transport, f"zeromesh reqrep ({mode} handler)", lat, rate,
                         (raw_lat, rrate)))
    print(f"\n{n} one-at-a-time round trips of 100 B, raw and zeromesh interleaved in blocks "
          f"of {BLOCK}; throughput with 64 in flight ({n * 4} requests)\n")
    print("| transport | system | p50 µs | p99 µs | p99.9 µs | req/s (64 in flight) "
          "| p50 ratio | p99 ratio | throughput ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for transport, name, lat, rate, raw in rows:
        p50, p99, p999 = pct(lat, 0.5), pct(lat, 0.99), pct(lat, 0.999)
        if raw is None:
            ratios = "1.00 | 1.00 | 1.00"
        else:
            rl, rr = raw
            tput = f"{rate / rr:.2f}" if rate == rate else "-"  # NaN: latency-only row
            ratios = f"{p50 / pct(rl, 0.5):.2f} | {p99 / pct(rl, 0.99):.2f} | {tput}"
        rate_s = f"{rate:,.0f}" if rate == rate else "-"
        print(f"| {transport} | {name} | {p50:.0f} | {p99:.0f} | {p999:.0f} | {rate_s} | "
              f"{ratios} |")


if __name__ == "__main__":
    main()
