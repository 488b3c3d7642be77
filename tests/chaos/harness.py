"""The chaos harness: starts the mesh (one process per role), drives the fault schedule,
samples every process's file descriptors and RSS, and drains the mesh for the checker.

Roles: ``hub`` (the seed every node dials, through its own proxy, never faulted), ``pub0``
``pub1`` (durable publishers), ``sub0`` ``sub1`` (durable subscribers of both streams),
``producer`` + ``worker0`` ``worker1`` + ``poolworker2`` (a work queue; ``poolworker2``
answers every task from a thread pool), ``resp0`` ``resp1`` + ``client`` (a service).

Network: where namespaces work (root, ``ip netns``), every role but the hub runs in its own
namespace on a port of a bridge in the root namespace (:class:`tests.netns.HostBridge`): the
hub and the proxies bind the bridge's address, each role its own, and the ``partition`` fault
takes a role's port down. Elsewhere every role binds 127.0.0.1 and ``partition`` is never
scheduled (the run says so in its notes).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from tests import netns as N
from tests.chaos import faults as F
from tests.tcp_proxy import Proxy
from tests.util import poll_until

REPO = str(Path(__file__).resolve().parents[2])
# poolworker2 takes the third worker's place (same position, same fault targets): a seed's
# schedule is unchanged, its faults on the third worker now hit the thread-pool worker.
ROLES = ["pub0", "pub1", "sub0", "sub1", "producer", "worker0", "worker1", "poolworker2",
         "resp0", "resp1", "client"]
#: Replica stores of the chaos streams. Not in ROLES, so every seed's schedule of the other
#: roles is what it was; they get their own seeded SIGKILLs (:func:`store_kills`) and dial
#: the hub directly (no proxy: the link faults are the other roles').
STORE_ROLES = ["store0"]


def store_kills(seed: int, duration: float, stores: list[str]) -> list[F.Fault]:
    """Two SIGKILLs (and restarts) of each store, at seeded times: a pure function."""
    rng = random.Random(seed ^ 0x570E)
    out: list[F.Fault] = []
    for role in stores:
        t = 2.0 + rng.random() * 2
        for _ in range(2):
            length = round(rng.uniform(0.3, 1.5), 2)
            if t + length > duration - 2.0:
                break
            out.append(F.Fault(round(t, 2), "kill", role, length))
            t += length + 1.0 + rng.random() * max(0.0, duration / 3)
    return out


@dataclass
class Sample:
    """One /proc sample of one process."""

    t: float
    role: str
    pid: int
    fds: int
    rss_kb: int


@dataclass
class RunResult:
    """What the harness observed (the checker reads the role files for the rest)."""

    run_dir: Path
    seed: int
    schedule: list[F.Fault]
    applied: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    drained: bool = False
    notes: list[str] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=dict)
    #: None when the roles ran in namespaces (partitions possible), else why not.
    netns_off: str | None = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a role file (a line cut by a kill mid-write cannot happen with
    one os.write per line, but a partial last line is skipped all the same)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(open fds, VmRSS in KiB) of ``pid``, or None when it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        return fds, rss
    except (OSError, StopIteration):
        return None


class Harness:
    """Runs one chaos run in ``run_dir``. Use :meth:`run`; always :meth:`close`."""

    def __init__(self, run_dir: Path, seed: int, duration: float, *,
                 kinds: list[str] | None = None, config: dict[str, Any] | None = None,
                 netns: bool | None = None) -> None:
        self.run_dir = run_dir
        self.seed = seed
        self.duration = duration
        self.rng = random.Random(seed ^ 0x5EED)
        self.cfg: dict[str, Any] = {
            "mesh": f"chaos-{os.getpid()}-{seed}", "peers": {}, "publish_rate": 200,
            "push_rate": 100, "request_rate": 50, "request_timeout": 5.0, "drain_s": 30.0,
            "subscribers": ["sub0", "sub1"],
        }
        self.cfg.update(config or {})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.proxies: dict[str, Proxy] = {}
        # Namespaces: probed once here (None: probe; False: do not use them even if they work).
        why = N.available() if netns is None else (None if netns else "disabled by the caller")
        self.net: N.HostBridge | None = None
        sched = F.schedule(seed, duration, ROLES, kinds, netns=why is None)
        sched = sorted(sched + store_kills(seed, duration, STORE_ROLES), key=lambda f: f.at)
        self.result = RunResult(run_dir, seed, sched, netns_off=why)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._flood: F.Flood | None = None
        (run_dir / "out").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)

    # -- processes ---------------------------------------------------------------------------

    def out(self, role: str) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "out" / f"{role}.jsonl")

    def start(self, role: str, fsize: int | None = None, clock_skew: int | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        env.pop("CHAOS_FSIZE", None)
        env.pop("CHAOS_CLOCK_SKEW_S", None)
        if fsize is not None:
            env["CHAOS_FSIZE"] = str(fsize)
        if clock_skew is not None:
            env["CHAOS_CLOCK_SKEW_S"] = str(clock_skew)
        argv = [sys.executable, "-m", "tests.chaos.roles", role, str(self.run_dir)]
        if self.net is not None and role in self.net.members:
            argv = self.net.exec_argv(role) + argv  # restarts land in the same namespace
        log = open(self.run_dir / "logs" / f"{role}.log", "ab")  # noqa: SIM115 - child owns it
        self.procs[role] = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT)
        log.close()

    def kill(self, role: str) -> None:
        p = self.procs.get(role)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGCONT)  # a frozen process dies too
            p.kill()
            p.wait(10)
            self.result.kills[role] = self.result.kills.get(role, 0) + 1

    def write_config(self) -> None:
        tmp = self.run_dir / "config.json.tmp"
        tmp.write_text(json.dumps(self.cfg))
        os.replace(tmp, self.run_dir / "config.json")

    def wait(self, cond: Any, timeout: float, what: str) -> bool:
        if poll_until(cond, timeout, 0.05, between=self.sample):
            return True
        self.result.notes.append(f"timed out after {timeout}s waiting for {what}")
        return False

    def sample(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_last_sample", 0.0) < 0.25:
            return
        self._last_sample = now
        for role, p in self.procs.items():
            if p.poll() is None:
                s = proc_sample(p.pid)
                if s is not None:
                    self.result.samples.append(Sample(now, role, p.pid, s[0], s[1]))

    # -- the run -----------------------------------------------------------------------------

    def setup(self) -> None:
        host = "127.0.0.1"
        if self.result.netns_off is None:
            N.sweep_stale()  # what a killed run of this suite left behind
            self.net = N.HostBridge(ROLES)
            host = self.net.host
            self.cfg["iface"] = {"hub": host, **{r: self.net.addr(r) for r in ROLES}}
            self.result.notes.append(
                f"roles in network namespaces on bridge {self.net.bridge} "
                f"({self.net.subnet}, hub {host}): partition faults on")
        else:
            self.result.notes.append(f"no network namespaces ({self.result.netns_off}): "
                                     "every role on 127.0.0.1, no partition faults")
        self.write_config()
        self.start("hub")
        self.wait(lambda: any(e["ev"] == "endpoints" for e in self.out("hub")), 15, "hub up")
        hub_ctrl = next(e for e in self.out("hub") if e["ev"] == "endpoints")["endpoints"]
        control = next(ep for ep in hub_ctrl["control"] if ep.startswith("tcp://"))
        for role in ROLES:
            self.proxies[role] = Proxy(control) if self.net is None else Proxy(control, host)
            self.cfg["peers"][role] = self.proxies[role].endpoint
        for role in STORE_ROLES:  # in the root namespace, on the hub's address
            self.cfg["peers"][role] = control
            self.cfg.setdefault("iface", {})[role] = host
        self.write_config()
        for role in [*ROLES, *STORE_ROLES]:
            self.start(role)
        self.wait(self.traffic_flows, 40, "traffic on every pattern")

    def traffic_flows(self) -> bool:
        def has(role: str, ev: str) -> bool:
            return any(e["ev"] == ev for e in self.out(role))
        return (has("sub0", "got") and has("sub1", "got") and has("client", "ok")
                and any(has(r, "exec") for r in ("worker0", "worker1", "poolworker2")))

    def endpoints(self) -> list[str]:
        eps: set[str] = set()
        for role in ["hub", *ROLES]:
            for e in self.out(role):
                if e["ev"] == "endpoints":
                    for v in e["endpoints"].values():
                        eps.update(x for x in v if x.startswith("tcp://"))
        return sorted(eps)

    def apply(self, f: F.Fault) -> None:
        """Start fault ``f``; returns after the fault has been undone (``f.duration`` s)."""
        self.result.applied.append(str(f))
        role = f.target
        if f.kind == "kill":
            self.kill(role)
            self.idle(f.duration)
            self.start(role)
        elif f.kind == "stop":
            p = self.procs[role]
            if p.poll() is None:
                p.send_signal(signal.SIGSTOP)
            self.idle(f.duration)
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        elif f.kind in ("stall", "cut"):
            ev = self.proxies[role].stalled if f.kind == "stall" else self.proxies[role].cut
            ev.set()
            self.idle(f.duration)
            ev.clear()
        elif f.kind == "partition":
            assert self.net is not None  # schedule() draws it only with namespaces
            before = len(self.out(role))
            self.net.link(role, up=False)
            try:
                self.idle(f.duration)
            finally:
                self.net.link(role, up=True)
            # What the role recorded while cut off: evidence the cut is real (a publisher
            # keeps acking to its local log; the others only finish what they already held).
            during = Counter(e["ev"] for e in self.out(role)[before:])
            self.result.notes.append(f"partition {role} {f.duration:.2f}s: recorded while cut "
                                     f"off {dict(during) or 'nothing'}")
        elif f.kind == "disk_full":
            self.kill(role)
            size = F.newest_segment_size(str(self.run_dir / "data" / role))
            self.start(role, fsize=size + 4096)
            self.idle(f.duration)
            self.kill(role)
            self.start(role)
        elif f.kind == "torn_tail":
            self.kill(role)
            touched = F.tear_tail(str(self.run_dir / "data" / role), self.rng)
            self.result.notes.append(f"torn tail on {len(touched)} segment(s) of {role}")
            self.start(role)
            self.idle(f.duration)
        elif f.kind == "lost_tail":
            self.kill(role)
            cuts = F.lose_tail(str(self.run_dir / "data" / role), self.rng)
            # In the role's own output, between its incarnations: the checker reads the
            # acknowledged publishes the cut took from there.
            fd = os.open(self.run_dir / "out" / f"{role}.jsonl",
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                for stream, off in cuts:
                    os.write(fd, (json.dumps({"ev": "lost_tail", "stream": stream,
                                              "from": off, "r": 0}) + "\n").encode())
            finally:
                os.close(fd)
            self.result.notes.append(f"lost tail of {role}: {cuts}")
            self.start(role)
            self.idle(f.duration)
        elif f.kind == "clock_jump":
            self.kill(role)
            self.start(role, clock_skew=F.CLOCK_JUMP_S)
            self.idle(f.duration)
            self.kill(role)
            self.start(role)
        elif f.kind in ("flood", "wrong_key"):
            flood = F.Flood(self.endpoints(), self.seed, self.ctx, curve=f.kind == "wrong_key")
            self.idle(f.duration)
            flood.close()
            self.result.notes.append(f"{f.kind} sent {flood.sent} messages")
        else:  # pragma: no cover - schedule() only yields the kinds above
            raise ValueError(f.kind)

    def idle(self, seconds: float) -> None:
        """Let the schedule's time pass (sampling fds/RSS meanwhile): the fault's length."""
        end = time.monotonic() + seconds
        self.wait(lambda: time.monotonic() >= end, seconds + 1.0, "the schedule")

    def run(self) -> RunResult:
        """Set up, run the schedule, drain and stop; the checker then reads the files."""
        t0 = time.monotonic()
        self.setup()
        t_start = time.monotonic()
        for f in self.result.schedule:
            self.idle(max(0.0, t_start + f.at - time.monotonic()))
            self.apply(f)
        self.idle(max(0.0, t_start + self.duration - time.monotonic()))
        # Anything that died on its own (a crash is a finding) is restarted for the drain.
        for role, p in self.procs.items():
            if p.poll() is not None:
                self.result.notes.append(f"{role} had exited on its own (rc {p.returncode})")
                self.start(role)
        (self.run_dir / "quiesce").touch()
        self.result.drained = self.wait(self.drained, self.cfg["drain_s"] + 10, "drain")
        (self.run_dir / "stop").touch()
        # Every role reports its final state while all are still up; only then may they close.
        self.wait(lambda: all(any(e["ev"] == "final" for e in self.out(r)) for r in self.procs),
                  15, "final reports")
        (self.run_dir / "close").touch()
        for role, p in self.procs.items():
            try:
                self.result.exit_codes[role] = p.wait(15)
            except subprocess.TimeoutExpired:
                self.result.exit_codes[role] = None
                p.kill()
                p.wait(5)
        self.result.notes.append(f"run took {time.monotonic() - t0:.1f}s")
        return self.result

    def drained(self) -> bool:
        from tests.chaos.invariants import pubsub_complete
        def said(role: str, ev: str) -> bool:
            return any(e["ev"] == ev for e in self.out(role))
        return (said("pub0", "drained") and said("pub1", "drained") and said("producer", "drained")
                and all(pubsub_complete(self.run_dir, s) for s in self.cfg["subscribers"])
                and all(self.store_caught_up(r) for r in STORE_ROLES))

    def store_caught_up(self, store: str) -> bool:
        """The store says durable, for each publisher's stream, the head it drained at."""
        last: dict[str, int] = {}
        for e in self.out(store):
            if e["ev"] == "durable":
                last[e["s"]] = e["q"]
        for pub in ("pub0", "pub1"):
            dr = [e for e in self.out(pub) if e["ev"] == "drained"]
            if not dr or last.get(f"chaos.{pub}") != dr[-1]["head"]:
                return False
        return True

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(10)
        for px in self.proxies.values():
            px.close()
        self.ctx.destroy(0)
        if self.net is not None:  # after the processes: nothing runs in the namespaces now
            self.net.close()
