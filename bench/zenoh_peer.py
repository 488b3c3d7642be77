"""Zenoh's Python binding (eclipse-zenoh), peer to peer, with the pub/sub and request/reply
workloads of bench_pubsub.py and bench_reqrep.py; run_all.py --peers calls these.

    python bench/zenoh_peer.py [-n 50000]     # alone: both cases, 100 B and 1 KiB

Both sessions are in mode "peer" with multicast scouting off (loopback only, no router): the
consumer (a spawned process) listens on a free tcp/127.0.0.1 port and the producer (this
process) connects. Publisher: CongestionControl.BLOCK (the default DROP may discard under
load), reliable; the producer waits until its publisher matches a subscriber before the
first put. Nothing in Zenoh here is durable: compare it with zeromesh's best-effort rows.

* pub/sub: N puts of SIZE bytes; rate = received by the consumer's callback / (last receive
  - first put), CLOCK_MONOTONIC; CPU µs per event on both sides (process time, all threads:
  Zenoh's Rust runtime threads included).
* get/queryable: an echo queryable in the child; round trips one at a time (p50/p99), then
  the rate of 4 N gets with 64 in flight; CPU µs per request on both sides.

Needs ``pip install eclipse-zenoh`` (the ``bench`` extra); :func:`available` says whether it
is there.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any

IDLE_S = 5.0


def available() -> str | None:
    """None when the binding imports, else why not (for the skip line)."""
    try:
        import zenoh  # noqa: F401
    except ImportError as exc:
        return f"eclipse-zenoh is not installed ({exc}; pip install 'zeromesh[bench]')"
    return None


def version() -> str:
    from importlib.metadata import version as v
    try:
        return f"eclipse-zenoh {v('eclipse-zenoh')}"
    except Exception:
        return "eclipse-zenoh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session(listen: str | None = None, connect: str | None = None) -> Any:
    import zenoh
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("listen/endpoints", json.dumps([listen] if listen else []))
    if connect:
        conf.insert_json5("connect/endpoints", json.dumps([connect]))
    return zenoh.open(conf)


def _sub_child(ep: str, key: str, n: int, q: Any) -> None:
    s = _session(listen=ep)
    st = {"got": 0, "t_last": 0.0}

    def cb(_sample: Any) -> None:
        st["got"] += 1
        if st["got"] == n:
            st["t_last"] = time.monotonic()

    s.declare_subscriber(key, cb)
    c0 = time.process_time()
    q.put(("ready", 0))
    seen, last = 0, time.monotonic()
    while st["got"] < n and time.monotonic() - last < IDLE_S:
        time.sleep(0.005)
        if st["got"] != seen:
            seen, last = st["got"], time.monotonic()
    cpu = time.process_time() - c0
    q.put(("done", (st["got"], st["t_last"] or time.monotonic() - IDLE_S, cpu)))
    s.close()


def _queryable_child(ep: str, key: str, q: Any, stop: Any) -> None:
    s = _session(listen=ep)

    def cb(query: Any) -> None:
        query.reply(query.key_expr, query.payload if query.payload is not None else b"")

    s.declare_queryable(key, cb)
    q.put(("ready", 0))
    stop.wait(600)
    s.close()


def _wait_match(pub: Any) -> None:
    deadline = time.monotonic() + 20
    while not pub.matching_status.matching:
        if time.monotonic() > deadline:
            raise RuntimeError("the Zenoh publisher matched no subscriber in 20 s")
        time.sleep(0.005)


def pubsub_case(size: int, n: int) -> dict[str, Any]:
    """One Zenoh put/subscribe run: got, rate (msg/s), cpu_p and cpu_c (s)."""
    import zenoh
    ep = f"tcp/127.0.0.1:{_free_port()}"
    key = f"zmbench/{os.getpid()}/{time.monotonic_ns()}"
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    p = ctx.Process(target=_sub_child, args=(ep, key, n, q))
    p.start()
    try:
        kind, _ = q.get(timeout=30)
        assert kind == "ready"
        s = _session(connect=ep)
        pub = s.declare_publisher(key, congestion_control=zenoh.CongestionControl.BLOCK)
        _wait_match(pub)
        payload = b"x" * size
        put = pub.put
        t0 = time.monotonic()
        c0 = time.process_time()
        for _ in range(n):
            put(payload)
        cpu_p = time.process_time() - c0
        _, (got, t_last, cpu_c) = q.get(timeout=120 + n / 1000)
        s.close()
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    return {"got": got, "rate": got / max(1e-9, t_last - t0), "cpu_p": cpu_p, "cpu_c": cpu_c}


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc; 10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def getq_case(size: int, n: int, inflight: int = 64) -> dict[str, Any]:
    """Zenoh get/queryable echo: lats (s, one at a time), rate (req/s, ``inflight`` in
    flight, 4 n requests), cpu_p / cpu_c (s, over the rate phase)."""
    ep = f"tcp/127.0.0.1:{_free_port()}"
    key = f"zmbench/q/{os.getpid()}/{time.monotonic_ns()}"
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    stop: Any = ctx.Event()
    p = ctx.Process(target=_queryable_child, args=(ep, key, q, stop))
    p.start()
    try:
        kind, _ = q.get(timeout=30)
        assert kind == "ready"
        s = _session(connect=ep)
        payload = b"x" * size

        def one() -> None:
            for r in s.get(key, payload=payload, timeout=5.0):
                if r.ok is None:
                    raise RuntimeError(f"Zenoh get failed: {r.err}")

        deadline = time.monotonic() + 20
        while True:  # the queryable is declared in the child; wait until a get reaches it
            got = [r for r in s.get(key, payload=payload, timeout=1.0) if r.ok is not None]
            if got:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the Zenoh queryable answered nothing in 20 s")
        for _ in range(200):
            one()
        lats = []
        for _ in range(n):
            t = time.perf_counter()
            one()
            lats.append(time.perf_counter() - t)
        total = 4 * n
        pending: collections.deque[Any] = collections.deque()
        c0, s0 = time.process_time(), _proc_cpu(p.pid or 0)
        t = time.perf_counter()
        sent = 0
        for _ in range(min(inflight, total)):
            pending.append(s.get(key, payload=payload, timeout=10.0))
            sent += 1
        done = 0
        while pending:
            h = pending.popleft()
            for r in h:
                if r.ok is None:
                    raise RuntimeError(f"Zenoh get failed: {r.err}")
            done += 1
            if sent < total:
                pending.append(s.get(key, payload=payload, timeout=10.0))
                sent += 1
        rate = done / (time.perf_counter() - t)
        cpu_p, cpu_c = time.process_time() - c0, _proc_cpu(p.pid or 0) - s0
        s.close()
    finally:
        stop.set()
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    return {"lats": lats, "rate": rate, "requests": total, "cpu_p": cpu_p, "cpu_c": cpu_c}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50_000)
    a = ap.parse_args()
    why = available()
    if why:
        print(f"skipped: {why}")
        return 0
    for size in (100, 1024):
        r = pubsub_case(size, a.n)
        print(f"zenoh put/subscribe {size} B: {r['rate']:,.0f} msg/s (got {r['got']}), CPU "
              f"µs/event {r['cpu_p'] / a.n * 1e6:.2f} / {r['cpu_c'] / max(1, r['got']) * 1e6:.2f}")
        g = getq_case(size, max(100, a.n // 20))
        lats = sorted(g["lats"])
        print(f"zenoh get/queryable {size} B: p50 {lats[len(lats) // 2] * 1e6:.0f} µs, "
              f"{g['rate']:,.0f} req/s (64 in flight), CPU µs/request "
              f"{g['cpu_p'] / g['requests'] * 1e6:.1f} / {g['cpu_c'] / g['requests'] * 1e6:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
