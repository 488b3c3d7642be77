"""CURVE vs plain: pub/sub and request/reply, zeromesh beside raw pyzmq, in the same run.

Four lines per pattern, same payload (100 B), tcp on 127.0.0.1, one process (the consumer or
the responder runs on a thread, so every line pays the same GIL cost):

* raw pyzmq plain / raw pyzmq CURVE: XPUB->SUB (2 frames: topic, payload) and DEALER->ROUTER
  echo (sequential round trips);
* zeromesh plain / zeromesh CURVE: a durable Publisher -> Subscriber, and Client -> Service,
  between two nodes (security=None vs SecurityConfig with an allowlist and permissions).

Throughput: events received / (last receive - first send). Latency: events sent one at a
time (each waits for the previous to arrive) for pub/sub; round trip per request for reqrep.
The figure that matters is the ratio CURVE / plain, compared between raw and zeromesh.

    python bench/bench_security.py --quick    # < 60 s
    python bench/bench_security.py            # bigger counts
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zmq

PAYLOAD = b"x" * 100


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e6


def _curve(sock: zmq.Socket[Any], server: bool, keys: dict[str, bytes]) -> None:
    if server:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = keys["sp"], keys["ss"]
    else:
        sock.curve_publickey, sock.curve_secretkey = keys["cp"], keys["cs"]
        sock.curve_serverkey = keys["sp"]


def raw_pubsub(n: int, n_lat: int, curve: bool) -> tuple[float, float, float]:
    ctx = zmq.Context()
    sp, ss = zmq.curve_keypair()
    cp, cs = zmq.curve_keypair()
    keys = {"sp": sp, "ss": ss, "cp": cp, "cs": cs}
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    if curve:
        _curve(pub, True, keys)
        _curve(sub, False, keys)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"t")
    sub.connect(f"tcp://127.0.0.1:{port}")
    pub.recv()  # the subscription arrived: no slow joiner
    done = threading.Event()
    t_last = [0.0]

    def consume() -> None:
        for _ in range(n):
            sub.recv_multipart()
        t_last[0] = time.perf_counter()
        done.set()

    th = threading.Thread(target=consume)
    th.start()
    t0 = time.perf_counter()
    for _ in range(n):
        pub.send_multipart([b"t", PAYLOAD])
    th.join()
    rate = n / (t_last[0] - t0)
    lats = []
    for _ in range(n_lat):
        t = time.perf_counter()
        pub.send_multipart([b"t", PAYLOAD])
        sub.recv_multipart()
        lats.append(time.perf_counter() - t)
    ctx.destroy(linger=0)
    return rate, _pct(lats, 0.5), _pct(lats, 0.99)


def raw_reqrep(n: int, curve: bool) -> tuple[float, float, float]:
    ctx = zmq.Context()
    sp, ss = zmq.curve_keypair()
    cp, cs = zmq.curve_keypair()
    keys = {"sp": sp, "ss": ss, "cp": cp, "cs": cs}
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    if curve:
        _curve(router, True, keys)
        _curve(dealer, False, keys)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                router.send_multipart(router.recv_multipart())

    th = threading.Thread(target=serve)
    th.start()
    lats = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        dealer.send(PAYLOAD)
        dealer.recv()
        lats.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    stop.set()
    th.join()
    ctx.destroy(linger=0)
    return n / total, _pct(lats, 0.5), _pct(lats, 0.99)


def _mesh_pair(tmp: Path, secure: bool) -> tuple[Any, Any]:
    from mesh.node import Node
    from mesh.security import SecurityConfig
    from mesh.security.keys import generate_keypair, write_keypair
    from tests.util import unique

    mesh = unique("bench")
    sec: dict[str, Any] = {"a": None, "b": None}
    if secure:
        (tmp / "allow").mkdir()
        pubs = {}
        for n in ("a", "b"):
            kp = generate_keypair()
            write_keypair(tmp / "keys", n, kp)
            pubs[n] = kp.public
            shutil.copy(tmp / "keys" / f"{n}.key", tmp / "allow" / f"{n}.key")
        sec["a"] = SecurityConfig(key_file=tmp / "keys" / "a.key_secret",
                                  allowlist_dir=tmp / "allow", permissions={"*": ("*:*",)})
    a = Node(data_dir=tmp / "a", name="a", mesh=mesh, mdns=False, transports=("tcp",),
             interface="127.0.0.1", security=sec["a"])
    ep = a.info().endpoints["control"][0]
    if secure:
        sec["b"] = SecurityConfig(key_file=tmp / "keys" / "b.key_secret",
                                  allowlist_dir=tmp / "allow", permissions={"*": ("*:*",)},
                                  peer_keys={ep: pubs["a"]})
    b = Node(data_dir=tmp / "b", name="b", mesh=mesh, mdns=False, transports=("tcp",),
             interface="127.0.0.1", security=sec["b"], static_peers=(ep,))
    deadline = time.monotonic() + 10
    while a.peers.get(b.id) is None or b.peers.get(a.id) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("nodes did not join")
        time.sleep(0.01)
    return a, b


def mesh_pubsub(n: int, n_lat: int, secure: bool) -> tuple[float, float, float]:
    from patterns.pubsub import Publisher, Start, Subscriber

    tmp = Path(tempfile.mkdtemp(prefix="bsec"))
    a, b = _mesh_pair(tmp, secure)
    try:
        with Publisher(a, "bench") as pub, Subscriber(b, "bench", start=Start.new()) as sub:
            deadline = time.monotonic() + 10
            while True:  # connected once one event got through
                pub.publish(b"warm")
                if sub.recv(timeout=0.05) is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("subscriber never connected")
            while sub.recv(timeout=0.2) is not None:
                pass
            got = [0]
            t_last = [0.0]

            def consume() -> None:
                while got[0] < n:
                    got[0] += len(sub.recv_batch(timeout=5))
                t_last[0] = time.perf_counter()

            th = threading.Thread(target=consume)
            t0 = time.perf_counter()
            th.start()
            for _ in range(n // 100):
                pub.publish_many([PAYLOAD] * 100)
            th.join()
            rate = n / (t_last[0] - t0)
            lats = []
            for _ in range(n_lat):
                t = time.perf_counter()
                pub.publish(PAYLOAD)
                while sub.recv(timeout=5) is None:
                    pass
                lats.append(time.perf_counter() - t)
        return rate, _pct(lats, 0.5), _pct(lats, 0.99)
    finally:
        b.close()
        a.close()
        shutil.rmtree(tmp, ignore_errors=True)


def mesh_reqrep(n: int, secure: bool) -> tuple[float, float, float]:
    from patterns.reqrep import Client, Service

    tmp = Path(tempfile.mkdtemp(prefix="bsec"))
    a, b = _mesh_pair(tmp, secure)
    try:
        with Service(a, "echo", lambda req: req.payload), Client(b) as client:
            deadline = time.monotonic() + 10
            while not b.who_offers("service", "echo"):
                if time.monotonic() > deadline:
                    raise RuntimeError("service not seen")
                time.sleep(0.01)
            for _ in range(50):
                client.request("echo", PAYLOAD, timeout=5)
            lats = []
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                client.request("echo", PAYLOAD, timeout=5)
                lats.append(time.perf_counter() - t)
            total = time.perf_counter() - t0
        return n / total, _pct(lats, 0.5), _pct(lats, 0.99)
    finally:
        b.close()
        a.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_ps, n_lat, n_rr = (50_000, 1000, 1000) if args.quick else (200_000, 5000, 5000)
    rows = []
    for name, fn in (
        ("pub/sub raw pyzmq", lambda c: raw_pubsub(n_ps, n_lat, c)),
        ("pub/sub zeromesh durable", lambda c: mesh_pubsub(n_ps, n_lat, c)),
        ("req/rep raw pyzmq", lambda c: raw_reqrep(n_rr, c)),
        ("req/rep zeromesh", lambda c: mesh_reqrep(n_rr, c)),
    ):
        plain = fn(False)
        curve = fn(True)
        rows.append((name, plain, curve))
    print(f"{'what':28} {'plain k/s':>10} {'CURVE k/s':>10} {'ratio':>6} "
          f"{'p50 us plain/CURVE':>20} {'p99 us plain/CURVE':>20}")
    for name, p, c in rows:
        print(f"{name:28} {p[0] / 1e3:10.1f} {c[0] / 1e3:10.1f} {c[0] / p[0]:6.2f} "
              f"{p[1]:9.0f}/{c[1]:<10.0f} {p[2]:9.0f}/{c[2]:<10.0f}")
    print(f"# n pubsub={n_ps} latency samples={n_lat} reqrep={n_rr}")


if __name__ == "__main__":
    main()
