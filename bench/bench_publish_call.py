"""What one publish() call costs the publishing thread, without a subscriber or the network.

Per-call CPU of ``Publisher.publish`` (best-effort and durable), ``publish_many`` per event,
and the durable log's ``Log.append`` alone, each the minimum over ``--repeat`` timeit runs
(the minimum is what a quiet core gives; the other runs met other work on the machine).
Compare builds by running it from each checkout in turn (``PYTHONPATH=<checkout>``).

    python bench/bench_publish_call.py [--calls N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import timeit

# Appended, not prepended: PYTHONPATH=<another checkout> measures that checkout's code.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh.log import FsyncPolicy, Log, LogConfig
from mesh.node import Node
from patterns.pubsub import Publisher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000, help="calls per timeit run")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="zmcall")
    cfg = LogConfig(fsync=FsyncPolicy.interval(10.0))
    payload, batch = b"x" * 100, [b"x" * 100] * 100
    print(f"# per-call CPU, 100 B payloads, min of {a.repeat} runs of {a.calls:,} calls; "
          f"load average {os.getloadavg()[0]:.2f}")

    def best(stmt: str, g: dict[str, object], n: int, per: int = 1) -> float:
        return min(timeit.repeat(stmt, globals=g, number=n, repeat=a.repeat)) / n / per * 1e6

    try:
        with Node(data_dir=f"{root}/p", name="p", mesh=f"call{os.getpid()}", mdns=False,
                  interface="127.0.0.1", transports=("tcp",)) as nd, \
                Publisher(nd, "call.b", durable=False) as pb, \
                Publisher(nd, "call.d", durable=True, log_config=cfg) as pd:
            g: dict[str, object] = {"pb": pb, "pd": pd, "d": payload, "ds": batch}
            rows = [
                ("best-effort publish()", best("pb.publish(d, type='m')", g, a.calls)),
                ("durable publish()", best("pd.publish(d, type='m')", g, a.calls)),
                ("best-effort publish_many(100), per event",
                 best("pb.publish_many(ds, type='m')", g, a.calls // 100, 100)),
                ("durable publish_many(100), per event",
                 best("pd.publish_many(ds, type='m')", g, a.calls // 100, 100)),
            ]
        with Log.open(f"{root}/log", config=cfg) as lg:
            rows.append(("Log.append (177 B record)",
                         best("lg.append(e)", {"lg": lg, "e": b"y" * 177}, a.calls)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| call | µs |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
