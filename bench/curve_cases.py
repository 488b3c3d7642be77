"""CURVE variants of the pub/sub and request/reply benchmarks, for bench/run_all.py.

bench_pubsub.py and bench_reqrep.py measure plaintext only. These functions run the same
workload (same process layout, same timing rule, same payloads) with CURVE switched on: raw
pyzmq with ``curve_server``/``curve_serverkey`` set on the sockets, and zeromesh nodes with a
``SecurityConfig`` (keypairs written to a temp dir, both public keys in the allowlist,
permissions ``*:*``), so the ratio of a CURVE row is against raw pyzmq CURVE measured in the
same run. Each returns a dict like its plaintext twin.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))  # sibling benchmarks (bench_reqrep)

IDLE_S = 3.0
ALL = {"*": ("*:*",)}


def make_keys(root: str, names: tuple[str, ...]) -> dict[str, str]:
    """Write a keypair per name under root/keys, public keys into root/allow; name -> public."""
    from mesh.security.keys import generate_keypair, write_keypair
    out = {}
    os.makedirs(f"{root}/allow", exist_ok=True)
    for n in names:
        kp = generate_keypair()
        write_keypair(f"{root}/keys", n, kp)
        shutil.copy(f"{root}/keys/{n}.key", f"{root}/allow/{n}.key")
        out[n] = kp.public
    return out


def sec_config(root: str, name: str, peer_keys: dict[str, str] | None = None) -> Any:
    from mesh.security import SecurityConfig
    from mesh.security.limits import RateLimit
    # The default per-peer ingress bucket (20k msg/s) would throttle a benchmark; lift it.
    return SecurityConfig(key_file=Path(root) / "keys" / f"{name}.key_secret",
                          allowlist_dir=Path(root) / "allow", permissions=ALL,
                          peer_keys=peer_keys or {},
                          rate_limit=RateLimit(rate=1e9, burst=1e9))


# --- pub/sub ------------------------------------------------------------------------------------

def _consumer_raw_curve(endpoint: str, server_pub: bytes, n: int, q: Any) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    pub, sec = zmq.curve_keypair()
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, server_pub
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.RCVTIMEO, int(IDLE_S * 1000))
    s.connect(endpoint)
    q.put(("ready", 0))
    got, t_last = 0, 0.0
    try:
        while got < n:
            frames = s.recv_multipart()
            if frames[0] == b"w":
                continue
            got += 1
        t_last = time.monotonic()
    except zmq.Again:
        t_last = time.monotonic() - IDLE_S
    q.put(("done", (got, t_last, [])))
    ctx.destroy(linger=0)


def _wait_ready(q: Any, warm: Any) -> None:
    kind, _ = q.get(timeout=30)
    assert kind == "ready"
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        warm()
        time.sleep(0.001)


def pubsub_raw_curve(transport: str, size: int, n: int) -> dict[str, Any]:
    """Raw XPUB (NODROP, CURVE server) -> SUB (CURVE client) in a spawned process."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.XPUB)
    pub, sec = zmq.curve_keypair()
    s.curve_server, s.curve_secretkey = True, sec
    s.setsockopt(zmq.XPUB_NODROP, 1)
    if transport == "tcp":
        ep = f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"
    else:
        ep = f"ipc://{tempfile.mktemp(prefix='zmbench')}"
        s.bind(ep)
    spawn = mp.get_context("spawn")
    q: Any = spawn.Queue()
    p = spawn.Process(target=_consumer_raw_curve, args=(ep, pub, n, q))
    p.start()
    _wait_ready(q, lambda: s.send_multipart([b"w", b""]))
    payload = b"x" * size
    t0 = time.monotonic()
    send = s.send_multipart
    for _ in range(n):
        send([b"m", payload])
    _, (got, t_last, _lats) = q.get(timeout=120)
    p.join(10)
    s.close(linger=0)
    ctx.term()
    return {"got": got, "rate": got / max(1e-9, t_last - t0), "lats": []}


def _consumer_mesh_curve(ctrl: str, prod_pub: str, root: str, mesh: str, stream: str, n: int,
                         q: Any, transports: tuple[str, ...]) -> None:
    from mesh.node import Node
    from patterns.pubsub import Start, Subscriber
    cfg = sec_config(root, "c", {ctrl: prod_pub})
    with Node(data_dir=f"{root}/c", name="consumer", mesh=mesh, mdns=False,
              interface="127.0.0.1", static_peers=(ctrl,), transports=transports,
              security=cfg) as nd, Subscriber(nd, stream, start=Start.new()) as sub:
        q.put(("ready", 0))
        got, t_last = 0, 0.0
        deadline = time.monotonic() + 60
        while got < n and time.monotonic() < deadline:
            batch = sub.recv_batch(timeout=IDLE_S)
            if not batch:
                break
            for ev in batch:
                if ev.type == "w":
                    continue
                got += 1
            t_last = time.monotonic()
        q.put(("done", (got, t_last, [])))


