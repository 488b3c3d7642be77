"""Memory of a stuck subscriber and its publisher: RSS of both while N events are published.

Two real processes on one machine (tcp loopback): a durable publisher and a durable
subscriber whose handler takes event 0, then blocks (on its stdin) at the first event after
it, as a stuck handler does. The publisher then publishes N events of ``--size`` bytes of data
each, either ``publish_many`` in calls of ``--batch`` events or one ``publish()`` per event.
The driver samples VmRSS of both processes from ``/proc/PID/status`` every 20 ms until the
publisher is done and the subscriber's RSS stopped growing, then releases the subscriber and
waits until it has received every event: it checks seqs 1..N come once each, in order, with
no hole and no repeat (the part the queues dropped comes by replay from the log).

    python bench/bench_pubsub_memory.py                       # 1 M events, both modes
    python bench/bench_pubsub_memory.py -n 200000 --mode batch --json

Printed per mode: peak RSS (MiB) of publisher and subscriber while stuck, the subscriber's
peak over the whole run (VmHWM, catch-up included), the catch-up time after release and the
delivery check.
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
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _status_kib(pid: int, field: str) -> int:
    """One ``VmXxx:`` field of /proc/PID/status in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _node(data_dir: str, mesh: str, peers: tuple[str, ...]) -> Any:
    from mesh.node import Node
    return Node(data_dir=data_dir, name=f"mem-{os.getpid()}", mesh=mesh, mdns=False,
                interface="127.0.0.1", transports=("tcp",), static_peers=peers)


