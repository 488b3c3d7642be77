"""The brokers a zeromesh user would otherwise run, on loopback, with the pub/sub workload.

    python bench/peers.py [--quick]          # alone; run_all.py --peers calls run_peers()

Starts nats-server (JetStream, file store), mosquitto (persistence on, QoS 1 persistent
session) and redis-server (AOF, fsync every second) itself, on free 127.0.0.1 ports, with data
in a temp dir, and stops them (by their own PIDs) at the end. Needs the servers on PATH
(``apt-get install -y nats-server mosquitto redis-server``) and the clients in the venv
(``pip install -e ".[bench]"``): these are benchmark-only, never runtime, deps.

Workload, the same as bench_pubsub.py's: one producer (this process) and one consumer (a
spawned process). Throughput: N messages of 100 B or 1 KiB; rate = received / (last receive
at the consumer - first send), CLOCK_MONOTONIC (system-wide). Every message is acknowledged
the durable way of its system: JetStream PubAck to the producer, explicit ack from a durable
pull consumer; MQTT QoS 1 PUBACK both ways; Redis XADD reply and XACK in a consumer group.
Latency: 100 B messages at 2,000/s carrying their send time; the consumer records
now - sent (one way, as bench_pubsub.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

IDLE_S = 5.0
LAT_RATE = 2000.0
STAMP = 20  # bytes of zero-padded CLOCK_MONOTONIC ns at the start of a latency payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class Servers:
    """nats-server, mosquitto and redis-server on free loopback ports; a context manager."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zeromesh-peers-")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.versions: dict[str, str] = {}

    def _start(self, name: str, argv: list[str], port: int) -> None:
        log = open(os.path.join(self.dir, f"{name}.log"), "wb")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.ports[name] = port
        _wait_port(port, self.procs[name])

    def __enter__(self) -> Servers:
        d = self.dir
        for exe in ("nats-server", "mosquitto", "redis-server"):
            if shutil.which(exe) is None:
                raise RuntimeError(f"{exe} not on PATH (apt-get install -y nats-server "
                                   "mosquitto redis-server)")
        p = free_port()
        os.makedirs(f"{d}/nats", exist_ok=True)
        self._start("nats", ["nats-server", "-a", "127.0.0.1", "-p", str(p), "-js",
                             "-sd", f"{d}/nats"], p)
        p = free_port()
        os.makedirs(f"{d}/mosquitto", exist_ok=True)
        with open(f"{d}/mosquitto.conf", "w") as f:
            # user root: keep the persistence dir writable when the bench runs as root.
            f.write(f"listener {p} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                    f"persistence true\npersistence_location {d}/mosquitto/\n"
                    "max_inflight_messages 1000\nmax_queued_messages 1000000\n"
                    f"{'user root' if os.geteuid() == 0 else ''}\nlog_dest stderr\n")
        self._start("mqtt", ["mosquitto", "-c", f"{d}/mosquitto.conf"], p)
        p = free_port()
        os.makedirs(f"{d}/redis", exist_ok=True)
        self._start("redis", ["redis-server", "--port", str(p), "--bind", "127.0.0.1",
                              "--dir", f"{d}/redis", "--appendonly", "yes",
                              "--appendfsync", "everysec", "--save", ""], p)
        for name, argv in (("nats", ["nats-server", "--version"]),
                           ("redis", ["redis-server", "--version"])):
            self.versions[name] = subprocess.run(argv, capture_output=True, text=True,
                                                 timeout=10).stdout.strip()[:40]
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10)
        self.versions["mqtt"] = (out.stdout.splitlines() or [""])[0]
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _stamp(size: int) -> bytes:
    return str(time.monotonic_ns()).zfill(STAMP).encode() + b"x" * max(0, size - STAMP)


# --- consumers (spawned processes) --------------------------------------------------------------

def _consume_nats(port: int, tag: str, n: int, lat: bool, q: Any) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    async def run() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        cfg = ConsumerConfig(durable_name=f"c{tag}", ack_policy=AckPolicy.EXPLICIT,
                             max_ack_pending=20_000)
        sub = await js.pull_subscribe(f"b.{tag}", durable=f"c{tag}", stream=f"S{tag}",
                                      config=cfg)
        q.put(("ready", 0))
        got, t_last, lats = 0, 0.0, []
        while got < n:
            try:
                msgs = await sub.fetch(1 if lat else 1000, timeout=IDLE_S)
            except nats.errors.TimeoutError:
                break
            now = time.monotonic_ns()
            for m in msgs:
                if lat:
                    lats.append(now - int(m.data[:STAMP]))
                await m.ack()
            got += len(msgs)
            t_last = time.monotonic()
        await nc.flush()
        q.put(("done", (got, t_last, lats)))
        await nc.close()

    asyncio.run(run())