def pubsub_mesh_curve(transport: str, size: int, n: int, durable: bool,
                      batch: int) -> dict[str, Any]:
    """zeromesh Publisher -> Subscriber (spawned process), both nodes with CURVE."""
    from mesh.log import FsyncPolicy, LogConfig
    from mesh.node import Node
    from patterns.pubsub import Publisher
    root = tempfile.mkdtemp(prefix="zmbench-curve")
    keys = make_keys(root, ("p", "c"))
    mesh = f"benchc{os.getpid()}{time.monotonic_ns()}"
    stream = "bench.s"
    transports = (transport,) if transport == "tcp" else ("tcp", "ipc")
    try:
        with Node(data_dir=f"{root}/p", name="producer", mesh=mesh, mdns=False,
                  interface="127.0.0.1", transports=transports,
                  security=sec_config(root, "p")) as nd:
            cfg = LogConfig(fsync=FsyncPolicy.interval(10.0))
            with Publisher(nd, stream, durable=durable, log_config=cfg) as pub:
                ctrl = next(e for e in nd.info().endpoints["control"] if e.startswith("tcp"))
                spawn = mp.get_context("spawn")
                q: Any = spawn.Queue()
                p = spawn.Process(target=_consumer_mesh_curve, args=(
                    ctrl, keys["p"], root, mesh, stream, n, q, transports))
                p.start()
                _wait_ready(q, lambda: pub.publish(0, type="w"))
                payload = b"x" * size
                t0 = time.monotonic()
                if batch > 1:
                    chunk = [payload] * batch
                    for _ in range(n // batch):
                        pub.publish_many(chunk, type="m")
                else:
                    publish = pub.publish
                    for _ in range(n):
                        publish(payload, type="m")
                _, (got, t_last, _lats) = q.get(timeout=120)
                p.join(10)
                return {"got": got, "rate": got / max(1e-9, t_last - t0), "lats": []}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- request/reply ------------------------------------------------------------------------------

RAW_SERVER_CURVE = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER)
s.curve_server = True; s.curve_secretkey = sys.argv[2].encode()
s.bind(sys.argv[1]); print("READY", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""

MESH_SERVER_CURVE = """
import sys, threading, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/bench")
from curve_cases import sec_config
from mesh.node import Node
from patterns.reqrep import Service
node = Node(data_dir=sys.argv[2], mesh=sys.argv[3], interface="127.0.0.1", mdns=False,
            static_peers=(sys.argv[4],), transports=(sys.argv[7],),
            security=sec_config(sys.argv[5], "s", {sys.argv[4]: sys.argv[6]}))
while not node.peers.list():
    time.sleep(0.01)
Service(node, "echo", lambda r: r.payload, concurrency=4, inline=True)
print("READY", flush=True)
threading.Event().wait()
"""


def _child(code: str, *args: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().startswith(b"READY")
    return p


def reqrep_raw_curve(ep: str, n: int, inflight: int, payload: bytes) -> tuple[list[float], float]:
    """Raw DEALER -> ROUTER echo with CURVE: (round-trip seconds one at a time, req/s pipelined)."""
    spub, ssec = zmq.curve_keypair()
    p = _child(RAW_SERVER_CURVE, ep, ssec.decode())
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    cpub, csec = zmq.curve_keypair()
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = cpub, csec, spub
    s.connect(ep)
    try:
        import bench_reqrep  # sibling benchmark: the same client loop as the plain case
        return bench_reqrep.raw_client(s, payload, n, inflight)
    finally:
        s.close(0)
        ctx.term()
        p.kill()
        p.wait()


def reqrep_mesh_curve(transport: str, n: int, inflight: int,
                      payload: bytes) -> tuple[list[float], float]:
    """zeromesh Client/AsyncClient -> Service (inline handler) in a child, both with CURVE."""
    import bench_reqrep

    from mesh.node import Node
    tmp = tempfile.mkdtemp(prefix="rrbench-curve-")
    keys = make_keys(tmp, ("c", "s"))
    mesh = f"benchc-{os.getpid()}-{transport}-{time.monotonic_ns()}"
    node = Node(data_dir=f"{tmp}/c", mesh=mesh, interface="127.0.0.1", mdns=False,
                transports=(transport,), security=sec_config(tmp, "c"))
    ctl = node.info().endpoints["control"][0]
    p = _child(MESH_SERVER_CURVE, REPO, f"{tmp}/s", mesh, ctl, tmp, keys["c"], transport)
    try:
        deadline = time.monotonic() + 20
        while not node.who_offers("service", "echo"):
            if time.monotonic() > deadline:
                raise RuntimeError("secure echo service not seen")
            time.sleep(0.01)
        return bench_reqrep.measure_client(node, payload, n, inflight)
    finally:
        p.kill()
        p.wait()
        node.close()
        shutil.rmtree(tmp, ignore_errors=True)
