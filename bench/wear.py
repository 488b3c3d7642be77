"""Storage wear of each log fsync policy: what publishing N small durable events writes.

Run: ``python bench/wear.py`` (10,000 events of 100 B per policy, about 10-20 s) or
``python bench/wear.py --events 1000 --rate 200`` (paced like a sensor: the interval policies
then fsync far more often per event). ``--dir`` picks the file system to measure (default: a
temporary directory under ``$TMPDIR``/``/tmp``; put it on the SD card to measure the card's).

Each policy runs in a fresh child process: a Node (no discovery, loopback), one durable
:class:`patterns.pubsub.Publisher` with ``LogConfig(fsync=POLICY)``, N ``publish()`` calls of
a 100 B payload, then the publisher's close. Measured between the publisher's open and its
close (the node's own start and stop are left out):

- ``write_bytes``: ``/proc/self/io`` write_bytes of the child (bytes the process sent to the
  storage layer: a page is counted each time it is dirtied again after being written back, so
  an fsync that cleans the log's partial last page makes the next append count 4 KiB again).
  The file system's journal (ext4 jbd2) is written by a kernel thread and is not in it.
- ``fsyncs``: calls of ``os.fsync`` and ``os.fdatasync`` in the child, counted by wrapping
  both in this script only (the product is not changed). Checked against ``strace -f -c -e
  trace=fsync,fdatasync`` of a child: 107 fsync calls for every(100), the 104 counted here
  plus the 3 of the node's start (node.id), which is outside the measured window.
- ``events/fsync``, ``WA`` (write amplification: write_bytes / payload bytes, N x 100 B) and
  ``WA/log`` (write_bytes / the bytes the log holds after close: what fsync adds on top of the
  envelope and framing, 1.0 when every page is written once).
- ``device_bytes``: bytes written to the block device holding ``--dir`` (sysfs sectors
  written, from before the child starts to an ``os.sync()`` after it ends). This one includes
  the file system's journal and metadata, but it is machine-wide: any other process writing
  to that device at the same time is counted too, so read it on an otherwise idle machine.
  ``-`` where there is no block device (tmpfs).

Output: a comment line, then one Markdown table with the columns of :data:`COLUMNS`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (kind, value) of the FsyncPolicy it stands for (built in the child)
POLICIES: dict[str, tuple[str, float]] = {
    "always": ("always", 0),
    "every(100)": ("every", 100),
    "every(1000)": ("every", 1000),
    "interval(10ms)": ("interval", 10.0),  # the default
    "interval(100ms)": ("interval", 100.0),
    "interval(1000ms)": ("interval", 1000.0),
    "never": ("never", 0),
}

COLUMNS = ("policy", "events", "write_bytes", "log_bytes", "fsyncs", "events/fsync", "WA",
           "WA/log", "device_bytes")
PAYLOAD = 100


def _io_write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _device_stat(path: str) -> str | None:
    """The /sys stat file of the block device holding ``path`` (None: no block device, e.g.
    tmpfs, or no sysfs)."""
    st = os.stat(path)
    stat = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return stat if os.path.exists(stat) else None


def _device_written(stat: str | None) -> int | None:
    """Bytes written to that device so far (sectors written x 512), or None."""
    if stat is None:
        return None
    with open(stat) as f:
        return int(f.read().split()[6]) * 512


def child(policy: str, events: int, rate: float, data_dir: str) -> dict[str, object]:
    """Run one policy in this process; return its measurements."""
    counts = {"fsync": 0}
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        counts["fsync"] += 1
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        counts["fsync"] += 1
        real_fdatasync(fd)

    os.fsync = fsync  # bench only: count every fsync the log (and its background thread) makes
    os.fdatasync = fdatasync

    sys.path.insert(0, REPO)
    from mesh.log import FsyncPolicy, LogConfig
    from mesh.node import Node
    from patterns.pubsub import Publisher

    kind, value = POLICIES[policy]
    fsync_policy = {"always": FsyncPolicy.always, "never": FsyncPolicy.never}[kind]() \
        if kind in ("always", "never") else \
        FsyncPolicy.every(int(value)) if kind == "every" else FsyncPolicy.interval(value)
    payload = b"x" * PAYLOAD
    with Node(data_dir=data_dir, name="wear", mdns=False, interface="127.0.0.1") as node:
        os.sync()  # the node's own files are written back before we start counting
        counts["fsync"] = 0
        before = _io_write_bytes()
        t0 = time.perf_counter()
        pub = Publisher(node, "wear.stream", log_config=LogConfig(fsync=fsync_policy))
        gap = 1.0 / rate if rate > 0 else 0.0
        next_at = time.perf_counter()
        for _ in range(events):
            pub.publish(payload)
            if gap:
                next_at += gap
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)  # pacing the producer, like a sensor
        pub.close()
        elapsed = time.perf_counter() - t0
        fsyncs = counts["fsync"]
        written = _io_write_bytes() - before
    return {"policy": policy, "events": events, "write_bytes": written,
            "log_bytes": _dir_bytes(os.path.join(data_dir, "streams")), "fsyncs": fsyncs,
            "seconds": round(elapsed, 3)}


def run_policy(policy: str, events: int, rate: float, root: str) -> dict[str, object]:
    """Run one policy in a fresh child process (fresh counters, fresh log thread)."""
    data_dir = tempfile.mkdtemp(prefix="wear-", dir=root)
    stat = _device_stat(data_dir)
    try:
        os.sync()
        dev_before = _device_written(stat)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", policy,
                            "--events", str(events), "--rate", str(rate), "--dir", data_dir],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"wear: policy {policy} failed:\n{r.stderr}")
        result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
        os.sync()  # before the directory is removed: written-back data, as it would be kept
        dev_after = _device_written(stat)
        result["device_bytes"] = None if dev_before is None or dev_after is None else \
            dev_after - dev_before
        return result
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def table(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table (the format README.md and BENCHMARKS.md show)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        n, wb, fs = int(str(r["events"])), int(str(r["write_bytes"])), int(str(r["fsyncs"]))
        per = f"{n / fs:,.1f}" if fs else "-"
        wa = f"{wb / (n * PAYLOAD):.2f}" if n else "-"
        lb = int(str(r["log_bytes"]))
        per_log = f"{wb / lb:.2f}" if lb else "-"
        dev = r.get("device_bytes")
        dev_s = "-" if dev is None else f"{int(str(dev)):,}"
        lines.append(f"| {r['policy']} | {n:,} | {wb:,} | {lb:,} | {fs:,} | {per} | {wa} | "
                     f"{per_log} | {dev_s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000, help="events per policy")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="events per second (0: as fast as possible)")
    ap.add_argument("--dir", default=None, help="where the logs are written (a file system "
                    "to measure; default a temporary directory)")
    ap.add_argument("--policy", action="append", choices=list(POLICIES), default=None,
                    help="only these policies (repeatable; default all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.events < 1:
        ap.error("--events must be >= 1")
    if args.rate < 0:
        ap.error("--rate must be >= 0")
    if not os.path.exists("/proc/self/io"):
        print("wear: /proc/self/io is not available (Linux only)", file=sys.stderr)
        return 1
    if args.child is not None:
        print(json.dumps(child(args.child, args.events, args.rate, args.dir)))
        return 0
    root = args.dir or tempfile.gettempdir()
    rows = [run_policy(p, args.events, args.rate, root) for p in args.policy or POLICIES]
    pace = f"{args.rate:g}/s" if args.rate else "as fast as possible"
    print(f"# {args.events:,} events of {PAYLOAD} B per policy, {pace}, in {root}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
