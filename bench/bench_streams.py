"""Benchmark: thousands of durable streams in one process.

Run: ``python bench/bench_streams.py`` (10,000 streams, both parts) or
``python bench/bench_streams.py --streams 2000 --part log``.

Part ``log``: N interval-fsync :class:`mesh.log.Log` objects, each created and appended to
once. Part ``node``: N durable :class:`patterns.pubsub.Publisher` objects on one real
``Node(mdns=False, interface="127.0.0.1")``, each publishing one event. For each: the time to
create and first append/publish all N, the threads and descriptors the process holds, and its
idle CPU (from /proc/self/stat) over a few seconds once every record is fsynced. The node part
stops at ``--budget`` seconds of creation and reports how far it got and at what rate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh.log import FsyncPolicy, Log, LogConfig


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cpu_s() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(seconds: float) -> float:
    c0, w0 = cpu_s(), time.monotonic()
    time.sleep(seconds)  # measuring idle CPU: the process must do nothing meanwhile
    return (cpu_s() - c0) / (time.monotonic() - w0)


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def report(name: str, n: int, created_s: float, threads: int, held_fds: int, idle: float,
           extra: str = "") -> None:
    print(f"| {name:<34} | {n:>6,} | {created_s:>8.2f} s | {threads:>7} | {held_fds:>7,} | "
          f"{idle * 100:>6.2f}% | {extra}")


def part_log(root: str, n: int, idle_s: float) -> None:
    t0_threads, t0_fds = threading.active_count(), fds()
    logs = []
    t0 = time.perf_counter()
    for i in range(n):
        lg = Log.open(os.path.join(root, f"s{i}"),
                      config=LogConfig(fsync=FsyncPolicy.interval(10)))
        lg.append(b"x" * 100)
        logs.append(lg)
    created = time.perf_counter() - t0
    synced = wait_for(lambda: all(lg.stats().durable_offset == 0 for lg in logs), 120)
    synced_s = time.perf_counter() - t0
    idle = idle_cpu(idle_s)
    report("Log, fsync interval 10 ms", n, created, threading.active_count() - t0_threads,
           fds() - t0_fds, idle, f"all fsynced {synced} after {synced_s:.2f} s")
    t1 = time.perf_counter()
    for lg in logs:
        lg.close()
    print(f"  (close of all {n:,}: {time.perf_counter() - t1:.2f} s)")


def part_node(root: str, n: int, idle_s: float, budget: float, heartbeat_s: float) -> None:
    from mesh.node import Node
    from patterns.pubsub.publisher import Publisher

    t0_threads, t0_fds = threading.active_count(), fds()
    node = Node(data_dir=os.path.join(root, "node"), name="bench", mesh="bench-streams",
                mdns=False, interface="127.0.0.1")
    pubs = []
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = []
    try:
        for i in range(n):
            pub = Publisher(node, f"s{i}", heartbeat_s=heartbeat_s)
            pub.publish({"i": i})
            pubs.append(pub)
            if (i + 1) % 1000 == 0:
                marks.append((i + 1, time.perf_counter() - t0))
            if time.perf_counter() - t0 > budget:
                break
        created = time.perf_counter() - t0
        logs = [p._st.log for p in pubs]
        wait_for(lambda: all(lg.stats().durable_offset == 0 for lg in logs), 120)
        idle = idle_cpu(idle_s)
        report(f"Publisher on a Node, heartbeat {heartbeat_s:g} s", len(pubs), created,
               threading.active_count() - t0_threads, fds() - t0_fds, idle,
               "stopped at the budget" if len(pubs) < n else "")
        if marks:
            steps = []
            prev_n, prev_t = 0, 0.0
            for k, t in marks:
                steps.append(f"{k:,}: {(t - prev_t) / (k - prev_n) * 1e3:.2f} ms/pub")
                prev_n, prev_t = k, t
            print("  per-publisher creation cost by thousand: " + ", ".join(steps))
    finally:
        t1 = time.perf_counter()
        for p in pubs:
            p.close()
        node.close()
        print(f"  (close of {len(pubs):,} publishers and the node: "
              f"{time.perf_counter() - t1:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--part", choices=("log", "node", "both"), default="both")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measurement")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds of node-part creation before it stops")
    ap.add_argument("--heartbeat", type=float, default=0.5,
                    help="Publisher heartbeat_s of the node part (default 0.5, the default)")
    ap.add_argument("--dir", default=None, help="where to create the logs (default /tmp)")
    args = ap.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"python {sys.version.split()[0]}, RLIMIT_NOFILE {soft}/{hard}, "
          f"{os.cpu_count()} CPUs, {args.streams:,} streams")
    print("| case                               | streams | create+1st | threads |     fds | "
          "idle CPU | notes")
    for part in (("log", "node") if args.part == "both" else (args.part,)):
        root = tempfile.mkdtemp(prefix="bench-streams-", dir=args.dir)
        try:
            if part == "log":
                part_log(root, args.streams, args.idle)
            else:
                part_node(root, args.streams, args.idle, args.budget, args.heartbeat)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
