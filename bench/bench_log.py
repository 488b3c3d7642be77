"""Benchmark of the durable log (mesh.log) against a plain buffered write() ceiling.

Run: ``python bench/bench_log.py`` (about 30-60 s) or ``python bench/bench_log.py --quick``.
Every figure is printed with its ratio to the ceiling measured in the same run: a plain
buffered ``write()`` of the same pre-framed bytes, one call per record, to a file in the same
directory. ``fsync=always`` is shown beside the raw fsync rate of the same disk.
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
from mesh.log import format as fmt

ROWS: list[tuple[str, float, float, str]] = []


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def ceiling(root: str, size: int, n: int) -> tuple[float, float]:
    """Records/s and MB/s of buffered write() of pre-framed records, one call per record."""
    frames = [fmt.encode_one(i, 0, b"x" * size) for i in range(min(n, 10000))]
    reps = n // len(frames)
    path = os.path.join(root, f"ceiling-{size}")

    def run() -> int:
        with open(path, "wb") as f:
            w = f.write
            for _ in range(reps):
                for fr in frames:
                    w(fr)
        return reps * len(frames)

    count, dt = timed(run)
    os.unlink(path)
    return count / dt, count * size / dt / 1e6


def raw_fsync_rate(root: str, seconds: float) -> float:
    path = os.path.join(root, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    data = b"x" * 1024
    n = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            os.write(fd, data)
            os.fsync(fd)
            n += 1
    finally:
        os.close(fd)
        os.unlink(path)
    return n / (time.perf_counter() - t0)


def bench_append(root: str, name: str, policy: FsyncPolicy, size: int, n: int,
                 batch: int, threads: int = 1) -> tuple[float, float]:
    path = os.path.join(root, name)
    payload = b"p" * size
    per_thread = n // threads
    with Log.open(path, config=LogConfig(fsync=policy)) as log:
        def work() -> None:
            if batch == 1:
                app = log.append
                for _ in range(per_thread):
                    app(payload)
            else:
                chunk = [payload] * batch
                many = log.append_many
                for _ in range(per_thread // batch):
                    many(chunk)

        def run() -> int:
            if threads == 1:
                work()
            else:
                ts = [threading.Thread(target=work) for _ in range(threads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            log.flush(sync=policy.kind != "never")
            return log.next_offset

        count, dt = timed(run)
    shutil.rmtree(path)
    return count / dt, count * size / dt / 1e6


def bench_replay(root: str, size: int, n: int, batch: int) -> float:
    path = os.path.join(root, f"replay-{batch}")
    payload = b"r" * size
    with Log.open(path, config=LogConfig(fsync=FsyncPolicy.never())) as log:
        if batch == 1:
            for _ in range(n):
                log.append(payload)
        else:
            for _ in range(n // batch):
                log.append_many([payload] * batch)
    with Log.open(path, readonly=True) as log:
        def run() -> int:
            off, total = 0, 0
            read = log.read_batch_payloads
            while True:
                first, pls = read(off, 10000)
                if not pls:
                    return total
                total += len(pls)
                off = first + len(pls)

        count, dt = timed(run)
    shutil.rmtree(path)
    assert count == n // batch * batch, count
    return count / dt


def row(name: str, rps: float, mbs: float, ratio: str) -> None:
    ROWS.append((name, rps, mbs, ratio))
    print(f"| {name:<52} | {rps:>12,.0f} | {mbs:>9,.1f} | {ratio:<26} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (about 10 s)")
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    args = ap.parse_args()
    k = 0.25 if args.quick else 1.0
    root = tempfile.mkdtemp(prefix="bench-log-", dir=args.dir)
    try:
        print(f"python {sys.version.split()[0]}, dir {root}, quick={args.quick}")
        c1k, c1k_mb = ceiling(root, 1024, int(400_000 * k))
        c100, c100_mb = ceiling(root, 100, int(2_000_000 * k))
        fs = raw_fsync_rate(root, 2.0 * k)
        print("| case                                                 |    records/s |      MB/s "
              "| ratio                      |")
        print("|------------------------------------------------------|-------------:|----------:"
              "|----------------------------|")
        row("ceiling: buffered write(), 1 KiB, one call/record", c1k, c1k_mb, "1.00x")
        row("ceiling: buffered write(), 100 B, one call/record", c100, c100_mb, "1.00x")
        row("raw fsync (1 KiB write + fsync)", fs, fs * 1024 / 1e6, "(disk fsync rate)")
        n1k = int(400_000 * k)
        policies = (("never", FsyncPolicy.never()), ("every 10 ms", FsyncPolicy.interval(10)))
        for label, pol in policies:
            r, m = bench_append(root, "a1", pol, 1024, n1k, 1)
            row(f"append() 1 KiB, fsync {label}", r, m, f"{m / c1k_mb:.2f}x ceiling MB/s")
            r, m = bench_append(root, "a2", pol, 1024, n1k, 100)
            row(f"append_many(100) 1 KiB, fsync {label}", r, m, f"{m / c1k_mb:.2f}x ceiling MB/s")
        n100 = int(2_000_000 * k)
        policies = (("never", FsyncPolicy.never()), ("every 10 ms", FsyncPolicy.interval(10)))
        for label, pol in policies:
            r, m = bench_append(root, "b1", pol, 100, n100 // 4, 1)
            row(f"append() 100 B, fsync {label}", r, m, f"{r / c100:.2f}x ceiling rec/s")
            r, m = bench_append(root, "b2", pol, 100, n100, 1000)
            row(f"append_many(1000) 100 B, fsync {label}", r, m, f"{r / c100:.2f}x ceiling rec/s")
        na = max(200, int(fs * 1.5 * k))
        r, m = bench_append(root, "c1", FsyncPolicy.always(), 1024, na, 1)
        row("append() 1 KiB, fsync always, 1 thread", r, m, f"{r / fs:.2f}x raw fsyncs/s")
        r, m = bench_append(root, "c4", FsyncPolicy.always(), 1024, na * 2, 1, threads=4)
        row("append() 1 KiB, fsync always, 4 threads (group)", r, m, f"{r / fs:.2f}x raw fsyncs/s")
        r, m = bench_append(root, "c5", FsyncPolicy.always(), 100, int(200_000 * k), 100)
        row("append_many(100) 100 B, fsync always", r, m,
            f"{r / 100 / fs:.2f}x raw fsyncs/s (batches)")
        rr = bench_replay(root, 100, n100, 1000)
        row("replay read_batch_payloads, 100 B (batches of 1000)", rr, rr * 100 / 1e6,
            f"{rr / c100:.2f}x ceiling rec/s")
        rr = bench_replay(root, 100, n100 // 4, 1)
        row("replay read_batch_payloads, 100 B (1 record/batch)", rr, rr * 100 / 1e6,
            f"{rr / c100:.2f}x ceiling rec/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
