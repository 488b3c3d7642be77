"""Where the time of one ``publish(replicas=1)`` goes: a stage profile (diagnostic).

    python bench/bench_store_stages.py                 # 2000 publishes, one store, fsync
    python bench/bench_store_stages.py --stub-fsync    # diagnostic: the store's fsync skipped
    python bench/bench_store_stages.py --sync write    # Store(sync="write")

One publisher (this process) and one store (a child process) on loopback, as
``bench/bench_store.py``'s k=1 latency phase. Both processes wrap a few internal methods to
record a timestamp (``time.perf_counter_ns``: CLOCK_MONOTONIC, the same clock in both
processes) when a stage begins; each publish's window is then cut into the stages below, in
this order (a sample missing one is dropped and counted: an unrelated wake-up can take a
mark's place, rarely; a stage is one whose mark shows in at least half of the publishes). The marks cost about a microsecond each; the total is the publish
time measured around ``publish()``.

- ``publish -> data send``: encode, origin log append (``write()`` only: the origin's fsync
  policy runs in the background, ``publish()`` never waits for it).
- ``-> store poll wakes``: the DATA message's pyzmq sends, both zmq I/O threads, loopback
  TCP, the store's follower thread waking in its poll.
- ``-> replica append``: the follower decodes the message and runs gap tracking.
- ``-> end of round``: the replica append (``write()``), the rest of the pump round.
- ``-> fsync done``: the replica log's fsync (``--stub-fsync``: none; ``--sync write``: none).
- ``-> ack sent`` : the ack is encoded and sent (``Node.send_now``, the store thread).
- ``-> origin reactor``: zmq I/O threads, loopback, the origin's reactor waking.
  (A build that hands the ack to the store's reactor first shows two more stages: ``->
  store reactor`` and ``-> store flush``.)
- ``-> ack counted``: the origin reactor reads, decodes and dispatches the control message.
- ``-> waiter notified``: the ack is counted and the waiting publisher notified.
- ``-> publish returns``: the publisher thread wakes and ``publish()`` returns.

The store's fsync calls (log and directory) are counted over the measured publishes.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PAYLOAD = b"\xa5" * 100
_now = time.perf_counter_ns
MARKS: list[tuple[int, str]] = []
#: (mark, what the stage ending at it is), in chain order.
STAGES = [
    ("p_send", "publish -> data send"),
    ("s_poll", "-> store poll wakes"),
    ("s_append", "-> replica append"),
    ("s_sync0", "-> end of round"),
    ("s_sync1", "-> fsync done"),
    ("s_send", "-> ack sent"),
    ("s_outq", "-> store reactor"),
    ("s_flush", "-> store flush"),
    ("p_router", "-> origin reactor"),
    ("p_onrep", "-> ack counted"),
    ("p_notified", "-> waiter notified"),
]


def mark(name: str) -> None:
    MARKS.append((_now(), name))


def _wrap(cls: Any, attr: str, before: str | None = None, after: str | None = None,
          when: Any = None) -> None:
    orig = getattr(cls, attr)

    def wrapper(*a: Any, **k: Any) -> Any:
        hit = when is None or when(*a, **k)
        if before and hit:
            mark(before)
        r = orig(*a, **k)
        if after and hit:
            mark(after)
        return r

    setattr(cls, attr, wrapper)


def _replicated(kind: str) -> bool:
    return kind == "pubsub.replicated"


def patch_store(stub_fsync: bool) -> dict[str, int]:
    from mesh.channel import ControlChannel
    from patterns.pubsub import store as S

    _wrap(S._Follower, "_drain_sub", before="s_poll")
    _wrap(S._Replica, "append", before="s_append")
    if stub_fsync:
        S._Replica.sync = lambda self: None  # type: ignore[method-assign]
    _wrap(S._Replica, "sync", before="s_sync0", after="s_sync1")
    _wrap(ControlChannel, "send", before="s_send",
          when=lambda self, peer, kind, raw: _replicated(kind))
    if hasattr(ControlChannel, "send_now"):
        _wrap(ControlChannel, "send_now", before="s_send",
              when=lambda self, peer, msgs: any(_replicated(k) for k, _ in msgs))
    _wrap(ControlChannel, "_drain_outq", before="s_outq")
    _wrap(ControlChannel, "_flush", before="s_flush")
    counts = {"fsync": 0}
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counted(fd: int, real: Any = real) -> None:
            counts["fsync"] += 1
            real(fd)

        setattr(os, name, counted)
    return counts


def patch_origin() -> None:
    from mesh.channel import ControlChannel
    from patterns.pubsub.publisher import _PubHub

    _wrap(_PubHub, "send_data", before="p_send")
    _wrap(_PubHub, "_on_replicated", before="p_onrep", after="p_notified")
    _wrap(ControlChannel, "_on_router", before="p_router")


def role_store(spec: dict[str, Any]) -> None:
    counts = patch_store(spec["stub_fsync"])
    from mesh.node import Node
    from patterns.pubsub.store import Store

    kw = {} if spec["sync"] == "fsync" else {"sync": spec["sync"]}
    with Node(data_dir=spec["dir"], name=f"store-{os.getpid()}", mesh=spec["mesh"],
              mdns=False, interface="127.0.0.1", static_peers=(spec["peer"],)) as nd, \
            Store(nd, topics=("bench.",), **kw):
        print("ready", flush=True)
        sys.stdin.readline()
        MARKS.clear()
        counts["fsync"] = 0
        print("go", flush=True)
        sys.stdin.readline()
        with open(spec["out"], "w") as f:
            json.dump({"marks": MARKS, "fsyncs": counts["fsync"]}, f)
        print("dumped", flush=True)
        sys.stdin.readline()


def run(args: argparse.Namespace) -> None:
    patch_origin()
    from mesh.errors import ReplicationTimeout
    from mesh.node import Node
    from patterns.pubsub.publisher import Publisher

    root = tempfile.mkdtemp(prefix="bench-stages-", dir=args.dir)
    try:
        with Node(data_dir=os.path.join(root, "pub"), name="bench-pub",
                  mesh=f"stages-{os.getpid()}", mdns=False, interface="127.0.0.1") as nd:
            peer = next(e for e in nd.info().endpoints["control"] if e.startswith("tcp://"))
            pub = Publisher(nd, "bench.lat", replicas=1, replica_timeout_s=30,
                            resume_from_stores=0, heartbeat_s=0.1)
            out = os.path.join(root, "store.json")
            spec = {"dir": os.path.join(root, "store"), "mesh": nd.mesh, "peer": peer,
                    "out": out, "stub_fsync": args.stub_fsync, "sync": args.sync}
            child = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--role-store", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=dict(os.environ, PYTHONPATH=REPO))
            assert child.stdin is not None and child.stdout is not None
            try:
                child.stdout.readline()
                deadline = time.monotonic() + 60
                while True:  # until the store follows the stream
                    try:
                        pub.publish(PAYLOAD)
                        break
                    except ReplicationTimeout:
                        if time.monotonic() > deadline:
                            raise
                for _ in range(200):
                    pub.publish(PAYLOAD)
                child.stdin.write("\n")
                child.stdin.flush()
                child.stdout.readline()
                MARKS.clear()
                windows = []
                for _ in range(args.lat):
                    t0 = _now()
                    pub.publish(PAYLOAD)
                    windows.append((t0, _now()))
                child.stdin.write("\n")
                child.stdin.flush()
                child.stdout.readline()
                with open(out) as f:
                    store = json.load(f)
            finally:
                child.stdin.close()
                child.wait(30)
            pub.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(windows, [(t, n) for t, n in store["marks"]] + MARKS, store["fsyncs"], args)


def report(windows: list[tuple[int, int]], marks: list[tuple[int, str]], fsyncs: int,
           args: argparse.Namespace) -> None:
    marks.sort()
    # A stage this build has shows in (nearly) every publish; a mark seen only now and then
    # (the reactor flushing a heartbeat) is not a stage of the ack path.
    count = collections.Counter(n for _, n in marks)
    order = [(m, what) for m, what in STAGES if count[m] >= len(windows) / 2]
    times = [t for t, _ in marks]
    per: dict[str, list[int]] = {what: [] for _, what in order}
    per["-> publish returns"] = []
    totals, dropped = [], 0
    for t0, t1 in windows:
        evs = marks[bisect.bisect_left(times, t0):bisect.bisect_right(times, t1)]
        row, prev, k = {}, t0, 0
        for m, what in order:
            while k < len(evs) and evs[k][1] != m:
                k += 1
            if k == len(evs):
                break
            row[what] = evs[k][0] - prev
            prev = evs[k][0]
        else:
            row["-> publish returns"] = t1 - prev
            for what, v in row.items():
                per[what].append(v)
            totals.append(t1 - t0)
            continue
        dropped += 1
    load = os.getloadavg()
    print(f"# {args.lat} publishes of {len(PAYLOAD)} B, replicas=1, store sync={args.sync}"
          f"{' (fsync stubbed: diagnostic)' if args.stub_fsync else ''}; {len(totals)} "
          f"samples with every stage ({dropped} dropped); load average {load[0]:.2f}")
    if not totals:
        return
    st = sorted(totals)
    print(f"# publish(): p50 {st[len(st) // 2] / 1e3:,.0f} µs, mean "
          f"{statistics.mean(st) / 1e3:,.0f} µs; store fsyncs per publish "
          f"{fsyncs / len(windows):.2f}")
    print("| stage | p50 µs | p90 µs | mean µs |")
    print("| --- | --- | --- | --- |")
    for what, v in per.items():
        v.sort()
        print(f"| {what} | {v[len(v) // 2] / 1e3:,.1f} | {v[int(len(v) * 0.9)] / 1e3:,.1f} | "
              f"{statistics.mean(v) / 1e3:,.1f} |")
    p50s = sum(sorted(v)[len(v) // 2] for v in per.values()) / 1e3
    print(f"# sum of the stage p50s: {p50s:,.0f} µs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--lat", type=int, default=2000, help="publishes measured (default 2000)")
    ap.add_argument("--sync", choices=("fsync", "write"), default="fsync",
                    help="the store's Store(sync=...)")
    ap.add_argument("--stub-fsync", action="store_true",
                    help="diagnostic: the store skips its fsync (never a real setting)")
    ap.add_argument("--dir", default=None, help="where the data dirs go (default /tmp)")
    ap.add_argument("--role-store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role_store:
        role_store(json.loads(args.role_store))
        return 0
    if args.lat < 1:
        ap.error("--lat must be >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
