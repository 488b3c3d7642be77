"""Replicated durable pub/sub: zeromesh stores (k = 1, 2) vs raw pyzmq vs NATS JetStream R3.

    python bench/bench_store.py --quick          # 1 round, 20k events, 500 latency samples
    python bench/bench_store.py                  # 3 rounds, 100k events, 2000 samples
    python bench/bench_store.py --events 50000 --rounds 5 --systems zm1,js3

Every run of a system is a fresh set of processes and directories; the systems alternate
within a round (raw, zeromesh k=1, k=2, k=1 sync=write, JetStream R3), and the table gives the
median over the rounds. 100 B payloads throughout.

- **zeromesh k=1/2**: one publisher process (a ``Node`` and two durable ``Publisher``s) and k
  store processes (a ``Node`` and a ``Store`` each, its own data dir), on loopback, the stores
  dialling the publisher's node. Throughput: ``publish_many`` batches of ``--batch`` events on
  a ``Publisher(replicas=0)``, at most 3 batches in flight: before the 4th batch is published
  the publisher waits with ``wait_replicated(last seq of the oldest batch, replicas=k)``;
  events/s = N / (first publish .. ``wait_replicated`` of the last seq returned, i.e. the k-th
  store acked it: held and fsynced). Latency: ``publish()`` one at a time on a
  ``Publisher(replicas=k)``: p50/p99 of the time until it returns (publish-to-replicated).
- **zeromesh k=1, sync=write** (an extra row, not the default): the same with
  ``Store(sync="write")``, the opt-in that acks once the copy is written to the OS, before
  its fsync: what JetStream's PubAck means (see below).
- **raw pyzmq**: single-frame PUSH -> PULL of the same payload between two processes, the
  ceiling. Throughput: N frames, the receiver answers one frame on its own PUSH after the
  N-th; latency: one frame at a time, the receiver answers each (a round trip, no disk).
- **NATS JetStream R3**: three ``nats-server`` processes with JetStream (file storage under a
  temp dir) in one cluster on loopback, a stream with ``num_replicas=3`` (created by polling
  until the cluster accepts it and its leader and both followers are current; the client
  then connects to the leader's server, JetStream's best case). Throughput:
  ``publish_async`` in batches of ``--batch``, awaiting the PubAcks of a batch once 3 are
  in flight (as the peers' R1 bench does);
  latency: ``js.publish`` one at a time (the PubAck: a quorum of 2 of 3 holds it). The
  servers' default sync policy applies (they do not fsync a message before its PubAck;
  nats-server 2.9 has no option to; a zeromesh store fsyncs before it acks, and the header
  line gives this filesystem's fsync time). Skipped with a line when nats-server or nats-py
  is missing.

CPU s / 10k: user+system CPU of every process of the system (publisher and stores; client
and the three servers; sender and receiver) over the throughput phase, per 10,000 events.
The machine's load average is printed with the table: on a shared host the figures are
provisional.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZE = 100
PAYLOAD = b"\xa5" * SIZE
WINDOW = 3  # batches in flight (throughput), for zeromesh and JetStream alike
NATS_SERVER = os.environ.get("NATS_SERVER", "/usr/sbin/nats-server")
SETUP_S = 60.0  # how long a run may take to get its processes ready
STEP_S = 60.0  # how long one wait for an ack may take
SYSTEMS = {"raw": ("raw pyzmq PUSH/PULL", "-"), "zm1": ("zeromesh store", "k=1"),
           "zm2": ("zeromesh store", "k=2"),
           "zm1w": ("zeromesh store, sync=write (opt-in)", "k=1"),
           "js3": ("NATS JetStream", "R3")}

OWN = {"raw": "sender", "zm1": "publisher", "zm2": "publisher", "zm1w": "publisher",
       "js3": "nats-py client"}


# -- helpers -------------------------------------------------------------------------------

def cpu_of(pid: int | str) -> float:
    """User + system CPU seconds of a process (all its threads), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_all(pids: list[int]) -> tuple[float, float]:
    """(this process's CPU s, the sum of ``pids``' CPU s)."""
    return cpu_of("self"), sum(cpu_of(p) for p in pids)