def child_pub(data_dir: str, mesh: str, stream: str, mode: str, n: int, size: int,
              batch: int) -> None:
    """Publisher: event 0, then ``go`` on stdin, then events 1..n; serve until stdin closes."""
    from mesh.log import FsyncPolicy, LogConfig
    from patterns.pubsub import Publisher
    with _node(data_dir, mesh, ()) as nd, Publisher(
            nd, stream, heartbeat_s=0.1,
            log_config=LogConfig(fsync=FsyncPolicy.interval(1.0))) as pub:
        ctrl = next(e for e in nd.info().endpoints["control"] if e.startswith("tcp"))
        pub.publish(b"", type="prime")
        print(f"EP {ctrl}", flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        payload = b"x" * size
        t0 = time.monotonic()
        if mode == "batch":
            chunk = [payload] * batch
            left = n
            while left:
                k = min(batch, left)
                pub.publish_many(chunk if k == batch else chunk[:k], type="m")
                left -= k
        else:
            publish = pub.publish
            for _ in range(n):
                publish(payload, type="m")
        print(f"PUBLISHED {time.monotonic() - t0:.3f}", flush=True)
        sys.stdin.read()


def child_sub(data_dir: str, mesh: str, peer: str, stream: str, n: int) -> None:
    """Subscriber: blocks on stdin at the first event after event 0, then takes 1..n."""
    from patterns.pubsub import Start, Subscriber
    with _node(data_dir, mesh, (peer,)) as nd, Subscriber(
            nd, stream, durable="mem", start=Start.beginning()) as sub:
        expected, bad, got, t_rel = 0, 0, 0, 0.0
        for ev in sub:
            if ev.seq != expected:
                bad += 1
                if bad <= 5:
                    print(f"ORDER expected {expected} got {ev.seq}", flush=True)
            expected = ev.seq + 1
            got += 1
            if ev.seq == 0:
                print("GOT0", flush=True)
            elif ev.seq == 1:
                print("STUCK", flush=True)
                sys.stdin.readline()  # the stuck handler
                t_rel = time.monotonic()
            if ev.seq == n:
                break
        st = sub.stats()
        print("DONE " + json.dumps({
            "got": got, "bad": bad, "catchup_s": round(time.monotonic() - t_rel, 3),
            "replayed": st.replayed, "gaps": st.gaps, "hwm_kib": _status_kib(os.getpid(), "VmHWM"),
        }), flush=True)


class _Child:
    """A child process of this script with its stdout lines read on a thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ln in self.lines:
                if ln.startswith(prefix):
                    return ln
            if self.p.poll() is not None and not any(x.startswith(prefix) for x in self.lines):
                time.sleep(0.05)  # let the reader thread finish
                for ln in self.lines:
                    if ln.startswith(prefix):
                        return ln
                raise RuntimeError(f"child exited ({self.p.returncode}) before {prefix!r}: "
                                   f"{self.lines[-5:]}")
            time.sleep(0.02)
        raise TimeoutError(f"no {prefix!r} within {timeout}s: {self.lines[-5:]}")

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text)
        self.p.stdin.flush()

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                assert self.p.stdin is not None
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


def run(n: int, mode: str, size: int = 100, batch: int = 1000,
        timeout: float = 120.0) -> dict[str, Any]:
    """One measurement; returns RSS figures (MiB), timings (s) and the delivery check."""
    root = tempfile.mkdtemp(prefix="zmmem")
    mesh = f"mem{os.getpid()}{time.monotonic_ns()}"
    stream = "mem.s"
    pub = _Child("pub", f"{root}/p", mesh, stream, mode, str(n), str(size), str(batch))
    sub: _Child | None = None
    try:
        ep = pub.line("EP ", 30).split()[1]
        sub = _Child("sub", f"{root}/s", mesh, ep, stream, str(n))
        sub.line("GOT0", 30)
        base_pub = _status_kib(pub.p.pid, "VmRSS")
        base_sub = _status_kib(sub.p.pid, "VmRSS")
        pub.send("go\n")
        sub.line("STUCK", 30)
        peak_pub = peak_sub = 0
        deadline = time.monotonic() + timeout
        published_at = None
        last_growth = time.monotonic()
        while time.monotonic() < deadline:
            rp = _status_kib(pub.p.pid, "VmRSS")
            rs = _status_kib(sub.p.pid, "VmRSS")
            if rs > peak_sub + 256:
                last_growth = time.monotonic()
            peak_pub, peak_sub = max(peak_pub, rp), max(peak_sub, rs)
            if published_at is None and any(x.startswith("PUBLISHED") for x in pub.lines):
                published_at = time.monotonic()
            # Done: all published, and the subscriber's queues stopped growing for 1 s.
            if published_at is not None and time.monotonic() - max(published_at,
                                                                   last_growth) > 1.0:
                break
            time.sleep(0.02)
        pub_s = float(pub.line("PUBLISHED", 1).split()[1])
        sub.send("\n")
        done = json.loads(sub.line("DONE ", timeout).split(" ", 1)[1])
        return {
            "n": n, "mode": mode, "size": size, "batch": batch if mode == "batch" else 1,
            "publish_s": pub_s, "base_pub_mib": base_pub / 1024, "base_sub_mib": base_sub / 1024,
            "pub_mib": peak_pub / 1024, "sub_mib": peak_sub / 1024,
            "pub_hwm_mib": _status_kib(pub.p.pid, "VmHWM") / 1024,
            "sub_hwm_mib": done["hwm_kib"] / 1024, "catchup_s": done["catchup_s"],
            "got": done["got"], "bad": done["bad"], "replayed": done["replayed"],
            "complete": done["got"] == n + 1 and done["bad"] == 0,
        }
    finally:
        if sub is not None:
            sub.stop()
        pub.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        role, *rest = sys.argv[2:]
        if role == "pub":
            d, mesh, stream, mode, n, size, batch = rest
            child_pub(d, mesh, stream, mode, int(n), int(size), int(batch))
        else:
            d, mesh, peer, stream, n = rest
            child_sub(d, mesh, peer, stream, int(n))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="events published while stuck")
    ap.add_argument("--mode", choices=("batch", "single", "both"), default="both")
    ap.add_argument("--size", type=int, default=100, help="bytes of data per event")
    ap.add_argument("--batch", type=int, default=1000, help="events per publish_many call")
    ap.add_argument("--json", action="store_true", help="one JSON object per mode")
    a = ap.parse_args()
    modes = ("batch", "single") if a.mode == "both" else (a.mode,)
    if not a.json:
        print(f"stuck subscriber, {a.n:,} events of {a.size} B, durable, tcp loopback")
        print("| publish | publish s | publisher RSS MiB (base / peak stuck / peak incl. "
              "catch-up) | subscriber RSS MiB (base / peak stuck / peak incl. catch-up) | "
              "catch-up s | replayed | complete |")
        print("|---|---:|---:|---:|---:|---:|---|")
    for mode in modes:
        r = run(a.n, mode, a.size, a.batch)
        if a.json:
            print(json.dumps(r), flush=True)
            continue
        how = f"publish_many({a.batch})" if mode == "batch" else "publish()"
        ok = "yes" if r["complete"] else f"NO (got {r['got']}, {r['bad']} out of order)"
        print(f"| {how} | {r['publish_s']:.1f} | {r['base_pub_mib']:.0f} / {r['pub_mib']:.0f} / "
              f"{r['pub_hwm_mib']:.0f} | "
              f"{r['base_sub_mib']:.0f} / {r['sub_mib']:.0f} / {r['sub_hwm_mib']:.0f} | "
              f"{r['catchup_s']:.1f} | {r['replayed']:,} | "
              f"{ok} |", flush=True)


if __name__ == "__main__":
    main()
