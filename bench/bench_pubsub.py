"""Pub/sub throughput and latency: raw pyzmq PUB/SUB vs zeromesh best-effort and durable.

Every zeromesh figure is printed beside raw pyzmq XPUB/SUB measured in the same run, on the same
transport and payload, as a ratio. One producer process (this one) and one consumer process
(spawned); throughput = events received by the consumer's handler / (last receive - first
send), both CLOCK_MONOTONIC. Latency: events sent at a fixed moderate rate, each carrying its
send time; the consumer's handler records now - sent.

    python bench/bench_pubsub.py --quick      # ~1 min: 50k events per cell
    python bench/bench_pubsub.py              # 200k events per cell
    python bench/bench_pubsub.py --publish-rows [--transports ipc,tcp] [--runs 3]
        # the end-to-end publish() rows only (100 B): the single-frame ceiling, best-effort
        # publish(), durable publish() and durable publish_many(--batch), ratios to the
        # ceiling of the same run, CPU per event on each side, events per DATA message

Compare builds with ``PYTHONPATH=<checkout>`` (this file's checkout is appended to the path,
not prepended, so the code measured is the one PYTHONPATH names, in both processes).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Any

# Appended, not prepended: PYTHONPATH=<another checkout> measures that checkout's code (the
# spawned consumer inherits this path).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IDLE_S = 3.0


def _consumer_raw(endpoint: str, n: int, q: Any, lat: bool, frames_n: int = 2) -> None:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.RCVTIMEO, int(IDLE_S * 1000))
    s.connect(endpoint)
    q.put(("ready", 0))
    # From here: the idle wait before the first event costs no CPU, and the warm-up is tiny.
    got, lats, t_last, c0 = 0, [], 0.0, time.process_time()
    try:
        if frames_n == 1 and not lat:
            # The ceiling: one frame per message, one recv() each (warm-up frames are b"w").
            recv = s.recv
            while got < n:
                if recv() != b"w":
                    got += 1
        while got < n:
            frames = s.recv_multipart()
            if frames[0] == b"w":
                continue
            got += 1
            if lat:
                lats.append(time.monotonic_ns() - int(frames[1]))
        t_last = time.monotonic()
    except zmq.Again:
        t_last = time.monotonic() - IDLE_S
    q.put(("done", (got, t_last, lats, time.process_time() - c0)))
    ctx.destroy(linger=0)


def _consumer_mesh(ctrl: str, mesh: str, stream: str, n: int, q: Any, lat: bool,
                   transports: tuple[str, ...], data_dir: str) -> None:
    from mesh.node import Node
    from patterns.pubsub import Start, Subscriber
    with Node(data_dir=data_dir, name="consumer", mesh=mesh, mdns=False, interface="127.0.0.1",
              static_peers=(ctrl,), transports=transports) as nd, \
            Subscriber(nd, stream, start=Start.new()) as sub:
        q.put(("ready", 0))
        # CPU from the end of the last batch of warm-up events alone, not from the first
        # event: one poll may decode a whole burst before recv_batch hands out its first
        # event. A batch of warm-up events only, shorter than max_events, left nothing
        # decoded in the ready queue, so restarting the clock after it loses no event's
        # decoding; restarting it spares the count the node's connection and stream set-up,
        # a fixed cost that was spread over only 20,000 events with --quick.
        got, lats, t_last, c0 = 0, [], 0.0, time.process_time()
        deadline = time.monotonic() + 60
        while got < n and time.monotonic() < deadline:
            batch = sub.recv_batch(timeout=IDLE_S)
            if not batch:
                break
            now = time.monotonic_ns()
            for ev in batch:  # the "handler"
                if ev.type == "w":
                    continue
                got += 1
                if lat:
                    lats.append(now - ev.data)
            t_last = time.monotonic()
            if got == 0 and len(batch) < 1000:
                c0 = time.process_time()
        cpu = time.process_time() - c0
        st = sub.stats()
        q.put(("done", (got, t_last, lats, {"replayed": st.replayed, "gaps": st.gaps,
                                            "skipped": st.skipped, "cpu_c": cpu})))


def _wait_ready(q: Any, warm: Any) -> None:
    # Warm up until the consumer saw a message (slow joiner): it says "ready" once subscribed;
    # then keep sending warm-up messages for a moment so the connection is surely up.
    kind, _ = q.get(timeout=30)
    assert kind == "ready"
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        warm()
        time.sleep(0.001)


def raw_case(transport: str, size: int, n: int, lat_rate: float | None,
             frames_n: int = 2) -> dict[str, Any]:
    """Raw pyzmq XPUB/SUB: ``[b"m", payload]`` per message (``frames_n=2``, the historical
    row) or the payload alone in one frame (``frames_n=1``: the ceiling, throughput only)."""
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.XPUB)
    s.setsockopt(zmq.XPUB_NODROP, 1)
    if transport == "tcp":
        port = s.bind_to_random_port("tcp://127.0.0.1")
        ep = f"tcp://127.0.0.1:{port}"
    else:
        ep = f"ipc://{tempfile.mktemp(prefix='zmbench')}"
        s.bind(ep)
    q: Any = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_consumer_raw,
                                        args=(ep, n, q, lat_rate is not None, frames_n))
    p.start()
    _wait_ready(q, (lambda: s.send(b"w")) if frames_n == 1
                else (lambda: s.send_multipart([b"w", b""])))
    payload = b"x" * size
    t0 = time.monotonic()
    c0 = time.process_time()
    if lat_rate is None and frames_n == 1:
        send1 = s.send
        for _ in range(n):
            send1(payload)
    elif lat_rate is None:
        send = s.send_multipart
        for _ in range(n):
            send([b"m", payload])
    else:
        gap = 1.0 / lat_rate
        for i in range(n):
            target = t0 + i * gap
            while time.monotonic() < target:
                pass
            s.send_multipart([b"m", str(time.monotonic_ns()).encode(), payload])
    cpu_p = time.process_time() - c0
    _, (got, t_last, lats, cpu_c) = q.get(timeout=120)
    p.join(10)
    s.close(linger=0)
    ctx.term()
    return {"got": got, "rate": got / max(1e-9, t_last - t0), "lats": lats,
            "cpu_p": cpu_p, "cpu_c": cpu_c}


def mesh_case(transport: str, size: int, n: int, durable: bool, lat_rate: float | None,
              batch: int) -> dict[str, Any]:
    from mesh.log import FsyncPolicy, LogConfig
    from mesh.node import Node
    from patterns.pubsub import Publisher
    root = tempfile.mkdtemp(prefix="zmbench")
    mesh = f"bench{os.getpid()}{time.monotonic_ns()}"
    stream = "bench.s"
    transports = (transport,) if transport == "tcp" else ("tcp", "ipc")
    try:
        with Node(data_dir=f"{root}/p", name="producer", mesh=mesh, mdns=False,
                  interface="127.0.0.1", transports=transports) as nd:
            cfg = LogConfig(fsync=FsyncPolicy.interval(10.0))
            with Publisher(nd, stream, durable=durable, log_config=cfg) as pub:
                ctrl = next(e for e in nd.info().endpoints["control"] if e.startswith("tcp"))
                q: Any = mp.get_context("spawn").Queue()
                p = mp.get_context("spawn").Process(target=_consumer_mesh, args=(
                    ctrl, mesh, stream, n, q, lat_rate is not None, transports, f"{root}/c"))
                p.start()
                _wait_ready(q, lambda: pub.publish(0, type="w"))
                payload = b"x" * size
                s0 = pub.stats()  # the warm-up's messages are not the run's
                t0 = time.monotonic()
                c0 = time.process_time()
                if lat_rate is None:
                    if batch > 1:
                        chunk = [payload] * batch
                        for _ in range(n // batch):
                            pub.publish_many(chunk, type="m")
                    else:
                        publish = pub.publish
                        for _ in range(n):
                            publish(payload, type="m")
                else:
                    gap = 1.0 / lat_rate
                    for i in range(n):
                        target = t0 + i * gap
                        while time.monotonic() < target:
                            pass
                        pub.publish(time.monotonic_ns(), type="m")
                cpu_p = time.process_time() - c0
                _, res = q.get(timeout=120)
                p.join(10)
                got, t_last, lats, extra = res
                ps = pub.stats()
                return {"got": got, "rate": got / max(1e-9, t_last - t0), "lats": lats,
                        "cpu_p": cpu_p, "published": ps.published - s0.published,
                        "messages": ps.messages - s0.messages,
                        **extra}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pct(lats: list[int], p: float) -> float:
    if not lats:
        return float("nan")
    s = sorted(lats)
    return s[min(len(s) - 1, int(len(s) * p))] / 1000.0


def publish_rows(transports: list[str], n: int, batch: int, runs: int) -> None:
    """The end-to-end publish() rows at 100 B, each run beginning with its own ceiling."""
    print(f"# publish() rows, 100 B, {n:,} events per cell, {runs} run(s); PYTHONPATH="
          f"{os.environ.get('PYTHONPATH', '')}")
    print("| run | transport | row | msg/s | ratio to ceiling | CPU µs/event prod / cons | "
          "events per DATA message | load |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for run in range(1, runs + 1):
        for tr in transports:
            c1 = raw_case(tr, 100, n, None, frames_n=1)
            ceil = c1["rate"]
            cells: list[tuple[str, dict[str, Any]]] = [("ceiling (raw, 1 frame)", c1)]
            for label, durable, b in (("best-effort publish()", False, 1),
                                      ("durable publish()", True, 1),
                                      (f"durable publish_many({batch})", True, batch)):
                cells.append((label, mesh_case(tr, 100, n, durable, None, b)))
            for label, r in cells:
                note = "" if r["got"] == n else f" (got {r['got']:,})"
                per = (f"{r['published'] / max(1, r['messages']):.1f}"
                       if r.get("messages") else "")
                print(f"| {run} | {tr} | {label} | {r['rate']:,.0f}{note} | "
                      f"{r['rate'] / ceil:.2f}x | {r['cpu_p'] / n * 1e6:.2f} / "
                      f"{r['cpu_c'] / max(1, r['got']) * 1e6:.2f} | {per} | "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--batch", type=int, default=100, help="events per publish_many call")
    ap.add_argument("--publish-rows", action="store_true",
                    help="only the 100 B publish() rows against the single-frame ceiling")
    ap.add_argument("--transports", default="ipc,tcp", help="with --publish-rows")
    ap.add_argument("--runs", type=int, default=1, help="with --publish-rows")
    a = ap.parse_args()
    n = a.n or (50_000 if a.quick else 200_000)
    if a.publish_rows:
        publish_rows([t for t in a.transports.split(",") if t], n, a.batch, a.runs)
        return
    print(f"pub/sub benchmark, {n} events per cell, {os.cpu_count()} CPUs, python "
          f"{sys.version.split()[0]}")
    print("| transport | size | raw XPUB/SUB msg/s | best-effort publish() | best-effort "
          f"publish_many({a.batch}) | durable publish() | durable publish_many({a.batch}) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    cpu_rows = []
    for transport in ("tcp", "ipc"):
        for size in (100, 1024):
            raw = raw_case(transport, size, n, None)
            cells = []
            cpu = [raw]
            for durable in (False, True):
                for batch in (1, a.batch):
                    r = mesh_case(transport, size, n, durable, None, batch)
                    cpu.append(r)
                    note = "" if r["got"] == n else f" (got {r['got']})"
                    cells.append(f"{r['rate']:,.0f} = {r['rate'] / raw['rate']:.2f}x{note}")
            print(f"| {transport} | {size} B | {raw['rate']:,.0f} | " + " | ".join(cells) + " |",
                  flush=True)
            cpu_rows.append(f"| {transport} | {size} B | " + " | ".join(
                f"{r['cpu_p'] / n * 1e6:.1f} / {r['cpu_c'] / max(1, r['got']) * 1e6:.1f}"
                for r in cpu) + " |")
    # CPU time per event is far steadier than wall-clock rates on a shared machine (it does
    # not count time spent waiting for the CPU): it shows where a change helps, per side.
    # Process time, so libzmq's I/O thread and the node's reactor thread are included.
    print("\nCPU µs per event, producer / consumer (process time, all threads)")
    print("| transport | size | raw | best-effort publish() | best-effort publish_many | "
          "durable publish() | durable publish_many |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(cpu_rows), flush=True)
    rate, m = 2000.0, (2000 if a.quick else 6000)
    print(f"\nlatency, 100 B, {rate:.0f} events/s, {m} events (µs, p50 / p99)")
    print("| transport | raw XPUB/SUB | best-effort | durable (fsync 10 ms) |")
    print("|---|---:|---:|---:|")
    for transport in ("tcp", "ipc"):
        raw = raw_case(transport, 100, m, rate)
        be = mesh_case(transport, 100, m, False, rate, 1)
        du = mesh_case(transport, 100, m, True, rate, 1)
        print(f"| {transport} | {pct(raw['lats'], .5):.0f} / {pct(raw['lats'], .99):.0f} | "
              f"{pct(be['lats'], .5):.0f} / {pct(be['lats'], .99):.0f} | "
              f"{pct(du['lats'], .5):.0f} / {pct(du['lats'], .99):.0f} |", flush=True)


if __name__ == "__main__":
    main()
