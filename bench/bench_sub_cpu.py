"""Subscriber CPU per delivered event: the receive/decode path, with real sockets.

    python bench/bench_sub_cpu.py                 # 100 B, tcp, publish_many(100), 3 runs
    python bench/bench_sub_cpu.py --profile 25    # also cProfile the consumer: top 25 rows

A producer process (spawned) publishes N events of SIZE bytes with ``publish_many(BATCH)``
(best-effort, so no log write paces it) as fast as it can; this process runs one
``Subscriber`` and takes every event through ``recv_batch`` with an empty handler. Reported
per delivered event:

* process µs: ``time.process_time()`` of the whole consumer process (every thread: the
  pump, libzmq's I/O thread, the node's reactor) from "subscribed" to the last event;
* thread µs: ``time.thread_time()`` of the receiving thread alone (the decode path: recv,
  frame checks, envelope decode, ready queue, batch hand-out).

CPU time does not count time spent waiting for a core, so it is far steadier on a shared
machine than a wall-clock rate; the load average is printed with every figure anyway.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _producer(mesh: str, root: str, transport: str, size: int, n: int, batch: int,
              q: Any, go: Any) -> None:
    from mesh.node import Node
    from patterns.pubsub import Publisher
    transports = ("tcp",) if transport == "tcp" else ("tcp", "ipc")
    with Node(data_dir=f"{root}/p", name="producer", mesh=mesh, mdns=False,
              interface="127.0.0.1", transports=transports) as nd, \
            Publisher(nd, "cpu.s", durable=False) as pub:
        ctrl = next(e for e in nd.info().endpoints["control"] if e.startswith("tcp"))
        q.put(ctrl)
        # warm-up events until the consumer says it saw one
        while not go.wait(0.005):
            pub.publish(b"", type="w")
        chunk = [b"x" * size] * batch
        for _ in range(n // batch):
            pub.publish_many(chunk, type="m")
        go.clear()
        go.wait(120)  # keep the connection until the consumer is done


def run(transport: str, size: int, n: int, batch: int,
        profile: int | None = None) -> dict[str, float]:
    from mesh.node import Node
    from patterns.pubsub import Start, Subscriber
    root = tempfile.mkdtemp(prefix="zmsubcpu")
    mesh = f"subcpu{os.getpid()}{time.monotonic_ns()}"
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    go: Any = ctx.Event()
    p = ctx.Process(target=_producer, args=(mesh, root, transport, size, n, batch, q, go))
    p.start()
    transports = ("tcp",) if transport == "tcp" else ("tcp", "ipc")
    try:
        ctrl = q.get(timeout=60)
        with Node(data_dir=f"{root}/c", name="consumer", mesh=mesh, mdns=False,
                  interface="127.0.0.1", static_peers=(ctrl,), transports=transports) as nd, \
                Subscriber(nd, "cpu.s", start=Start.new()) as sub:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                b = sub.recv_batch(timeout=0.5)
                if b and any(ev.type == "w" for ev in b):
                    break
            else:
                raise RuntimeError("no warm-up event in 60 s")
            # drain what warm-up is still queued, then start the clocks. Bounded: the producer
            # sends a warm-up event every 5 ms until told to go, so "until 50 ms of silence"
            # lasted until a scheduling hiccup (60-200 s on a quiet machine)
            end = time.monotonic() + 0.25
            while sub.recv_batch(timeout=0.05) and time.monotonic() < end:
                pass
            prof = cProfile.Profile() if profile else None
            got = 0
            go.set()
            c0, t0, w0 = time.process_time(), time.thread_time(), time.monotonic()
            if prof:
                prof.enable()
            end = time.monotonic() + 60
            while got < n and time.monotonic() < end:
                batch_ = sub.recv_batch(timeout=3.0)
                if not batch_:
                    break
                for ev in batch_:  # the "handler": touch one attribute
                    if ev.type == "m":
                        got += 1
            if prof:
                prof.disable()
            cpu, thr, wall = (time.process_time() - c0, time.thread_time() - t0,
                              time.monotonic() - w0)
            go.set()
            if prof:
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(profile)
                print(s.getvalue())
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
        shutil.rmtree(root, ignore_errors=True)
    return {"got": got, "proc_us": cpu / max(1, got) * 1e6, "thread_us": thr / max(1, got) * 1e6,
            "rate": got / max(1e-9, wall)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=100, help="events per publish_many call")
    ap.add_argument("--transport", default="tcp", choices=("tcp", "ipc"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", type=int, default=None, metavar="ROWS",
                    help="one extra run under cProfile; print its top ROWS by own time")
    a = ap.parse_args()
    print(f"subscriber CPU per event: {a.size} B, {a.transport}, publish_many({a.batch}), "
          f"{a.n} events, {a.runs} runs; load {os.getloadavg()[0]:.2f}", flush=True)
    res = []
    for i in range(a.runs):
        r = run(a.transport, a.size, a.n, a.batch)
        res.append(r)
        print(f"  run {i + 1}: got {r['got']}, process {r['proc_us']:.2f} µs/event, "
              f"receiving thread {r['thread_us']:.2f} µs/event, {r['rate']:,.0f} ev/s "
              f"(wall, provisional), load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"median: process {statistics.median(r['proc_us'] for r in res):.2f} µs/event, "
          f"receiving thread {statistics.median(r['thread_us'] for r in res):.2f} µs/event, "
          f"load {os.getloadavg()[0]:.2f}")
    if a.profile:
        run(a.transport, a.size, a.n, a.batch, a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
