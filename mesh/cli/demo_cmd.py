"""``mesh demo``: a small live mesh of separate processes on this host that survives ``kill -9``.

Two sensor nodes publish readings to durable streams; an aggregator node subscribes to both with
a durable subscription. The nodes find each other by mDNS on 127.0.0.1 (or, where multicast is
unavailable, through a static seed on loopback, and the demo says so). Mid-run the demo
SIGKILLs the aggregator, lets the sensors go on publishing while it is dead, restarts it, and
shows that it caught up from the publishers' logs with no event lost and none out of order.
Everything stays on this host, everything it starts is stopped at the end, and its data
directory is removed unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a live mesh of processes that survives kill -9")
    p.add_argument("--count", type=int, default=1000, help="readings per sensor (default 1000)")
    p.add_argument("--rate", type=float, default=100.0, help="readings per second per sensor")
    p.add_argument("--no-mdns", action="store_true", help="use a static loopback seed, not mDNS")
    p.add_argument("--keep", action="store_true", help="keep the data directory at the end")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=run)


class _Proc:
    """One role process and the latest state it reported."""

    def __init__(self, role: str, name: str, cfg: dict[str, Any], demo: _Demo) -> None:
        self.role, self.name, self.cfg, self.demo = role, name, cfg, demo
        self.last: dict[str, Any] = {}
        self.up = threading.Event()
        self.proc: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        self.up.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli.demo_roles", self.role, self.name,
             json.dumps(self.cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("event")
            if ev == "up":
                self.last["control"] = msg.get("control", [])
                self.up.set()
            elif ev == "peer":
                self.demo.say(f"{self.name}: peer {msg['peer']} {msg['kind']}")
            else:
                self.last.update(msg)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.reader is not None:
            self.reader.join(5)  # read what it printed before it died

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class _Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.quiet = args.json

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)


def _mdns_works() -> bool:
    try:
        from mesh.discovery import open_zeroconf

        zc = open_zeroconf(["127.0.0.1"])
        zc.close()
        return True
    except Exception:
        return False


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(args: argparse.Namespace) -> int:
    demo = _Demo(args)
    root = Path(tempfile.mkdtemp(prefix="zeromesh-demo-"))
    mdns = not args.no_mdns and _mdns_works()
    cfg: dict[str, Any] = {"root": str(root), "mesh": f"demo-{secrets.token_hex(4)}",
                           "mdns": mdns, "count": args.count, "rate": args.rate}
    procs: list[_Proc] = []
    try:
        demo.say(f"mesh {cfg['mesh']}, data in {root}")
        demo.say("discovery: mDNS on 127.0.0.1" if mdns else
                 "discovery: multicast unavailable (or --no-mdns): static seed on loopback")
        first = _Proc("sensor", "sensor-1", cfg, demo)
        procs.append(first)
        if not first.up.wait(15):
            raise RuntimeError("sensor-1 did not start")
        if not mdns:
            cfg = {**cfg, "seeds": first.last["control"][:1]}
        procs.append(_Proc("sensor", "sensor-2", cfg, demo))
        agg = _Proc("aggregator", "aggregator", cfg, demo)
        procs.append(agg)
        sensors = procs[:2]

        def published() -> dict[str, int]:
            return {p.last["stream"]: int(p.last["head"]) for p in sensors if "head" in p.last}

        def consumed() -> dict[str, int]:
            return {k: int(v) for k, v in agg.last.get("heads", {}).items()}

        def status() -> str:
            pub, con = published(), consumed()
            parts = [f"{s.rsplit('.', 1)[-1]} {con.get(s, 0)}/{n}" for s, n in sorted(pub.items())]
            return "consumed/published: " + ", ".join(parts)

        run_s = args.count / args.rate
        kill_at = demo.t0 + 0.35 * run_s + 1.0
        _wait(lambda: time.monotonic() > kill_at, run_s + 10)
        demo.say(status())
        agg.kill()
        before = consumed()
        demo.say(f"kill -9 aggregator (pid {agg.proc.pid if agg.proc else '?'}) "
                 "while the sensors keep publishing")
        agg.last = {}
        time.sleep(2.0)  # let the sensors publish while the aggregator is dead
        demo.say(status().replace("consumed/published", "while it is dead, published"))
        agg.start()
        demo.say("restart aggregator: it resumes from its committed cursor and replays the rest")

        def caught_up() -> bool:
            pub = published()
            done = all(p.last.get("done") for p in sensors)
            return done and bool(pub) and consumed() == pub

        last_print = 0.0
        deadline = time.monotonic() + run_s + 30
        while not caught_up() and time.monotonic() < deadline:
            if time.monotonic() - last_print > 1.0:
                last_print = time.monotonic()
                demo.say(status())
            time.sleep(0.05)
        ok = caught_up()
        pub, con = published(), consumed()
        firsts = agg.last.get("first", {})
        resumed_ok = all(firsts.get(s, 0) <= before.get(s, 0) for s in pub)
        holes = int(agg.last.get("holes", 0))
        report = {
            "ok": ok and holes == 0 and resumed_ok, "discovery": "mdns" if mdns else "static",
            "published": pub, "consumed": con, "holes": holes,
            "consumed_before_kill": before, "resumed_from": firsts,
            "duplicates_removed": agg.last.get("duplicates", 0),
            "replayed_after_restart": agg.last.get("replayed", 0),
        }
        if args.json:
            print(json.dumps(report))
        else:
            demo.say(status())
            print()
            print(f"{'stream':<24}{'published':>10}{'consumed':>10}{'before kill':>12}"
                  f"{'resumed at':>11}")
            for s in sorted(pub):
                print(f"{s:<24}{pub[s]:>10}{con.get(s, 0):>10}{before.get(s, 0):>12}"
                      f"{firsts.get(s, 0):>11}")
            print(f"\nreplayed from the sensors' logs after the restart: "
                  f"{report['replayed_after_restart']}; duplicates removed by id: "
                  f"{report['duplicates_removed']}; holes: {holes}")
            print("RESULT: nothing lost, nothing out of order" if report["ok"]
                  else "RESULT: FAILED: the counts above do not match")
        return 0 if report["ok"] else 1
    finally:
        demo.quiet = True
        for p in procs:
            p.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.json:
            print(f"data kept in {root}", file=sys.stderr)
