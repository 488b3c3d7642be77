"""The child processes of the chaos mesh: one role per process.

Usage: ``python -m tests.chaos.roles ROLE RUN_DIR`` (the harness starts, kills and restarts
these). Settings come from ``RUN_DIR/config.json``; every role appends JSON lines of what it
*did* to ``RUN_DIR/out/ROLE.jsonl`` with one ``os.write`` per line (a SIGKILL never tears a
line) and only *after* the action is final (a publish that returned, a task executed...), so
the checker can compare the files after the run. Phases are files the harness creates:
``RUN_DIR/quiesce`` (stop producing traffic, drain) and ``RUN_DIR/stop`` (report and exit).

Every line holds ``"r"`` (the role's incarnation: its pid) so restarts are visible.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _jump_clock() -> None:
    # A wall clock that jumped (the clock_jump fault): patched before anything of the mesh is
    # imported, so module-level `from time import time_ns` bindings see it too.
    skew = os.environ.get("CHAOS_CLOCK_SKEW_S")
    if skew:
        real_ns, off = time.time_ns, int(skew) * 1_000_000_000
        time.time_ns = lambda: real_ns() + off
        time.time = lambda: (real_ns() + off) / 1e9


_jump_clock()

from mesh.errors import LogError, MeshError  # noqa: E402 - after the clock patch
from mesh.node import Node, PresenceConfig  # noqa: E402
from tests.util import poll_until  # noqa: E402

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.4, gone_s=1.0)
QUEUE = "chaos-q"
SERVICE = "chaos-svc"
STREAM_PREFIX = "chaos."


class Out:
    """Append-only JSON-lines writer (one write per line: atomic under SIGKILL)."""

    def __init__(self, run_dir: str, role: str) -> None:
        os.makedirs(os.path.join(run_dir, "out"), exist_ok=True)
        self.fd = os.open(os.path.join(run_dir, "out", f"{role}.jsonl"),
                          os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def __call__(self, **kw: Any) -> None:
        kw["r"] = self.pid
        os.write(self.fd, (json.dumps(kw, default=str) + "\n").encode())


def phase(run_dir: str, name: str) -> bool:
    return os.path.exists(os.path.join(run_dir, name))


def make_node(run_dir: str, role: str, cfg: dict[str, Any]) -> Node:
    peer = cfg["peers"].get(role)  # this role's proxy in front of the hub's control endpoint
    # In a namespace a role binds (and announces) its own address on the harness's bridge;
    # tcp only: an ipc socket is a file, it would cross a partition.
    iface = cfg.get("iface", {}).get(role, "127.0.0.1")
    return Node(data_dir=os.path.join(run_dir, "data", role), name=role, mesh=cfg["mesh"],
                interface=iface, transports=("tcp",), mdns=False, presence=PRESENCE,
                static_peers=(peer,) if peer else ())


def report_node(out: Out, nd: Node) -> None:
    out(ev="endpoints", endpoints={k: list(v) for k, v in nd.info().endpoints.items()})


#: A role idles until the harness says stop, for at most this long (the harness's own timeouts
#: end a run well before; the bound only keeps an orphaned role from living forever).
IDLE_MAX_S = 600.0


def final(out: Out, nd: Node, **extra: Any) -> None:
    """Report the final state, then stay up until every role has reported (``RUN_DIR/close``).

    Closing right after reporting let a role that polled ``stop`` later see its peers' BYEs
    and report "no live peer": a shutdown race of the harness, not of the node.
    """
    st = nd.stats()
    out(ev="final", peers_joined=st.get("peers_joined", 0), node=st, **extra)
    run_dir = os.path.dirname(os.path.dirname(str(nd.data_dir)))
    until(lambda: phase(run_dir, "close"), 20.0)


def until(cond: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """True when ``cond`` held within ``timeout`` (polled every ``interval``).

    The one way a role waits, for the harness (phase files), the mesh (peers, lag) or the next
    beat of its own traffic: always on a condition, always bounded, so a role outlives a dead
    harness by at most ``timeout``.
    """
    return bool(poll_until(cond, timeout, interval, cap=interval))


def pace(run_dir: str, seconds: float) -> None:
    """Wait ``seconds`` before the next batch of traffic (or a retry after a full disk), or
    less when the harness says to quiesce."""
    until(lambda: phase(run_dir, "quiesce"), seconds, 0.01)


def wait_peers(nd: Node, n: int, timeout: float = 10.0) -> None:
    until(lambda: len(nd.peers.list()) >= n, timeout, 0.01)


# -- roles -------------------------------------------------------------------------------------

def hub(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        until(lambda: phase(run_dir, "stop"), IDLE_MAX_S)
        final(out, nd)


def publisher(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    from patterns.pubsub import Publisher
    stream = STREAM_PREFIX + role
    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        with Publisher(nd, stream, heartbeat_s=0.1) as pub:
            out(ev="start", head=pub.head)
            i = 0
            tries = 0
            rate = cfg["publish_rate"]
            # Every incarnation publishes at least one batch, even one started after the
            # quiesce (bounded: a full disk may refuse it), so the clock check always has a
            # record of the last incarnation (real clock) to judge.
            while not phase(run_dir, "quiesce") or (i == 0 and tries < 20):
                tries += 1
                batch = [f"{out.pid}-{i + k}" for k in range(10)]
                try:
                    seqs = pub.publish_many(batch, type="chaos")
                except LogError as exc:  # disk full: nothing of the batch was acknowledged
                    out(ev="publish_failed", error=type(exc).__name__)
                    pace(run_dir, 0.1)  # back off while the disk is full
                    continue
                out(ev="ack", first=seqs.start, n=len(seqs), d0=batch[0])
                i += 10
                pace(run_dir, 10 / rate)
            # The timestamp of the newest record beside the clock as publishing stopped:
            # after a clock jump forward and back, records written since carry real time.
            log = pub._log
            last = log.read(log.next_offset - 1, 1)[0].timestamp_ns if pub.head else None
            now = time.time_ns()
            names = cfg["subscribers"]
            until(lambda: phase(run_dir, "stop")
                  or all(pub.stats().lag.get(n, 1) == 0 for n in names), cfg["drain_s"], 0.05)
            st = pub.stats()
            out(ev="drained", head=st.head, lag=st.lag, positions=st.positions, epoch=st.epoch)
            until(lambda: phase(run_dir, "stop"), IDLE_MAX_S)
            final(out, nd, head=pub.stats().head, lag=pub.stats().lag, last_ts_ns=last,
                  now_ns=now)


def subscriber(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    from patterns.pubsub import Start, StreamGap, Subscriber
    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        with Subscriber(nd, STREAM_PREFIX, durable=role, start=Start.beginning(),
                        commit_interval_s=0.2, on_gap="error") as sub:
            while not phase(run_dir, "stop"):
                try:
                    ev = sub.recv(timeout=0.1)
                except StreamGap as gap:
                    out(ev="gap", s=gap.stream, start=gap.start, end=gap.end,
                        reason=gap.reason, resume=getattr(gap, "resume_at", None))
                    continue
                if ev is not None:
                    out(ev="got", s=ev.stream, q=ev.seq, d=ev.data, id=ev.id)
            sub.commit()
            st = sub.stats()
            final(out, nd, lag=st.lag, stats=vars(st))


def store(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    """A replica store of every chaos stream (patterns/pubsub/store.py). Before it starts it
    reports what its disk holds ("reopened": the checker compares that with what earlier
    incarnations said was durable); then each time a stream's durable head moves, "durable"
    (written after the fsync the store acks, so a line is never ahead of the disk)."""
    from mesh.log import LogConfig, LogDirectory
    from patterns.pubsub.store import Store, _Replica
    root = os.path.join(run_dir, "data", role, "replicas")
    if os.path.isdir(root):
        for origin in sorted(os.listdir(root)):
            for stream in LogDirectory(os.path.join(root, origin)).streams():
                rep = _Replica(Path(root), origin, stream, LogConfig())
                out(ev="reopened", origin=origin, s=stream, head=rep.head, epochs=rep.epochs)
                rep.close()
    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        with Store(nd, topics=(STREAM_PREFIX,)) as st:
            seen: dict[tuple[str, str], tuple[int, int]] = {}
            while not phase(run_dir, "stop"):
                for (origin, stream), (epoch, q) in st.durable().items():
                    if seen.get((origin, stream)) != (epoch, q):
                        seen[(origin, stream)] = (epoch, q)
                        out(ev="durable", origin=origin, s=stream, epoch=epoch, q=q)
                until(lambda: phase(run_dir, "stop"), 0.1)
            final(out, nd, holdings=[[h.origin, h.stream, h.oldest, h.head, h.epoch]
                                     for h in st.holdings()], stats=vars(st.stats()))


def producer(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    from patterns.pipeline import DispatchConfig, WorkQueue
    dcfg = DispatchConfig(ack_wait=1.0, max_deliveries=3)
    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        with WorkQueue(nd, QUEUE, config=dcfg) as q:
            out(ev="start", recovered=q.recovered)
            i = 0
            rate = cfg["push_rate"]
            while not phase(run_dir, "quiesce"):
                # One task in 25 always fails: it must end in the DLQ with its history.
                # Unique across incarnations (the pid): after a lost tail, ids are reused.
                payloads = [(b"fail-" if (i + k) % 25 == 7 else b"ok-")
                            + f"{out.pid}-{i + k}".encode() for k in range(5)]
                try:
                    ids = q.push_many(payloads)
                except LogError as exc:
                    out(ev="push_failed", error=type(exc).__name__)
                    pace(run_dir, 0.1)  # back off while the disk is full
                    continue
                out(ev="pushed", first=ids.start, n=len(ids), ps=[p.decode() for p in payloads],
                    fail=[ids.start + k for k, p in enumerate(payloads) if p.startswith(b"fail")])
                i += 5
                pace(run_dir, 5 / rate)
            idle = True
            try:
                q.wait_idle(timeout=cfg["drain_s"])
            except MeshError:
                idle = False
            dead = [{"task": e.task_id, "deliveries": e.deliveries, "history": len(e.history),
                     "reason": e.reason, "p": e.payload.decode()} for e in q.dlq.list()]
            out(ev="drained", idle=idle, stats=q.stats(), dlq=dead)
            until(lambda: phase(run_dir, "stop"), IDLE_MAX_S)
            final(out, nd, stats=q.stats())


def worker(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    from patterns.pipeline import Worker
    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        with Worker(nd, QUEUE, credit=10) as w:
            while not phase(run_dir, "stop"):
                task = w.get(timeout=0.1)
                if task is None:
                    continue
                if task.payload.startswith(b"fail"):
                    task.nack(error=ValueError(f"task {task.id} always fails"))
                    continue
                # Recorded before the ack: a kill between the two redelivers (a second line),
                # never loses the record of an acknowledged task.
                out(ev="exec", id=task.id, p=task.payload.decode())
                task.ack()
            final(out, nd, stats=w.stats())


def pool_worker(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    """A worker whose handler hands each task to a ThreadPoolExecutor: every answer (ack,
    nack) is given on a pool thread, never on the thread that owns the worker's sockets."""
    import concurrent.futures

    from patterns.pipeline import Task, Worker

    def work(task: Task) -> None:
        if task.payload.startswith(b"fail"):
            task.nack(error=ValueError(f"task {task.id} always fails"))
            return
        out(ev="exec", id=task.id, p=task.payload.decode())  # before the ack, as in worker()
        task.ack()

    with make_node(run_dir, role, cfg) as nd, \
            concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="chaos-pool") as pool:
        report_node(out, nd)
        with Worker(nd, QUEUE, credit=10) as w:
            while not phase(run_dir, "stop"):
                task = w.get(timeout=0.1)
                if task is not None:
                    pool.submit(work, task)
            final(out, nd, stats=w.stats())