def cpu_per_10k(c0: tuple[float, float], c1: tuple[float, float], n: int) -> dict[str, float]:
    own, other = (c1[0] - c0[0]) / n * 10_000, (c1[1] - c0[1]) / n * 10_000
    return {"cpu10k": own + other, "cpu10k_self": own}


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    s = sorted(samples_ns)
    n = len(s)
    return s[n // 2] / 1e3, s[min(n - 1, int(n * 0.99))] / 1e3


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``cond`` (checked every 20 ms) or raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Child:
    """``python bench_store.py --role ROLE --spec JSON``; stdout lines read by a thread."""

    def __init__(self, role: str, spec: dict[str, Any]) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--role", role, "--spec",
             json.dumps(spec)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def has(self, prefix: str) -> str | None:
        return next((x for x in self.lines if x.startswith(prefix)), None)

    def wait_line(self, prefix: str, timeout: float) -> str:
        poll(lambda: self.has(prefix) is not None or self.proc.poll() is not None, timeout,
             f"{prefix!r} from a child")
        line = self.has(prefix)
        if line is None:
            self._t.join(2)
            line = self.has(prefix)
            if line is None:
                raise RuntimeError(f"child exited {self.proc.returncode} before {prefix!r}")
        return line

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._t.join(5)


# -- zeromesh ------------------------------------------------------------------------------

def role_store(spec: dict[str, Any]) -> None:
    from mesh.node import Node
    from patterns.pubsub.store import Store
    with Node(data_dir=spec["dir"], name=f"store-{os.getpid()}", mesh=spec["mesh"],
              mdns=False, interface="127.0.0.1", static_peers=(spec["peer"],)) as nd, \
            Store(nd, topics=("bench.",), sync=spec.get("sync", "fsync")):
        emit(ready=nd.id)
        sys.stdin.read()  # serve until the run closes our stdin


def role_zm(spec: dict[str, Any]) -> None:
    from mesh.errors import ReplicationTimeout
    from mesh.node import Node
    from patterns.pubsub.publisher import Publisher

    k, n, lat_n, batch, root = spec["k"], spec["n"], spec["lat_n"], spec["batch"], spec["dir"]
    mesh = f"bench-store-{os.getpid()}"
    stores: list[Child] = []
    with Node(data_dir=os.path.join(root, "pub"), name="bench-pub", mesh=mesh, mdns=False,
              interface="127.0.0.1") as nd:
        peer = next(e for e in nd.info().endpoints["control"] if e.startswith("tcp://"))
        thr = Publisher(nd, "bench.thr", resume_from_stores=0, heartbeat_s=0.1)
        lat = Publisher(nd, "bench.lat", replicas=k, replica_timeout_s=STEP_S,
                        resume_from_stores=0, heartbeat_s=0.1)
        try:
            for i in range(k):
                stores.append(Child("store", {"dir": os.path.join(root, f"store{i}"),
                                              "mesh": mesh, "peer": peer,
                                              "sync": spec.get("sync", "fsync")}))
            for c in stores:
                c.wait_line("{", SETUP_S)
            # Warm-up: until all k stores follow both streams (an ack from each).
            deadline = time.monotonic() + SETUP_S
            while True:
                seqs = thr.publish_many([PAYLOAD] * 100)
                try:
                    thr.wait_replicated(seqs[-1], 1.0, replicas=k)
                    lat.publish(PAYLOAD)
                    break
                except ReplicationTimeout:
                    if time.monotonic() > deadline:
                        raise
            for _ in range(200):
                lat.publish(PAYLOAD)
            pids = [c.proc.pid for c in stores]

            inflight: deque[int] = deque()
            c0, t0 = cpu_all(pids), time.perf_counter()
            for i in range(0, n, batch):
                seqs = thr.publish_many([PAYLOAD] * min(batch, n - i))
                inflight.append(seqs[-1])
                if len(inflight) >= WINDOW:
                    thr.wait_replicated(inflight.popleft(), STEP_S, replicas=k)
            thr.wait_replicated(inflight[-1], STEP_S, replicas=k)
            t1, c1 = time.perf_counter(), cpu_all(pids)

            samples = []
            for _ in range(lat_n):
                t = time.perf_counter_ns()
                lat.publish(PAYLOAD)  # returns once k stores hold it (fsynced; zm1w: written)
                samples.append(time.perf_counter_ns() - t)
            p50, p99 = percentiles(samples)
            emit(eps=n / (t1 - t0), p50=p50, p99=p99, **cpu_per_10k(c0, c1, n))
        finally:
            for c in stores:
                c.stop()
            thr.close()
            lat.close()


# -- raw pyzmq -----------------------------------------------------------------------------

def role_rawsink(spec: dict[str, Any]) -> None:
    import zmq
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(spec["data"])
    push.connect(spec["ack"])
    emit(ready=1)
    n, lat_n = spec["n"], spec["lat_n"]
    for i in range(n):  # throughput: one answer after the last
        pull.recv()
        if i == 0 or i == n - 1:
            push.send(b"a")
    for _ in range(lat_n):  # latency: an answer to each
        push.send(pull.recv())
    ctx.destroy(linger=1000)


def role_raw(spec: dict[str, Any]) -> None:
    import zmq
    n, lat_n = spec["n"], spec["lat_n"]
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.setsockopt(zmq.SNDHWM, 0)
    push.bind("tcp://127.0.0.1:*")
    pull.bind("tcp://127.0.0.1:*")
    sink = Child("rawsink", {"data": push.getsockopt_string(zmq.LAST_ENDPOINT),
                             "ack": pull.getsockopt_string(zmq.LAST_ENDPOINT), "n": n + 1,
                             "lat_n": lat_n, "dir": spec["dir"]})  # dir: names the run
    try:
        sink.wait_line("{", SETUP_S)
        pull.setsockopt(zmq.RCVTIMEO, int(STEP_S * 1000))
        push.send(PAYLOAD)  # the first frame: both connections are up once it is answered
        pull.recv()
        c0, t0 = cpu_all([sink.proc.pid]), time.perf_counter()
        for _ in range(n):
            push.send(PAYLOAD)
        pull.recv()
        t1, c1 = time.perf_counter(), cpu_all([sink.proc.pid])
        samples = []
        for _ in range(lat_n):
            t = time.perf_counter_ns()
            push.send(PAYLOAD)
            pull.recv()
            samples.append(time.perf_counter_ns() - t)
        p50, p99 = percentiles(samples)
        emit(eps=n / (t1 - t0), p50=p50, p99=p99, **cpu_per_10k(c0, c1, n))
    finally:
        sink.stop()
        ctx.destroy(linger=0)


# -- NATS JetStream R3 ---------------------------------------------------------------------

def nats_missing() -> str | None:
    if not os.access(NATS_SERVER, os.X_OK):
        return f"{NATS_SERVER} not found"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed"
    return None


def start_nats_cluster(root: str) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """Three JetStream servers in one cluster on loopback; returns (processes, client urls)."""
    client = [free_port() for _ in range(3)]
    route = [free_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(3):
            d = os.path.join(root, f"n{i}")
            os.makedirs(d)
            routes = ", ".join(f'"nats-route://127.0.0.1:{route[j]}"' for j in range(3)
                               if j != i)
            conf = os.path.join(d, "server.conf")
            with open(conf, "w") as f:
                f.write(f'server_name: "n{i}"\nlisten: "127.0.0.1:{client[i]}"\n'
                        f'jetstream {{ store_dir: "{d}/js" }}\n'
                        f'cluster {{ name: "bench"\n listen: "127.0.0.1:{route[i]}"\n'
                        f' routes: [{routes}] }}\n')
            with open(os.path.join(d, "server.log"), "wb") as logf:
                procs.append(subprocess.Popen([NATS_SERVER, "-c", conf], stdout=logf,
                                              stderr=subprocess.STDOUT))
    except BaseException:
        stop_nats(procs)
        raise
    return procs, [f"nats://127.0.0.1:{p}" for p in client]


def stop_nats(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


async def _nats_connect(urls: list[str], deadline: float) -> Any:
    import nats
    while True:  # the servers start listening one by one
        try:
            return await nats.connect(servers=urls, connect_timeout=1,
                                      max_reconnect_attempts=2, allow_reconnect=True)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _nats_setup(urls: list[str], deadline: float) -> str:
    """Create the R3 stream once the cluster accepts it and wait until its leader and both
    followers are current; returns the leader's client url."""
    from nats.js.api import StorageType
    nc = await _nats_connect(urls, deadline)
    try:
        js = nc.jetstream()
        while True:  # accepted once the cluster (and its meta leader) formed
            try:
                info = await js.add_stream(name="BENCH", subjects=["bench.r3"],
                                           storage=StorageType.FILE, num_replicas=3)
                if info.config.num_replicas == 3:
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        while True:
            info = await js.stream_info("BENCH")
            cl = info.cluster
            if cl is not None and cl.leader and cl.replicas and len(cl.replicas) == 2 and \
                    all(r.current for r in cl.replicas):
                return urls[int(cl.leader[1:])]  # server_name "n<i>" listens on urls[i]
            if time.monotonic() > deadline:
                raise TimeoutError(f"JetStream R3 stream not current: {cl}")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def _nats_run(urls: list[str], pids: list[int], n: int, lat_n: int,
                    batch: int) -> dict[str, float]:
    deadline = time.monotonic() + SETUP_S
    leader = await _nats_setup(urls, deadline)
    # The client talks to the stream leader's server: JetStream's best case (no extra hop).
    nc = await _nats_connect([leader], deadline)
    try:
        js = nc.jetstream(publish_async_max_pending=(WINDOW + 1) * batch)
        for _ in range(200):  # warm-up
            await js.publish("bench.r3", PAYLOAD, timeout=STEP_S)

        inflight: deque[list[Any]] = deque()
        c0, t0 = cpu_all(pids), time.perf_counter()
        for i in range(0, n, batch):
            inflight.append([await js.publish_async("bench.r3", PAYLOAD)
                             for _ in range(min(batch, n - i))])
            if len(inflight) >= WINDOW:
                await asyncio.gather(*inflight.popleft())  # raises on a failed PubAck
        for futs in inflight:
            await asyncio.gather(*futs)
        t1, c1 = time.perf_counter(), cpu_all(pids)

        samples = []
        for _ in range(lat_n):
            t = time.perf_counter_ns()
            await js.publish("bench.r3", PAYLOAD, timeout=STEP_S)
            samples.append(time.perf_counter_ns() - t)
        p50, p99 = percentiles(samples)
        info = await js.stream_info("BENCH")
        want = 200 + n + lat_n
        if info.state.messages != want:
            raise RuntimeError(f"JetStream holds {info.state.messages} messages, not {want}")
        await js.delete_stream("BENCH")
        return {"eps": n / (t1 - t0), "p50": p50, "p99": p99, **cpu_per_10k(c0, c1, n)}
    finally:
        await nc.close()


def role_nats(spec: dict[str, Any]) -> None:
    procs, urls = start_nats_cluster(spec["dir"])
    try:
        emit(**asyncio.run(_nats_run(urls, [p.pid for p in procs], spec["n"], spec["lat_n"],
                                     spec["batch"])))
    finally:
        stop_nats(procs)


ROLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "store": role_store, "zm": role_zm, "raw": role_raw, "rawsink": role_rawsink,
    "nats": role_nats}


# -- orchestration -------------------------------------------------------------------------

def run_once(system: str, args: argparse.Namespace) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix=f"bench-store-{system}-", dir=args.dir)
    spec: dict[str, Any] = {"n": args.events, "lat_n": args.lat, "batch": args.batch,
                            "dir": root}
    role = {"raw": "raw", "js3": "nats"}.get(system, "zm")
    if role == "zm":
        spec["k"] = int(system[2])
        spec["sync"] = "write" if system.endswith("w") else "fsync"
    try:
        c = Child(role, spec)
        try:
            line = c.wait_line("{", SETUP_S + 3 * STEP_S + args.events / 1000 + args.lat / 50)
        finally:
            c.stop(timeout=60)
        result: dict[str, float] = json.loads(line)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fsync_probe(where: str | None, n: int = 500) -> tuple[float, float]:
    """p50/p99 µs of an fsync after a 150 B append, on the filesystem of the runs' dirs (what
    a zeromesh store waits for before each ack; nats-server 2.9 does not fsync per message)."""
    d = tempfile.mkdtemp(prefix="bench-store-fsync-", dir=where)
    try:
        fd = os.open(os.path.join(d, "f"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            samples = []
            for _ in range(n):
                os.write(fd, b"\x00" * 150)
                t = time.perf_counter_ns()
                os.fsync(fd)
                samples.append(time.perf_counter_ns() - t)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return percentiles(samples)


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 20k events, 500 latency samples")
    ap.add_argument("--events", type=int, help="events per throughput run (default 100k)")
    ap.add_argument("--lat", type=int, help="latency samples per run (default 2000)")
    ap.add_argument("--rounds", type=int, help="rounds of every system (default 3)")
    ap.add_argument("--batch", type=int, default=1000, help="events per batch (throughput)")
    ap.add_argument("--systems", default="raw,zm1,zm2,zm1w,js3",
                    help="comma-separated subset of raw,zm1,zm2,zm1w,js3")
    ap.add_argument("--dir", default=None, help="where the runs' data dirs go (default /tmp)")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        ROLES[args.role](json.loads(args.spec))
        return 0
    if args.events is None:
        args.events = 20_000 if args.quick else 100_000
    if args.lat is None:
        args.lat = 500 if args.quick else 2000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEMS)}")
    for name, v in (("--events", args.events), ("--lat", args.lat), ("--rounds", args.rounds),
                    ("--batch", args.batch)):
        if v < 1:
            ap.error(f"{name} must be >= 1")
    if "js3" in systems and (why := nats_missing()):
        print(f"# NATS JetStream R3 skipped: {why}")
        systems.remove("js3")

    load0 = os.getloadavg()
    print(f"# {args.events:,} events of {SIZE} B per throughput run, {args.lat:,} latency "
          f"samples, batches of {args.batch}, {args.rounds} round(s), {os.cpu_count()} CPUs, "
          f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    f50, f99 = fsync_probe(args.dir)
    print(f"# fsync of a 150 B append here: p50 {f50:,.0f} µs, p99 {f99:,.0f} µs "
          "(a store's ack waits for one; nats-server's PubAck does not)", flush=True)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    for r in range(args.rounds):
        for s in systems:
            res = run_once(s, args)
            results[s].append(res)
            print(f"#   round {r + 1} {s}: {res['eps']:,.0f} events/s, p50 {res['p50']:,.0f} "
                  f"µs, p99 {res['p99']:,.0f} µs, CPU s/10k {res['cpu10k']:.3f} of which "
                  f"{OWN[s]} {res['cpu10k_self']:.3f}", flush=True)
    med = {s: {key: statistics.median(x[key] for x in rs) for key in rs[0]}
           for s, rs in results.items()}
    load1 = os.getloadavg()
    print(f"# load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; medians of "
          f"{args.rounds} round(s) (provisional on a shared host)")
    raw = med.get("raw")
    print("| system | k / R | events/s | vs raw | p50 µs | p99 µs | CPU s / 10k |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in systems:
        m = med[s]
        name, kr = SYSTEMS[s]
        ratio = fmt(m["eps"] / raw["eps"], ".3f") if raw else "-"
        print(f"| {name} | {kr} | {m['eps']:,.0f} | {ratio} | {m['p50']:,.0f} | "
              f"{m['p99']:,.0f} | {m['cpu10k']:.3f} |")
    zm1, js3 = med.get("zm1"), med.get("js3")
    if zm1 and js3:
        x = zm1["eps"] / js3["eps"]
        print(f"# target throughput k=1 >= 3x JetStream R3: {x:.2f}x -> "
              f"{'met' if x >= 3 else 'NOT met'}")
        print(f"# target p50 k=1 < JetStream R3 p50: {zm1['p50']:,.0f} µs vs "
              f"{js3['p50']:,.0f} µs -> {'met' if zm1['p50'] < js3['p50'] else 'NOT met'}")
    zm1w = med.get("zm1w")
    if zm1w and js3:
        print(f"# opt-in sync=write (acked once written, as JetStream's PubAck), not the "
              f"target: p50 {zm1w['p50']:,.0f} µs vs JetStream R3 {js3['p50']:,.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
