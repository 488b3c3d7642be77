"""Request/reply against its ceilings, in one run: 1 in flight and 64 in flight, default and
latency mode, with the CPU each request costs on both sides.

    python bench/bench_reqrep_pipelined.py            # about 90 s
    python bench/bench_reqrep_pipelined.py --quick    # about 30 s
    python bench/bench_reqrep_pipelined.py --peers    # also NATS request/reply, Zenoh get

Every responder runs in its own process (so its CPU time is its own, read from
/proc/PID/stat); the callers run here (process CPU time, ``time.process_time``). All payloads
are 100 B, tcp loopback.

One at a time: p50/p99 of round trips, measured *interleaved*: the caller runs a block of
:data:`BLOCK` round trips of each system in turn, round after round, so a burst of load from
elsewhere on the shared machine lands on every system instead of on one:

- ``raw``: pyzmq DEALER against a ROUTER echo (``send_multipart(recv_multipart())``);
- ``floor``: the same DEALER against a bare Python loop that decodes each ZRR1 request and
  encodes its reply with patterns.reqrep.frames and does nothing else: the floor of any
  Python implementation of the protocol;
- ``zeromesh``: :class:`~patterns.reqrep.Client` against a default
  :class:`~patterns.reqrep.Service` (4 worker threads; a request that finds it idle takes the
  fast path: it runs on the thread that received it);
- ``zeromesh pool``: the same with the fast path off (``inline_budget_s=0``): every request
  goes to a worker thread and its reply back (the default before the fast path);
- ``zeromesh inline``: the service with ``inline=True``;
- ``zeromesh latency mode``: ``inline=True, spin_us`` on the service and ``spin_us`` on the
  client (a bounded busy-poll before each blocking wait);
- with ``--peers``: NATS request/reply (nats-py, a Python responder, nats-server on loopback)
  and Zenoh ``get`` against a Python queryable (peer mode, loopback).

64 in flight: requests per second and per-request p50/p99 (send to reply) of raw pyzmq (one
DEALER keeping 64 requests outstanding), the floor (the same, with ZRR1 frames) and zeromesh
(one :class:`~patterns.reqrep.AsyncClient`, 64 tasks each sending its next request when its
reply came) against the default, inline and latency-mode services.

The machine is shared: each figure is printed with the load average when it was taken, and
every figure is provisional until repeated on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mesh.node import Node  # noqa: E402
from mesh.uuid7 import uuid7  # noqa: E402
from patterns.reqrep import AsyncClient, Client  # noqa: E402
from patterns.reqrep import frames as fr  # noqa: E402

PAYLOAD = b"x" * 100
BLOCK = 100
INFLIGHT = 64
SPIN_US = 200
ROUNDS = 5
_TICK = os.sysconf("SC_CLK_TCK")

RAW_SERVER = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("READY", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""

FLOOR_SERVER = """
import sys, zmq
sys.path.insert(0, sys.argv[1])
from patterns.reqrep import frames as fr
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[2]); print("READY", flush=True)
while True:
    msg = s.recv_multipart()
    m = fr.decode(msg[1:])
    s.send_multipart([msg[0], *fr.encode_reply(fr.Reply(m.id, fr.Status.OK, 1, m.format,
                                                          body=m.body))])
"""

# one process per service, so each one's CPU time is its own
MESH_SERVER = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from mesh.node import Node
from patterns.reqrep import Service
node = Node(data_dir=sys.argv[2], mesh=sys.argv[3], interface="127.0.0.1", mdns=False,
            static_peers=(sys.argv[4],))
while not node.peers.list():
    time.sleep(0.01)
mode, name = sys.argv[5], sys.argv[6]
cfg = {"default": {}, "pool": {"inline_budget_s": 0}, "inline": {"inline": True},
       "spin": {"inline": True, "spin_us": int(sys.argv[7])}}[mode]
Service(node, name, lambda r: r.payload, outcome_log=False, **cfg)
print("READY", flush=True)
threading.Event().wait()
"""

