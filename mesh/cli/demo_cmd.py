"""``mesh demo``: a small live mesh of separate processes on this host that survives ``kill -9``.

Five processes, each a node (see :mod:`mesh.cli.demo_roles`): two sensors publishing readings
to durable streams (sensor-1 also produces jobs on a work queue with one poison job; sensor-2
also calls a request/reply service ten times a second), an aggregator with a durable
subscription to every sensor stream, and two workers that work the queue and answer the
service. The nodes find each other by mDNS on 127.0.0.1 (or, where multicast is unavailable,
through a static seed on loopback, and the demo says so). Mid-run the demo SIGKILLs the
aggregator and a worker, restarts them, and shows that nothing was lost: readings published vs
consumed with no hole, the subscription lag back to zero, every job acked or (the poison one)
in the dead-letter queue with its error, and every service call answered (failover). Everything
stays on this host, everything it starts is stopped at the end, and its data directory is
removed unless ``--keep`` is given.
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

from mesh.errors import MeshTimeout


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a live mesh of processes that survives kill -9")
    p.add_argument("--count", type=int, default=1000, help="readings per sensor (default 1000)")
    p.add_argument("--rate", type=float, default=100.0, help="readings per second per sensor")
    p.add_argument("--no-mdns", action="store_true", help="use a static loopback seed, not mDNS")
    p.add_argument("--interface", default="127.0.0.1",
                   help="IPv4 address the demo's nodes bind and announce on (default "
                        "127.0.0.1: all demo traffic stays on this host)")
    p.add_argument("--keep", action="store_true", help="keep the data directory at the end")
    p.add_argument("--no-curve", action="store_true",
                   help="plaintext sockets (default: CURVE on every socket, keys allowlisted)")
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
                self.demo.peer_event(self.name, msg["peer"], msg["kind"])
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
        self.joined: dict[str, set[str]] = {}
        self.discovered = False

    def peer_event(self, who: str, peer: str, kind: str) -> None:
        """Say when every node has found every other one, then report joins and departures
        from sensor-1's point of view only (one line per change, not one per node)."""
        seen = self.joined.setdefault(who, set())
        (seen.add if kind == "joined" else seen.discard)(peer)
        if not self.discovered and len(self.joined) == 5 and all(
            len(v) == 4 for v in self.joined.values()
        ):
            self.discovered = True
            self.say("discovery: all 5 nodes see each other")
        elif self.discovered and who == "sensor-1":
            self.say(f"sensor-1 sees {peer} {'join' if kind == 'joined' else 'leave'}")

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)


def _mdns_problem(interface: str) -> str | None:
    """None when mDNS (multicast) works on ``interface``, else why not (one line)."""
    try:
        from mesh.discovery import open_zeroconf

        zc = open_zeroconf([interface])
        zc.close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:160]


#: What each role may do (deny by default once security is on): least privilege per role.
_RULES = {
    "sensor": ["publish:demo.readings.*", "push:demo.jobs", "call:demo.calibrate"],
    "aggregator": ["subscribe:demo.readings.*", "replay:demo.readings.*"],
    "worker": ["work:demo.jobs", "serve:demo.calibrate"],
}