def responder(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    from patterns.reqrep import Incoming, Service

    def handler(req: Incoming) -> object:
        out(ev="exec", id=req.id)
        return req.payload

    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        wait_peers(nd, 1)  # offer once the hub is live (see tests/reqrep_child.py)
        svc = Service(nd, SERVICE, handler, concurrency=2)
        until(lambda: phase(run_dir, "stop"), IDLE_MAX_S)
        final(out, nd, stats=vars(svc.stats()))
        svc.close()


def client(run_dir: str, role: str, cfg: dict[str, Any], out: Out) -> None:
    from patterns.reqrep import Client
    with make_node(run_dir, role, cfg) as nd:
        report_node(out, nd)
        c = Client(nd, heartbeat_s=0.1, liveness=3)
        i = 0
        while not phase(run_dir, "quiesce"):
            rid = f"{out.pid}-{i}"
            i += 1
            try:
                rep = c.request(SERVICE, rid, timeout=cfg["request_timeout"], request_id=rid)
                out(ev="ok", id=rid, match=rep == rid)
            except MeshError as exc:
                out(ev="err", id=rid, error=type(exc).__name__)
            pace(run_dir, 1 / cfg["request_rate"])
        until(lambda: phase(run_dir, "stop"), IDLE_MAX_S)
        final(out, nd, stats=vars(c.stats()))
        c.close()


ROLES = {"hub": hub, "pub": publisher, "sub": subscriber, "store": store, "producer": producer,
         "worker": worker, "poolworker": pool_worker, "resp": responder, "client": client}


def kind_of(role: str) -> str:
    """``pub0`` -> ``pub``: the role kind is the name without its trailing digits."""
    return role.rstrip("0123456789")


def main() -> None:
    role, run_dir = sys.argv[1:3]
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    limit = os.environ.get("CHAOS_FSIZE")
    if limit:
        # Disk full: a write past the limit fails with EFBIG instead of killing us.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    out = Out(run_dir, role)
    out(ev="boot", fsize=int(limit) if limit else None)
    ROLES[kind_of(role)](run_dir, role, cfg, out)
    out(ev="exit")


if __name__ == "__main__":
    main()