def _consume_mqtt(port: int, tag: str, n: int, lat: bool, q: Any) -> None:
    import paho.mqtt.client as mqtt
    st: dict[str, Any] = {"got": 0, "t_last": 0.0, "lats": [], "sub": False}

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        st["got"] += 1
        st["t_last"] = time.monotonic()
        if lat:
            st["lats"].append(time.monotonic_ns() - int(m.payload[:STAMP]))

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{tag}",
                    clean_session=False)
    c.max_inflight_messages_set(1000)
    c.on_message = on_message
    c.on_subscribe = lambda *a: st.__setitem__("sub", True)
    c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.connect("127.0.0.1", port)
    c.subscribe(f"b/{tag}", 1)
    deadline = time.monotonic() + 10
    while not st["sub"] and time.monotonic() < deadline:
        c.loop(0.05)
    q.put(("ready", 0))
    last, seen = time.monotonic(), 0
    while st["got"] < n and time.monotonic() - last < IDLE_S:
        c.loop(0.05)
        if st["got"] != seen:
            seen, last = st["got"], time.monotonic()
    for _ in range(10):  # let the last PUBACKs out
        c.loop(0.01)
    q.put(("done", (st["got"], st["t_last"], st["lats"])))
    c.disconnect()


def _consume_redis(port: int, tag: str, n: int, lat: bool, q: Any) -> None:
    import redis
    r = redis.Redis(host="127.0.0.1", port=port)
    key = f"b:{tag}"
    q.put(("ready", 0))
    got, t_last, lats = 0, 0.0, []
    while got < n:
        resp = r.xreadgroup("g", "c", {key: ">"}, count=1000, block=int(IDLE_S * 1000))
        if not resp:
            break
        now = time.monotonic_ns()
        entries = resp[0][1]
        if lat:
            lats.extend(now - int(f[b"d"][:STAMP]) for _, f in entries)
        r.xack(key, "g", *[mid for mid, _ in entries])
        got += len(entries)
        t_last = time.monotonic()
    q.put(("done", (got, t_last, lats)))


# --- producers (this process) -------------------------------------------------------------------

def _paced(n: int, lat: bool, size: int) -> Any:
    """Yield payloads: back-to-back for throughput, at LAT_RATE stamped for latency."""
    payload = b"x" * size
    t0 = time.monotonic()
    for i in range(n):
        if lat:
            target = t0 + i / LAT_RATE
            while time.monotonic() < target:
                pass
            yield _stamp(size)
        else:
            yield payload


def _produce_nats(port: int, tag: str, n: int, size: int, lat: bool, start: Any) -> float:
    import nats

    async def run() -> float:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream(publish_async_max_pending=4000)
        start()
        t0 = time.monotonic()
        if lat:
            for m in _paced(n, True, size):
                await js.publish(f"b.{tag}", m)
        else:
            window: list[Any] = []
            batch: list[Any] = []
            for m in _paced(n, False, size):
                batch.append(await js.publish_async(f"b.{tag}", m))
                if len(batch) == 1000:
                    window.append(batch)
                    batch = []
                    if len(window) > 2:
                        await asyncio.gather(*window.pop(0))
            for b in [*window, batch]:
                await asyncio.gather(*b)
        await nc.close()
        return t0

    return asyncio.run(run())


async def _nats_setup(port: int, tag: str) -> None:
    import nats
    from nats.js.api import StorageType
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    await nc.jetstream().add_stream(name=f"S{tag}", subjects=[f"b.{tag}"],
                                    storage=StorageType.FILE)
    await nc.close()


def _produce_mqtt(port: int, tag: str, n: int, size: int, lat: bool, start: Any) -> float:
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{tag}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn: list[bool] = []
    c.on_connect = lambda *a: conn.append(True)
    c.connect("127.0.0.1", port)
    while not conn:
        c.loop(0.05)
    start()
    topic, window, info = f"b/{tag}", [], None
    t0 = time.monotonic()
    for i, m in enumerate(_paced(n, lat, size)):
        info = c.publish(topic, m, 1)
        if lat or i % 100 == 0:
            c.loop(0)
        if i % 1000 == 0:  # bounded window: paho's 16-bit message ids must not wrap
            window.append(info)
            while len(window) > 10 and not window[0].is_published():
                c.loop(0.01)
            if len(window) > 10:
                window.pop(0)
    while info is not None and not info.is_published():
        c.loop(0.01)
    c.disconnect()
    return t0