def _make_keys(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    """A CURVE keypair per demo node (secrets 0600) and an allowlist holding their public keys."""
    from mesh.security.keys import load_public_key, write_keypair

    allow = root / "allow"
    allow.mkdir()
    out = {}
    for name in names:
        pub, _ = write_keypair(root / "keys", name)
        shutil.copy(pub, allow / pub.name)
        out[name] = load_public_key(pub)
    return out


def run(args: argparse.Namespace) -> int:
    demo = _Demo(args)
    root = Path(tempfile.mkdtemp(prefix="zeromesh-demo-"))
    mdns_problem = None if args.no_mdns else _mdns_problem(args.interface)
    mdns = not args.no_mdns and mdns_problem is None
    cfg: dict[str, Any] = {"root": str(root), "mesh": f"demo-{secrets.token_hex(4)}",
                           "mdns": mdns, "count": args.count, "rate": args.rate,
                           "interface": args.interface,
                           "jobs": "sensor-1", "calls": "sensor-2"}
    names = ("sensor-1", "sensor-2", "aggregator", "worker-1", "worker-2")
    keys: dict[str, str] = {}
    if not args.no_curve:
        keys = _make_keys(root, names)
        cfg["security"] = {"keys": str(root / "keys"), "allow": str(root / "allow"),
                           "permissions": {keys[n]: _RULES[n.rsplit("-", 1)[0]] for n in names}}
    procs: list[_Proc] = []
    try:
        demo.say(f"mesh {cfg['mesh']}, data in {root}")
        demo.say("security: CURVE on every socket; only the 5 demo keys are allowed, each "
                 "with the permissions of its role"
                 if keys else "security: off (--no-curve)")
        if mdns:
            demo.say(f"discovery: mDNS on {args.interface}")
        elif args.no_mdns:
            demo.say("discovery: mDNS disabled (--no-mdns): a static seed on loopback")
        else:
            demo.say(f"discovery: multicast unavailable on {args.interface} ({mdns_problem}): "
                     "a static seed on loopback instead")
        first = _Proc("sensor", "sensor-1", cfg, demo)
        procs.append(first)
        if not first.up.wait(15):
            raise RuntimeError("sensor-1 did not start")
        if not mdns:
            seed = first.last["control"][:1]
            cfg = {**cfg, "seeds": seed}
            if keys:  # CURVE needs the seed's server key before it has announced anything
                cfg["security"] = {**cfg["security"], "peer_keys": {seed[0]: keys["sensor-1"]}}
        sensor2 = _Proc("sensor", "sensor-2", cfg, demo)
        agg = _Proc("aggregator", "aggregator", cfg, demo)
        w1 = _Proc("worker", "worker-1", cfg, demo)
        w2 = _Proc("worker", "worker-2", cfg, demo)
        procs += [sensor2, agg, w1, w2]
        demo.say("started 5 processes: sensor-1 (readings + work queue demo.jobs), sensor-2 "
                 "(readings + calls to demo.calibrate), aggregator (durable subscriber), "
                 "worker-1 and worker-2 (workers + demo.calibrate responders)")
        sensors = [first, sensor2]

        def published() -> dict[str, int]:
            return {p.last["stream"]: int(p.last["head"]) for p in sensors if "head" in p.last}

        def consumed() -> dict[str, int]:
            return {k: int(v) for k, v in agg.last.get("heads", {}).items()}

        def status() -> str:
            pub, con = published(), consumed()
            # A sensor reports its head a moment after publishing: what the aggregator already
            # consumed was published too, so that is shown as published at least.
            parts = [f"{s.rsplit('.', 1)[-1]} {con.get(s, '-')}/{max(n, con.get(s, 0))}"
                     for s, n in sorted(pub.items())]
            jobs = first.last.get("jobs", {})
            calls = sensor2.last.get("calls", {})
            readings = ", ".join(parts) if parts else "waiting for the sensors' first report"
            return ("readings consumed/published: " + readings
                    + f" | jobs acked {jobs.get('acked', 0)}/{jobs.get('added', 0)}"
                    + f", dead-lettered {jobs.get('dead_lettered', 0)}"
                    + f" | calls ok {calls.get('ok', 0)}, failed {calls.get('failed', 0)}")

        def wait(cond: Any, timeout: float, what: str) -> None:
            # poll the reports, one status line a second, until ``cond`` or the deadline
            end = time.monotonic() + timeout
            next_line = 0.0
            while not cond():
                now = time.monotonic()
                if now >= end:
                    raise MeshTimeout(f"demo: no sign of {what} within {timeout:g} s")
                if now >= next_line:
                    next_line = now + 1.0
                    demo.say(status())
                time.sleep(0.05)

        run_s = args.count / args.rate
        # Kill once the aggregator has consumed part of every stream and worker-1 has handled
        # jobs, so "before kill" is never 0 (and never a fixed time that a slow start misses).
        part = max(1, min(args.count // 5, 50))
        wait(lambda: len(consumed()) == 2 and min(consumed().values()) >= part
             and first.last.get("jobs", {}).get("acked", 0) >= 1, run_s + 30,
             "the aggregator consuming and the workers working")
        agg.kill()
        w1.kill()
        before = consumed()
        demo.say("kill -9 aggregator and worker-1 while the sensors keep publishing, pushing "
                 "jobs and calling the service")
        agg.last = {}
        at_kill = published()
        # let the mesh run on while they are dead: until every sensor published more (or is
        # done), so the restarted aggregator has something to replay
        wait(lambda: all(published().get(s, 0) >= min(n + part, args.count)
                         for s, n in at_kill.items()), run_s + 30,
             "the sensors publishing on while the aggregator is dead")
        demo.say(status())
        agg.start()
        w1.start()
        demo.say("restart both: the aggregator resumes from its committed cursor and replays "
                 "what it missed; worker-1's unacked jobs were redelivered to worker-2")

        def caught_up() -> bool:
            pub = published()
            jobs = first.last.get("jobs", {})
            lag = first.last.get("lag", {}).get("aggregator", 1)
            return (all(p.last.get("done") for p in sensors) and bool(pub)
                    and consumed() == pub and jobs.get("unacked", 1) == 0
                    and lag == 0 and sensor2.last.get("lag", {}).get("aggregator", 1) == 0)

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
        jobs = first.last.get("jobs", {})
        dlq = first.last.get("dlq", [])
        calls = sensor2.last.get("calls", {})
        jobs_ok = (jobs.get("acked", 0) + jobs.get("dead_lettered", 0) == jobs.get("added", -1)
                   and jobs.get("dead_lettered") == 1 and len(dlq) == 1)
        report = {
            "ok": ok and holes == 0 and resumed_ok and jobs_ok and calls.get("failed", 1) == 0,
            "discovery": "mdns" if mdns else "static",
            "mdns_off_because": None if mdns else ("--no-mdns" if args.no_mdns else mdns_problem),
            "published": pub, "consumed": con, "holes": holes,
            "consumed_before_kill": before, "resumed_from": firsts,
            "duplicates_removed": agg.last.get("duplicates", 0),
            "replayed_after_restart": agg.last.get("replayed", 0),
            "lag": {p.last.get("stream"): p.last.get("lag", {}) for p in sensors},
            "jobs": jobs, "dlq": dlq, "calls": calls, "curve": bool(keys),
        }
        if args.json:
            print(json.dumps(report))
        else:
            demo.say(status())
            _print_report(report, before, firsts)
        return 0 if report["ok"] else 1
    finally:
        demo.quiet = True
        for p in procs:
            p.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.json:
            print(f"data kept in {root}", file=sys.stderr)


def _print_report(report: dict[str, Any], before: dict[str, int], firsts: dict[str, int]) -> None:
    pub, con = report["published"], report["consumed"]
    print(f"\n{'stream':<24}{'published':>10}{'consumed':>10}{'before kill':>12}"
          f"{'resumed at':>11}{'lag':>5}")
    for s in sorted(pub):
        lag = report["lag"].get(s, {}).get("aggregator", "?")
        print(f"{s:<24}{pub[s]:>10}{con.get(s, 0):>10}{before.get(s, 0):>12}"
              f"{firsts.get(s, 0):>11}{lag:>5}")
    print(f"replayed from the sensors' logs after the restart: "
          f"{report['replayed_after_restart']}; duplicates removed by id: "
          f"{report['duplicates_removed']}; holes: {report['holes']}")
    jobs = report["jobs"]
    print(f"\njobs: {jobs.get('added', 0)} pushed, {jobs.get('acked', 0)} acked, "
          f"{jobs.get('dead_lettered', 0)} dead-lettered, {jobs.get('unacked', 0)} owed, "
          f"{jobs.get('redelivered', 0)} redeliveries")
    for e in report["dlq"]:
        print(f"  DLQ: {e['payload']!r} after {e['deliveries']} deliveries: {e['error']}")
    calls = report["calls"]
    print(f"calls to demo.calibrate: {calls.get('ok', 0)} answered, {calls.get('failed', 0)} "
          "failed")
    for err in calls.get("errors", []):
        print(f"  failed: {err}")
    print("\nRESULT: nothing lost, nothing out of order, every call answered"
          if report["ok"] else "\nRESULT: FAILED: the figures above do not add up")
