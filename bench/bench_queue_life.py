"""Benchmark: a work queue's restart time, RSS and disk after a long life.

Run: ``python bench/bench_queue_life.py --tasks 1000000 3000000`` (each size: a child process
pushes that many tasks through a WorkQueue with two in-process workers, at most ``--window``
owed at a time, leaving ``--owed`` tasks pending at the end; then a fresh child opens the queue
again and reports how long ``WorkQueue(...)`` took, its peak RSS (``VmHWM``) with and
without the queue, and the queue's disk use).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _node(data_dir: str):  # type: ignore[no-untyped-def]
    from mesh.node import Node

    return Node(data_dir=data_dir, name="life", mesh="bench-life", interface="127.0.0.1",
                mdns=False)


def life(data_dir: str, n: int, window: int, owed: int) -> None:
    from patterns.pipeline.queue import WorkQueue
    from patterns.pipeline.worker import Worker

    node = _node(data_dir)
    q = WorkQueue(node, "jobs")
    workers = [Worker(node, "jobs", credit=200) for _ in range(2)]
    stop = threading.Event()

    def work(w: Worker) -> None:
        while not stop.is_set():
            batch = w.get_many(500, timeout=0.05) if hasattr(w, "get_many") else []
            if not batch:
                t = w.get(timeout=0.05)
                batch = [t] if t is not None else []
            for t in batch:
                t.ack()

    ths = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
    for th in ths:
        th.start()
    t0 = time.perf_counter()
    pushed = 0
    payload = b"x" * 100
    while pushed < n:
        s = q.stats()
        if pushed - s.get("acked", 0) > window:
            time.sleep(0.001)  # back-pressure: keep at most `window` owed
            continue
        k = min(1000, n - pushed)
        q.push_many([payload] * k)
        pushed += k
    while q.stats().get("acked", 0) < n:
        time.sleep(0.01)
    dt = time.perf_counter() - t0
    stop.set()
    for th in ths:
        th.join(5)
    for w in workers:
        w.close()
    if owed:
        q.push_many([payload] * owed)  # no worker left: these stay owed
    q.close()
    node.close()
    print(json.dumps({"life_s": dt, "rate": n / dt}))


def restart(data_dir: str) -> None:
    from patterns.pipeline.queue import WorkQueue

    node = _node(data_dir)
    base = _status("VmHWM")
    t0 = time.perf_counter()
    q = WorkQueue(node, "jobs")
    dt = time.perf_counter() - t0
    out = {"restart_s": dt, "recovered": q.recovered, "hwm": _status("VmHWM"),
           "hwm_node_only": base, "rss": _status("VmRSS")}
    q.close()
    node.close()
    print(json.dumps(out))


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


def _child(*args: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env,
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--window", type=int, default=20_000, help="most tasks owed at a time")
    ap.add_argument("--owed", type=int, default=10_000, help="tasks left owed at the end")
    ap.add_argument("--dir", default=None, help="where the data directories go")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "life":
        life(args.data, args.tasks[0], args.window, args.owed)
        return
    if args.role == "restart":
        restart(args.data)
        return
    print(f"queue life benchmark: window {args.window:,} owed, {args.owed:,} left owed, "
          f"{os.cpu_count()} CPUs")
    print("|     tasks | life rate/s | restart s | recovered | peak RSS MiB (node alone) |"
          " .tasks MiB | journal MiB |")
    print("|----------:|------------:|----------:|----------:|--------------------------:|"
          "-----------:|------------:|")
    for n in args.tasks:
        root = tempfile.mkdtemp(prefix="bench-qlife-", dir=args.dir)
        try:
            data = os.path.join(root, "node")
            lf = _child("--role", "life", "--data", data, "--tasks", str(n), "--window",
                        str(args.window), "--owed", str(args.owed))
            rs = _child("--role", "restart", "--data", data)
            qdir = os.path.join(data, "queues", "streams")
            tasks = _du(os.path.join(qdir, "jobs.tasks"))
            journal = sum(_du(os.path.join(qdir, d)) for d in os.listdir(qdir)
                          if d.startswith("jobs.journal"))
            mib = 1 << 20
            print(f"| {n:>9,} | {lf['rate']:>11,.0f} | {rs['restart_s']:>9.3f} | "
                  f"{int(rs['recovered']):>9,} | {rs['hwm'] / mib:>12.1f} "
                  f"({rs['hwm_node_only'] / mib:>5.1f}) | {tasks / mib:>10.2f} | "
                  f"{journal / mib:>11.2f} |", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