def _produce_redis(port: int, tag: str, n: int, size: int, lat: bool, start: Any) -> float:
    import redis
    r = redis.Redis(host="127.0.0.1", port=port)
    key = f"b:{tag}"
    start()
    t0 = time.monotonic()
    if lat:
        for m in _paced(n, True, size):
            r.xadd(key, {b"d": m})
    else:
        p = r.pipeline(transaction=False)
        for i, m in enumerate(_paced(n, False, size), 1):
            p.xadd(key, {b"d": m})
            if i % 100 == 0:
                p.execute()
        p.execute()
    return t0


def one_case(kind: str, port: int, n: int, size: int, lat: bool) -> dict[str, Any]:
    """Run one producer/consumer case against a running server; got, rate, lats (ns)."""
    tag = f"{os.getpid()}x{time.monotonic_ns()}"
    if kind == "nats":
        asyncio.run(_nats_setup(port, tag))
    elif kind == "redis":
        import redis
        redis.Redis(host="127.0.0.1", port=port).xgroup_create(f"b:{tag}", "g", id="0",
                                                               mkstream=True)
    consumer = {"nats": _consume_nats, "mqtt": _consume_mqtt, "redis": _consume_redis}[kind]
    producer = {"nats": _produce_nats, "mqtt": _produce_mqtt, "redis": _produce_redis}[kind]
    spawn = mp.get_context("spawn")
    q: Any = spawn.Queue()
    proc = spawn.Process(target=consumer, args=(port, tag, n, lat, q))
    proc.start()
    try:
        kind_, _ = q.get(timeout=30)
        assert kind_ == "ready"
        t0 = producer(port, tag, n, size, lat, lambda: None)
        _, (got, t_last, lats) = q.get(timeout=120 + n / 1000)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return {"got": got, "rate": got / max(1e-9, t_last - t0), "lats": lats}


def _pct(lats: list[int], p: float) -> float | None:
    if not lats:
        return None
    s = sorted(lats)
    return s[min(len(s) - 1, int(len(s) * p))] / 1000.0


SYSTEMS = (("nats", "NATS JetStream (PubAck, durable pull + ack)"),
           ("mqtt", "mosquitto MQTT QoS 1 (persistent session)"),
           ("redis", "Redis Streams (XADD pipe 100, XREADGROUP + XACK)"))


def run_peers(n: int, lat_n: int, sizes: tuple[int, ...] = (100, 1024),
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Start the three servers, run every case, stop them; rows in run_all.py's format.

    Raises:
        RuntimeError: a server is missing or did not start.
    """
    rows: list[dict[str, Any]] = []
    with Servers() as srv:
        for kind, label in SYSTEMS:
            for size in sizes:
                if progress:
                    progress(f"peers {kind} {size} B")
                try:
                    r = one_case(kind, srv.ports[kind], n, size, False)
                    note = "" if r["got"] == n else f"got {r['got']}/{n}"
                    rate = r["rate"]
                except Exception as exc:  # one broker failing must not lose the others
                    note, rate = f"failed: {type(exc).__name__}: {exc}", 0.0
                p50 = p99 = None
                if size == 100:
                    try:
                        lr = one_case(kind, srv.ports[kind], lat_n, 100, True)
                        p50, p99 = _pct(lr["lats"], 0.5), _pct(lr["lats"], 0.99)
                    except Exception as exc:
                        note += f" latency failed: {type(exc).__name__}: {exc}"
                rows.append({"pattern": "broker", "system": label, "transport": "tcp",
                             "size": size, "security": "plain", "throughput": rate,
                             "unit": "msg/s", "ratio": None, "is_raw": False, "p50_us": p50,
                             "p99_us": p99, "p50_ratio": None,
                             "note": (note + f" {srv.versions.get(kind, '')}").strip()})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rows = run_peers(20_000 if a.quick else 50_000, 1000 if a.quick else 3000,
                     progress=lambda m: print(m, file=sys.stderr, flush=True))
    for r in rows:
        print(f"{r['system']:<52} {r['size']:>5} B {r['throughput']:>10,.0f} msg/s "
              f"p50 {r['p50_us'] or 0:>7,.0f} µs p99 {r['p99_us'] or 0:>8,.0f} µs {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