NATS_SERVER = """
import asyncio, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg):
        await msg.respond(msg.data)
    await nc.subscribe("echo", cb=echo)
    await nc.flush()
    print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

ZENOH_SERVER = """
import sys, threading, json
import zenoh
conf = zenoh.Config()
conf.insert_json5("mode", json.dumps("peer"))
conf.insert_json5("listen/endpoints", json.dumps([sys.argv[1]]))
conf.insert_json5("scouting/multicast/enabled", "false")
s = zenoh.open(conf)
def echo(q):
    q.reply(q.key_expr, q.payload.to_bytes() if q.payload is not None else b"")
qb = s.declare_queryable("bench/echo", echo)
print("READY", flush=True)
threading.Event().wait()
"""


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (seconds), in µs."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))] * 1e6


def child(code: str, *args: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith(b"READY"):
        p.kill()
        raise RuntimeError(f"child did not start: {line!r}")
    return p


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Case:
    """One system under test: how to make one round trip and whose CPU it costs."""

    def __init__(self, name: str, call: Callable[[], None], server_pid: int,
                 block: Callable[[int], list[float]] | None = None) -> None:
        self.name = name
        self.call = call
        self.server_pid = server_pid
        self.block = block  # runs n round trips itself, returns their latencies
        self.lat: list[float] = []
        self.cpu_client = 0.0
        self.cpu_server = 0.0
        self.load: list[float] = []

    def run_block(self, n: int) -> None:
        c0, s0 = time.process_time(), cpu_of(self.server_pid)
        if self.block is not None:
            self.lat.extend(self.block(n))
        else:
            perf, call, lat = time.perf_counter, self.call, self.lat
            for _ in range(n):
                t = perf()
                call()
                lat.append(perf() - t)
        self.cpu_client += time.process_time() - c0
        self.cpu_server += cpu_of(self.server_pid) - s0
        self.load.append(os.getloadavg()[0])


def raw_pipelined(sock: zmq.Socket[bytes], total: int, frames: Callable[[int], list[bytes]],
                  index: Callable[[list[bytes]], int]) -> tuple[float, list[float]]:
    """(requests/s, latencies) of ``total`` round trips on a DEALER with INFLIGHT outstanding;
    ``frames(i)`` builds request ``i``, ``index(reply)`` reads its number back."""
    perf = time.perf_counter
    sent = [0.0] * total
    lat = []
    t = perf()
    for i in range(INFLIGHT):
        sent[i] = perf()
        sock.send_multipart(frames(i))
    nxt = INFLIGHT
    for _ in range(total):
        rep = sock.recv_multipart()
        now = perf()
        lat.append(now - sent[index(rep)])
        if nxt < total:
            sent[nxt] = perf()
            sock.send_multipart(frames(nxt))
            nxt += 1
    return total / (perf() - t), lat


async def mesh_pipelined(node: Node, service: str, total: int) -> tuple[float, list[float]]:
    """(requests/s, latencies) of ``total`` echo requests from one AsyncClient, INFLIGHT
    tasks each sending its next request when its reply came."""
    ac = AsyncClient(node)
    left = total
    lat: list[float] = []
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = perf()
            await ac.request(service, PAYLOAD, timeout=30)
            lat.append(perf() - t)

    for _ in range(3):  # the responder is heard from (its rev): batching is on from the start
        await asyncio.gather(*(ac.request(service, PAYLOAD, timeout=10) for _ in range(8)))
    t = perf()
    await asyncio.gather(*(worker() for _ in range(INFLIGHT)))
    rate = total / (perf() - t)
    st = ac.stats()
    ac.close()
    old = pipelined_stats.get(service, (0, 0))
    pipelined_stats[service] = (old[0] + st.batches_sent, old[1] + st.batches_received)
    return rate, lat


pipelined_stats: dict[str, tuple[int, int]] = {}


def _nats(tmp: str) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Any, Any, str]:
    import nats  # benchmark-only dependency

    port = int(tcp_endpoint().rsplit(":", 1)[1])
    srv = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    url = f"nats://127.0.0.1:{port}"
    resp = child(NATS_SERVER, url)
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(url))
    return srv, resp, loop, nc, url


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peers", action="store_true", help="also NATS request/reply, Zenoh get")
    ap.add_argument("-n", type=int, default=0, help="one-at-a-time round trips per system")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help=f"runs of each system with {INFLIGHT} in flight (default {ROUNDS})")
    ap.add_argument("--pipelined-only", action="store_true",
                    help="one-at-a-time figures of raw and floor only (a short run)")
    args = ap.parse_args()
    n = args.n or (2000 if args.quick else 10000)
    rounds = max(1, args.rounds)
    total = n * 2 * rounds // ROUNDS  # pipelined requests per system
    tmp = tempfile.mkdtemp(prefix="rrpipe-")
    procs: list[subprocess.Popen[bytes]] = []
    ctx = zmq.Context()
    node = None
    extra: list[Any] = []
    try:
        raw_ep, floor_ep = tcp_endpoint(), tcp_endpoint()
        raw_srv = child(RAW_SERVER, raw_ep)
        floor_srv = child(FLOOR_SERVER, REPO, floor_ep)
        procs += [raw_srv, floor_srv]
        mesh = f"rrpipe-{os.getpid()}"
        node = Node(data_dir=f"{tmp}/c", mesh=mesh, interface="127.0.0.1", mdns=False,
                    transports=("tcp",))
        ctl = node.info().endpoints["control"][0]
        mesh_srv = {}
        for mode in ("default", "pool", "inline", "spin"):
            mesh_srv[mode] = child(MESH_SERVER, REPO, f"{tmp}/s-{mode}", mesh, ctl, mode,
                                   f"echo-{mode}", str(SPIN_US))
            procs.append(mesh_srv[mode])
        deadline = time.monotonic() + 20
        while not all(node.who_offers("service", f"echo-{m}") for m in mesh_srv):
            if time.monotonic() > deadline:
                raise RuntimeError("services not seen")
            time.sleep(0.01)
        raw = ctx.socket(zmq.DEALER)
        raw.connect(raw_ep)
        floor = ctx.socket(zmq.DEALER)
        floor.connect(floor_ep)
        client = Client(node)
        spinner = Client(node, spin_us=SPIN_US)
        extra += [raw, floor, client, spinner]

        def raw_call() -> None:
            raw.send(PAYLOAD)
            raw.recv()

        def floor_call() -> None:
            floor.send_multipart(fr.encode_request(fr.Request(
                uuid7(), "echo", 5000, 0, fr.Format.BYTES, {}, PAYLOAD)))
            fr.decode(floor.recv_multipart())

        cases = [
            Case("raw pyzmq DEALER/ROUTER", raw_call, raw_srv.pid),
            Case("Python floor (ZRR decode/encode echo)", floor_call, floor_srv.pid),
            Case("zeromesh (default service)",
                 lambda: client.request("echo-default", PAYLOAD, timeout=5),
                 mesh_srv["default"].pid),
            Case("zeromesh (pool service: fast path off)",
                 lambda: client.request("echo-pool", PAYLOAD, timeout=5),
                 mesh_srv["pool"].pid),
            Case("zeromesh (inline service)",
                 lambda: client.request("echo-inline", PAYLOAD, timeout=5),
                 mesh_srv["inline"].pid),
            Case(f"zeromesh latency mode (inline, spin_us={SPIN_US} both sides)",
                 lambda: spinner.request("echo-spin", PAYLOAD, timeout=5),
                 mesh_srv["spin"].pid),
        ]
        if args.peers:
            cases += peer_cases(tmp, procs, extra)
        if args.pipelined_only:
            cases = cases[:2]
        for c in cases:  # warm-up
            c.run_block(200)
            c.lat.clear()
            c.cpu_client = c.cpu_server = 0.0
            c.load.clear()
        for _ in range(max(1, n // BLOCK)):
            for c in cases:
                c.run_block(BLOCK)
        client.close()
        spinner.close()

        # 64 in flight: each system alone on the machine's two cores for one run of
        # total / ROUNDS requests, the systems in turn, ROUNDS times (the median rate is shown)
        each = max(INFLIGHT * 4, total // rounds)
        ids = [f"p-{i}" for i in range(each)]
        systems: list[tuple[str, int, Callable[[], tuple[float, list[float]]]]] = [
            ("raw pyzmq DEALER/ROUTER", raw_srv.pid, lambda: raw_pipelined(
                raw, each, lambda i: [i.to_bytes(4, "big") + PAYLOAD[4:]],
                lambda rep: int.from_bytes(rep[0][:4], "big"))),
            ("Python floor (ZRR decode/encode echo)", floor_srv.pid, lambda: raw_pipelined(
                floor, each, lambda i: fr.encode_request(fr.Request(
                    ids[i], "echo", 5000, 0, fr.Format.BYTES, {}, PAYLOAD)),
                lambda rep: int(fr.decode(rep).id[2:]))),  # type: ignore[union-attr]
        ]
        for mode, label in (("default", "zeromesh (default service)"),
                            ("pool", "zeromesh (pool service: fast path off)"),
                            ("inline", "zeromesh (inline service)"),
                            ("spin", f"zeromesh (service latency mode, spin_us={SPIN_US})")):
            systems.append((f"{label}, AsyncClient", mesh_srv[mode].pid,
                            lambda m=mode: asyncio.run(mesh_pipelined(node, f"echo-{m}",
                                                                      each))))
        acc: dict[str, dict[str, Any]] = {
            name: {"rates": [], "lat": [], "cc": 0.0, "sc": 0.0, "load": []}
            for name, _, _ in systems}
        for _ in range(rounds):
            for name, pid, fn in systems:
                c0, s0 = time.process_time(), cpu_of(pid)
                rate, lat = fn()
                a = acc[name]
                a["cc"] += time.process_time() - c0
                a["sc"] += cpu_of(pid) - s0
                a["rates"].append(rate)
                a["lat"].extend(lat)
                a["load"].append(os.getloadavg()[0])
        pipe: list[dict[str, Any]] = []
        for name, a in acc.items():
            k = len(a["lat"])
            pipe.append({"system": name, "rate": sorted(a["rates"])[len(a["rates"]) // 2],
                         "rates": a["rates"], "p50_us": pct(a["lat"], 0.5),
                         "p99_us": pct(a["lat"], 0.99), "cpu_client_us": a["cc"] / k * 1e6,
                         "cpu_server_us": a["sc"] / k * 1e6,
                         "load": (min(a["load"]), max(a["load"]))})
        report(cases, pipe, n, each * rounds, rounds, args.json)
    finally:
        for x in extra:  # sockets, clients, the zenoh session (sync close)
            try:
                x.close()
            except Exception:
                pass
        ctx.destroy(0)
        if node is not None:
            node.close()
        for p in reversed(procs):  # responders before the servers they use
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def peer_cases(tmp: str, procs: list[subprocess.Popen[bytes]], extra: list[Any]) -> list[Case]:
    """NATS request/reply and Zenoh get, each against a Python responder in its own process."""
    out: list[Case] = []
    srv, resp, loop, nc, _url = _nats(tmp)
    procs += [srv, resp]

    class _NatsCloser:  # closed before nats-server is killed (no EOF noise at the end)
        def close(self) -> None:
            loop.run_until_complete(nc.close())
            loop.close()

    extra.append(_NatsCloser())

    def nats_block(k: int) -> list[float]:
        async def go() -> list[float]:
            lat = []
            perf = time.perf_counter
            for _ in range(k):
                t = perf()
                await nc.request("echo", PAYLOAD, timeout=5)
                lat.append(perf() - t)
            return lat
        res: list[float] = loop.run_until_complete(go())
        return res

    out.append(Case("NATS request/reply (nats-py, Python responder)", lambda: None, resp.pid,
                    block=nats_block))
    try:
        import zenoh  # benchmark-only dependency

        ep = "tcp/127.0.0.1:" + tcp_endpoint().rsplit(":", 1)[1]
        zq = child(ZENOH_SERVER, ep)
        procs.append(zq)
        conf = zenoh.Config()
        conf.insert_json5("mode", json.dumps("peer"))
        conf.insert_json5("connect/endpoints", json.dumps([ep]))
        conf.insert_json5("scouting/multicast/enabled", "false")
        zs = zenoh.open(conf)
        extra.append(zs)
        deadline = time.monotonic() + 10

        def zget() -> None:
            for r in zs.get("bench/echo", payload=PAYLOAD):
                r.ok.payload.to_bytes()

        while True:  # until the queryable is reachable
            got = list(zs.get("bench/echo", payload=PAYLOAD))
            if got and got[0].ok is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("zenoh queryable not reached")
        out.append(Case("Zenoh get (Python queryable, peer mode)", zget, zq.pid))
    except Exception as exc:  # zenoh missing or a different API: the run goes on without it
        print(f"zenoh skipped: {exc}", file=sys.stderr)
    return out


def report(cases: list[Case], pipe: list[dict[str, Any]], n: int, total: int, rounds: int,
           path: str | None) -> None:
    raw, floor = cases[0], cases[1]
    r50, r99, f50 = pct(raw.lat, 0.5), pct(raw.lat, 0.99), pct(floor.lat, 0.5)
    print(f"\nOne at a time: {n} round trips of 100 B per system over tcp loopback, "
          f"interleaved in blocks of {BLOCK}; CPU µs per request, client / responder")
    print("\n| system | p50 µs | p99 µs | p50 / floor | p50 / raw | p99 / raw | "
          "CPU client | CPU responder | load avg (min-max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for c in cases:
        p50, p99 = pct(c.lat, 0.5), pct(c.lat, 0.99)
        k = len(c.lat)
        row = {"system": c.name, "p50_us": p50, "p99_us": p99, "p50_floor": p50 / f50,
               "p50_raw": p50 / r50, "p99_raw": p99 / r99,
               "cpu_client_us": c.cpu_client / k * 1e6, "cpu_server_us": c.cpu_server / k * 1e6,
               "load": (min(c.load), max(c.load))}
        rows.append(row)
        print(f"| {c.name} | {p50:.0f} | {p99:.0f} | {p50 / f50:.2f} | {p50 / r50:.2f} | "
              f"{p99 / r99:.2f} | {row['cpu_client_us']:.0f} | {row['cpu_server_us']:.0f} | "
              f"{min(c.load):.2f}-{max(c.load):.2f} |")
    rr = pipe[0]["rate"]
    print(f"\n{INFLIGHT} in flight: {total} requests per system in {rounds} runs, the systems "
          "in turn; req/s is the median run (min-max beside it), CPU µs per request")
    print("\n| system | req/s (min-max) | / raw | p50 µs | p99 µs | CPU client | "
          "CPU responder | load avg (min-max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for p in pipe:
        lo, hi = min(p["rates"]), max(p["rates"])
        print(f"| {p['system']} | {p['rate']:,.0f} ({lo:,.0f}-{hi:,.0f}) | "
              f"{p['rate'] / rr:.2f} | {p['p50_us']:.0f} | {p['p99_us']:.0f} | "
              f"{p['cpu_client_us']:.0f} | {p['cpu_server_us']:.0f} | "
              f"{p['load'][0]:.2f}-{p['load'][1]:.2f} |")
    if pipelined_stats:
        print("\nAsyncClient batches sent / received per service: " + ", ".join(
            f"{k} {s}/{r}" for k, (s, r) in pipelined_stats.items()))
    if path:
        with open(path, "w") as f:
            json.dump({"one_at_a_time": rows, "pipelined": pipe, "n": n, "total": total}, f,
                      indent=1)


if __name__ == "__main__":
    sys.exit(main())
