"""Pipeline benchmark: zeromesh work queue (every task acked) against raw pyzmq PUSH/PULL.

Run:  python bench/bench_pipeline.py            (200,000 tasks per row x 3, about 1 min)
      python bench/bench_pipeline.py --quick    (50,000 tasks per row: runs of ~0.2 s, whose
                                                 ratios swing +-50 % on a shared VM)

Every row is measured in the same run as its raw PUSH/PULL ceiling and printed as a ratio: raw
and zeromesh runs alternate, each zeromesh run is divided by the raw run just before it, and
the median of those ratios is shown (with each run's).
Raw: one PUSH in this process to one PULL child process over ipc, timed until the child has
received every message. zeromesh: a WorkQueue in this process (task log + journal, fsync every
10 ms), 1 or 2 Worker child processes (ipc, credit 1000, ack every task), timed from the first
push until the producer has recorded the last ack.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mesh.log import FsyncPolicy  # noqa: E402
from mesh.node import Node  # noqa: E402
from patterns.pipeline.dispatch import DispatchConfig  # noqa: E402
from patterns.pipeline.queue import WorkQueue  # noqa: E402


def _child(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                            stdout=subprocess.PIPE)


def raw_pull(endpoint: str, n: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(endpoint)
    print("ready", flush=True)
    s.recv()
    t0 = time.perf_counter()
    for _ in range(int(n) - 1):
        s.recv()
    print(f"done {time.perf_counter() - t0} {time.process_time()}", flush=True)
    s.close(0)
    ctx.term()


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of another process so far (Linux /proc; 10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def bench_raw(n: int, size: int, tmp: str,
              cpu: dict[str, tuple[float, float]] | None = None) -> float:
    """Raw PUSH/PULL msg/s; ``cpu["raw"]`` = CPU µs per message (producer, consumer)."""
    ep = f"ipc://{tmp}/raw-{size}.sock"
    child = _child("raw-pull", ep, str(n))
    assert child.stdout is not None
    child.stdout.readline()
    s0 = proc_cpu(child.pid)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(ep)
    msg = b"x" * size
    t0 = time.perf_counter()
    c0 = time.process_time()
    for _ in range(n):
        s.send(msg)
    cp = time.process_time() - c0
    line = child.stdout.readline().decode().split()
    if cpu is not None:  # the child's own process time at "done", minus what it had at ready
        cpu["raw"] = (cp / n * 1e6, (float(line[2]) - s0) / n * 1e6)
    elapsed = max(float(line[1]), time.perf_counter() - t0 - 0.0)
    child.wait(10)
    s.close(0)
    ctx.term()
    return n / elapsed


def mesh_worker(data_dir: str, mesh: str, peer: str, queue: str) -> None:
    from patterns.pipeline.worker import Worker

    node = Node(data_dir=data_dir, mesh=mesh, interface="127.0.0.1", mdns=False,
                static_peers=(peer,))
    with Worker(node, queue, credit=1000) as w:
        while True:
            t = w.get()
            if t is not None:
                t.ack()


def bench_mesh(n: int, size: int, workers: int, tmp: str,
               cpu: dict[str, tuple[float, float]] | None = None) -> float:
    """Tasks acked per second; ``cpu["mesh"]`` = CPU µs per task (producer process with its
    WorkQueue and node, all worker processes together)."""
    mesh = f"bench-{os.getpid()}-{size}-{workers}-{os.path.basename(tmp)}"
    node = Node(data_dir=f"{tmp}/p-{size}-{workers}", mesh=mesh, interface="127.0.0.1",
                mdns=False)
    queue = f"bench{size}x{workers}"
    q = WorkQueue(node, queue, config=DispatchConfig(ack_wait=30.0),
                  fsync=FsyncPolicy.interval(10.0))
    peer = next(e for e in node.info().endpoints["control"] if e.startswith("tcp://"))
    kids = [_child("mesh-worker", f"{tmp}/w-{size}-{workers}-{i}", mesh, peer, queue)
            for i in range(workers)]
    try:
        deadline = time.monotonic() + 20
        while q._dispatcher.stats()["workers"] < workers:  # racy read: a bench, not a test
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register")
            time.sleep(0.01)
        payloads = [b"x" * size] * 1000
        counters = q._dispatcher.counters
        w0 = sum(proc_cpu(k.pid) for k in kids)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for _ in range(n // 1000):
            q.push_many(payloads)
        while counters["acked"] < n:
            time.sleep(0.001)
        elapsed = time.perf_counter() - t0
        if cpu is not None:
            cpu["mesh"] = ((time.process_time() - c0) / n * 1e6,
                           (sum(proc_cpu(k.pid) for k in kids) - w0) / n * 1e6)
    finally:
        for k in kids:
            k.kill()
            k.wait(5)
        q.close()
        node.close()
    return n / elapsed


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "raw-pull":
        raw_pull(*sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "mesh-worker":
        mesh_worker(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="50,000 tasks per row (noisier)")
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    args = ap.parse_args()
    n = args.n or (50_000 if args.quick else 200_000)
    tmp = tempfile.mkdtemp(prefix="benchpipe-")
    print(f"pipeline benchmark: {n} tasks per row, median of {args.repeat}, "
          f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    print(f"{'size':>6} {'mode':<34} {'msgs/s':>12} {'x raw':>7}")
    try:
        for size in (100, 1024):
            # Alternate raw and zeromesh runs and take each run's ratio to the raw run just
            # before it: load from elsewhere then moves both sides of a ratio together.
            raws: list[float] = []
            mesh: dict[int, list[float]] = {1: [], 2: []}
            ratios: dict[int, list[float]] = {1: [], 2: []}
            for rep in range(args.repeat):
                raw = bench_raw(n, size, tmp)
                raws.append(raw)
                for workers in (1, 2):
                    r = bench_mesh(n, size, workers, f"{tmp}/{rep}")
                    mesh[workers].append(r)
                    ratios[workers].append(r / raw)
            print(f"{size:>6} {'raw pyzmq PUSH/PULL ipc':<34} {statistics.median(raws):>12,.0f} "
                  f"{1.0:>7.2f}", flush=True)
            for workers in (1, 2):
                label = f"zeromesh pipeline, {workers} worker(s), acked"
                rs = ", ".join(f"{x:.2f}" for x in ratios[workers])
                print(f"{size:>6} {label:<34} {statistics.median(mesh[workers]):>12,.0f} "
                      f"{statistics.median(ratios[workers]):>7.2f}  (runs: {rs})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
