"""Hostile peers on the node's control channel (items of mesh/node.py).

Attacks with raw pyzmq sockets against real nodes on 127.0.0.1, plaintext and CURVE with an
insider key (a key the victim's allowlist admits): routing-id takeover, HELLO floods (one
source, one key, and at the socket limit in a child process with a low fd limit), oversize
multiparts, and log floods from failed handshakes. After each: nothing forged delivered, real
traffic still correct, the counters moved, log lines limited, and fds/threads/RSS back within
the bound stated in the test.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh import control
from mesh.control import Hello
from mesh.node import Node, PresenceConfig
from mesh.peers import PeerEvent, PeerInfo, PeerState
from mesh.security import SecurityConfig
from mesh.security.keys import Keypair, generate_keypair, write_keypair
from patterns.reqrep.client import Client
from patterns.reqrep.service import Service
from tests.util import poll_until, python_child, unique, wait_until

HB = 0.1
FAST = PresenceConfig(heartbeat_s=HB, evasive_s=0.3, gone_s=1.0, prune_s=1.0)
#: presence for the takeover tests: a live peer is never near evasive on a loaded 2-core box,
#: while a claim is still decided after two heartbeats of quiet
STEADY = PresenceConfig(heartbeat_s=HB, evasive_s=1.0, gone_s=3.0)
ALL = {"*": ("*:*",)}
#: an endpoint nothing listens on (what a forged HELLO announces)
NOWHERE = ("tcp://127.0.0.1:9",)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _fake_id(i: int) -> str:
    return f"{0xFA4E0000 + i:032x}"


def _hello(node_id: str, mesh: str, key: str | None = None,
           eps: tuple[str, ...] = NOWHERE, dial: int | None = None) -> list[bytes]:
    info = PeerInfo(node_id=node_id, name="forged", mesh=mesh, public_key=key,
                    endpoints={"control": eps})
    body = control.encode_body(control.hello_to_wire(Hello(info, dial=dial)), 1 << 20)
    return control.encode_frames([(control.HELLO, body)])


def _raw(ctx: zmq.Context[Any], ep: str, rid: bytes, kp: Keypair | None = None,
         server: str | None = None) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, rid)
    s.setsockopt(zmq.SNDHWM, 100000)
    if kp is not None and server is not None:
        assert kp.secret is not None
        s.curve_publickey, s.curve_secretkey = kp.public.encode(), kp.secret.encode()
        s.curve_serverkey = server.encode()
    s.connect(ep)
    return s


def _ctl(node: Node) -> str:
    return next(e for e in node.info().endpoints["control"] if e.startswith("tcp://"))


def _joined(a: Node, b: Node) -> bool:
    return a.peers.state(b.id) is PeerState.JOINED and b.peers.state(a.id) is PeerState.JOINED


def _node_lines(caplog: pytest.LogCaptureFixture, logger: str) -> int:
    return sum(1 for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []
    mesh = unique("hostile")

    def make(name: str, **kw: Any) -> Node:
        kw.setdefault("mesh", mesh)
        kw.setdefault("presence", FAST)
        kw.setdefault("transports", ("tcp",))
        node = Node(data_dir=tmp_path / name, name=name, interface="127.0.0.1", mdns=False, **kw)
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Keypair]:
    """Keys a, b, insider (all in the allowlist) and stranger (not)."""
    out = {n: generate_keypair() for n in ("a", "b", "insider", "stranger")}
    allow = tmp_path / "allow"
    allow.mkdir()
    for n, kp in out.items():
        write_keypair(tmp_path / "keys", n, kp)
        if n != "stranger":
            shutil.copy(tmp_path / "keys" / f"{n}.key", allow / f"{n}.key")
    return out


def _sec(tmp: Path, name: str, **kw: Any) -> SecurityConfig:
    return SecurityConfig(key_file=tmp / "keys" / f"{name}.key_secret",
                          allowlist_dir=tmp / "allow", permissions=ALL, **kw)


def _attack_for(seconds: float, step: Callable[[], None], victim: Node) -> None:
    """Run the attacker's ``step`` in a loop for ``seconds`` (the length of the fault), each
    step once the victim has read the previous one (its control bytes in grew)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        before = victim.stats().get("control_bytes_in", 0)
        step()
        wait_until(lambda b=before: victim.stats().get("control_bytes_in", 0) > b, 5,
                   what="the victim read the step")


# --- 1. routing-id takeover ----------------------------------------------------------------------


def test_plaintext_routing_id_takeover_neither_flaps_nor_forges(
    make_node: Callable[..., Node], zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = make_node("a", presence=STEADY)
    b = make_node("b", presence=STEADY, static_peers=(_ctl(a),))
    wait_until(lambda: _joined(a, b), 5, what="join")
    b_info = a.peers.get(b.id)
    events: list[PeerEvent] = []
    a.on_peer(events.append)
    got: list[tuple[str, Any]] = []
    a.handle("t.msg", lambda p, body: got.append((p, body)))
    ep = _ctl(a)
    # The id is public (gossip, mDNS): the old routing id exactly, and the new form.
    thieves = [_raw(zctx, ep, b.id.encode()), _raw(zctx, ep, b.id.encode() + os.urandom(8))]
    forged = _hello(b.id, a.mesh)
    msg = control.encode_frames([("t.msg", msgpack.packb("forged"))])
    bye = control.encode_frames([(control.BYE, msgpack.packb(None))])
    n = [0]

    def step() -> None:
        for t in thieves:
            t.send_multipart(forged)
            t.send_multipart(msg)
            t.send_multipart(bye)
        n[0] += 1
        b.send(a.id, "t.msg", n[0])

    try:
        _attack_for(2.0, step, a)  # 20 heartbeats: ten times the quiet a claim would need
        wait_until(lambda: (b.id, n[0]) in got, 5, what="b's last real message")
    finally:
        for t in thieves:
            t.close()
    assert [e for e in events if e.peer.node_id == b.id] == []  # no LEFT, EVASIVE, CHANGED
    assert a.peers.get(b.id) == b_info and a.peers.state(b.id) is PeerState.JOINED
    assert got == [(b.id, i) for i in range(1, n[0] + 1)]  # every real one, no forged one
    st = a.stats()
    dropped = (st.get("unknown_sender", 0) + st.get("claimant_messages_dropped", 0)
               + st.get("bye_unbound", 0))
    assert st.get("id_claims_held", 0) >= 2 * n[0] * 0.9 and dropped >= 4 * n[0] * 0.9
    assert st.get("id_rebinds", 0) == 0
    # ~6 lines a step for 3 s, logged: at most the limiter's burst per counter (+1 a key)
    lines = _node_lines(caplog, "mesh.node")
    assert lines <= 2 * 11, lines
    assert st["log_lines_suppressed"] > 0


def test_curve_insider_cannot_take_over_a_node_id_and_calls_keep_working(
    tmp_path: Path, keys: dict[str, Keypair], zctx: zmq.Context[Any]
) -> None:
    m = unique("hostile")
    svc = unique("svc")

    def node(name: str, **kw: Any) -> Node:
        return Node(data_dir=tmp_path / name, name=name, mesh=m, mdns=False, presence=STEADY,
                    transports=("tcp",), interface="127.0.0.1", **kw)

    with node("a", security=_sec(tmp_path, "a")) as a:
        ep = _ctl(a)
        with node("b", security=_sec(tmp_path, "b", peer_keys={ep: keys["a"].public}),
                  static_peers=(ep,)) as b, \
                Service(b, svc, lambda req: ("b", req.payload)), Client(a) as ca:
            wait_until(lambda: _joined(a, b) and a.who_offers("service", svc), 5, what="join")
            assert ca.request(svc, 1, timeout=5.0) == ["b", 1]
            events: list[PeerEvent] = []
            a.on_peer(events.append)
            ins = keys["insider"]
            thieves = [_raw(zctx, ep, rid, ins, keys["a"].public)
                       for rid in (b.id.encode(), b.id.encode() + os.urandom(8))]
            # announcing its own key (the old check let this through after the handover) and
            # b's key (a lie the handshake disproves)
            claims = [_hello(b.id, m, ins.public), _hello(b.id, m, keys["b"].public)]

            def step() -> None:
                for t in thieves:
                    for c in claims:
                        t.send_multipart(c)

            try:
                _attack_for(2.0, step, a)
                wait_until(lambda: a.stats().get("security_key_mismatch", 0) >= 10
                           or any(e.peer.node_id == b.id for e in events), 5,
                           what=lambda: a.stats())
                assert [e for e in events if e.peer.node_id == b.id] == []
                rec = a.peers.get(b.id)
                assert rec is not None and rec.public_key == keys["b"].public
                # calls keep working while and after the insider tries
                assert ca.request(svc, 2, timeout=5.0) == ["b", 2]
            finally:
                for t in thieves:
                    t.close()
            assert a.stats().get("id_claims_held", 0) >= 10
            assert a.stats().get("id_rebinds", 0) == 0


def test_plaintext_restart_with_the_same_id_still_takes_over(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The legitimate case the takeover rules must keep: a node that died and came back (a
    new connection, no proof the old process could give) gets its id back once its old
    connection is quiet. (Before the change this was ROUTER_HANDOVER's job.)"""
    a = make_node("a", presence=PresenceConfig(heartbeat_s=HB, evasive_s=0.5, gone_s=30.0))
    b = make_node("b", static_peers=(_ctl(a),))
    b_id = b.id
    wait_until(lambda: _joined(a, b), 5)
    # b's reactor frozen: its connection goes quiet without closing (a crashed process)
    release = threading.Event()
    b.reactor.call_soon(release.wait, 30)
    try:
        # b's node id in a new node (its own secret, new connections): a restarted b
        (tmp_path / "b3").mkdir()
        (tmp_path / "b3" / "node.id").write_text(b_id + "\n")
        b3 = make_node("b3", static_peers=(_ctl(a),))
        assert b3.id == b_id
        got: list[Any] = []
        a.handle("t.msg", lambda p, body: got.append((p, body)))
        wait_until(lambda: a.peers.get(b_id) is not None
                   and a.peers.get(b_id).name == "b3", 5,  # type: ignore[union-attr]
                   what=lambda: a.stats())
        assert a.stats().get("id_rebinds", 0) >= 1
        b3.send(a.id, "t.msg", "new")
        wait_until(lambda: got == [(b_id, "new")], 5)
    finally:
        release.set()


def test_a_restart_on_its_own_data_dir_proves_itself_and_rebinds_at_once(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The restarted node has the data dir (node.id and node.proof_key): its HELLO shows the
    proof its old connection showed, so the id moves at once, with no held claim (before: the
    key was per process and every restart waited for the old connection to go quiet)."""
    a = make_node("a", presence=PresenceConfig(heartbeat_s=HB, evasive_s=0.5, gone_s=30.0))
    b = make_node("b", static_peers=(_ctl(a),))
    b_id = b.id
    wait_until(lambda: _joined(a, b), 5)
    release = threading.Event()
    b.reactor.call_soon(release.wait, 30)  # b frozen: its connection stays open, quiet
    try:
        (tmp_path / "b2").mkdir()
        for f in ("node.id", "node.proof_key"):
            (tmp_path / "b2" / f).write_bytes((tmp_path / "b" / f).read_bytes())
        b2 = make_node("b2", static_peers=(_ctl(a),))
        wait_until(lambda: a.peers.get(b_id) is not None
                   and a.peers.get(b_id).name == "b2", 5,  # type: ignore[union-attr]
                   what=lambda: a.stats())
        st = a.stats()
        assert st.get("id_rebinds", 0) >= 1 and st.get("id_claims_held", 0) == 0, st
        assert b2.id == b_id
    finally:
        release.set()


# --- 2. HELLO flood ------------------------------------------------------------------------------


def test_plaintext_hello_flood_is_bounded_per_source_and_not_gossiped(
    make_node: Callable[..., Node], zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = make_node("a")
    c = make_node("c", static_peers=(_ctl(a),))
    d = make_node("d", static_peers=(_ctl(a),))  # so that a has someone to gossip to c
    wait_until(lambda: _joined(a, c) and _joined(a, d) and _joined(c, d), 5)
    fds0, threads0, rss0 = _fds(), threading.active_count(), _status_kb("VmRSS")
    ep = _ctl(a)
    n_fake = 200
    per_source = 64  # NodeConfig.max_ids_per_source's default
    fakes = [_fake_id(i) for i in range(n_fake)]
    socks = [_raw(zctx, ep, f.encode()) for f in fakes]
    try:
        for s, f in zip(socks, fakes, strict=True):
            s.send_multipart(_hello(f, a.mesh))
        wait_until(lambda: a.stats().get("peer_ids_refused", 0) + len(a.peers) - 2 >= n_fake, 10,
                   what=lambda: {k: v for k, v in a.stats().items() if k != "metrics"})
        st = a.stats()
        assert st["links"] <= per_source + 2 and st["peer_ids_held"] <= per_source + 2
        assert len(a.peers.list()) <= per_source + 2
        # two rounds of a's gossip to c after the flood (digests: had a listed a fake, its
        # digest would differ from c's and the full lists exchanged would name it): none of
        # the fakes is passed on
        g0 = c.stats().get("gossip_digests_in", 0)
        wait_until(lambda: c.stats().get("gossip_digests_in", 0) >= g0 + 2, 5)
        wait_until(lambda: c.reactor.run_sync(lambda: True), 2)  # c handled what came
        assert not any(c.peers.get(f) is not None or d.peers.get(f) is not None for f in fakes)
        # (c and d may have learnt each other by gossip: one dial each at most)
        assert c.stats().get("gossip_dials", 0) + d.stats().get("gossip_dials", 0) <= 2
    finally:
        for s in socks:
            s.close()
    # the fakes never answer: gone, then pruned; links, budget, fds and threads come back
    wait_until(lambda: a.stats()["links"] == 2 and a.stats()["peer_ids_held"] <= 2
               and len(a.peers) == 2, 10, what=lambda: a.stats()["links"])
    wait_until(lambda: _fds() <= fds0 + 4, 5, what=lambda: (_fds(), fds0))
    assert threading.active_count() == threads0
    assert _status_kb("VmRSS") - rss0 < 30_000
    # real traffic still correct
    got: list[Any] = []
    a.handle("t.msg", lambda p, body: got.append((p, body)))
    c.send(a.id, "t.msg", "ok")
    wait_until(lambda: got == [(c.id, "ok")], 5)
    assert _node_lines(caplog, "mesh.node") <= 40


def test_nodes_coming_and_going_with_new_ids_are_not_locked_out(
    make_node: Callable[..., Node]
) -> None:
    """The budget's legitimate side: gone rows hold it until pruned (300 s here), but a full
    budget forgets the longest-gone row of that source, so churn with fresh ids still joins."""
    a = make_node("a", max_ids_per_source=3,
                  presence=PresenceConfig(heartbeat_s=HB, evasive_s=0.3, gone_s=1.0))
    for i in range(6):
        b = make_node(f"b{i}", static_peers=(_ctl(a),))
        wait_until(lambda b=b: _joined(a, b), 5, what=f"b{i} joins")
        b_id = b.id
        b.close()  # BYE: gone at once, its row stays (prune_s 300)
        wait_until(lambda b_id=b_id: a.peers.state(b_id) is PeerState.GONE, 5)
    st = a.stats()
    assert st["peer_ids_held"] <= 3 and st.get("peer_ids_refused", 0) == 0
    assert st["peer_ids_evicted"] == 3 and len(a.peers) == 3


def test_curve_insider_key_announcing_many_ids_is_bounded_per_key(
    tmp_path: Path, keys: dict[str, Keypair], zctx: zmq.Context[Any]
) -> None:
    m = unique("hostile")
    with Node(data_dir=tmp_path / "a", name="a", mesh=m, mdns=False, presence=FAST,
              transports=("tcp",), interface="127.0.0.1", security=_sec(tmp_path, "a")) as a:
        ep = _ctl(a)
        ins = keys["insider"]
        n_fake = 30
        fakes = [_fake_id(i) for i in range(n_fake)]
        socks = [_raw(zctx, ep, f.encode(), ins, keys["a"].public) for f in fakes]
        try:
            for s, f in zip(socks, fakes, strict=True):
                s.send_multipart(_hello(f, m, ins.public))
            per_key = 4  # NodeConfig.max_ids_per_key's default
            wait_until(lambda: a.stats().get("peer_ids_refused", 0) + len(a.peers) >= n_fake, 10,
                       what=lambda: a.stats())
            assert len(a.peers.list()) == per_key and a.stats()["links"] <= per_key
        finally:
            for s in socks:
                s.close()
        # a real node with its own key still joins
        with Node(data_dir=tmp_path / "b", name="b", mesh=m, mdns=False, presence=FAST,
                  transports=("tcp",), interface="127.0.0.1", static_peers=(ep,),
                  security=_sec(tmp_path, "b", peer_keys={ep: keys["a"].public})) as b:
            wait_until(lambda: _joined(a, b), 5)


_VICTIM = r"""
import json, resource, sys
lim = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (lim, lim))
from mesh.node import Node, NodeConfig, PresenceConfig
cfg = json.loads(sys.argv[1])
lifted = {k: 100000 for k in ("max_ids_per_source", "max_peers")
          if k in NodeConfig.__dataclass_fields__}
n = Node(data_dir=cfg["dir"], name="victim", mesh=cfg["mesh"], mdns=False,
         interface="127.0.0.1", transports=("tcp",),
         presence=PresenceConfig(0.1, 0.3, 1.0, 1.0), **lifted)
print(json.dumps({"ep": n.info().endpoints["control"][0], "id": n.id}), flush=True)
for line in sys.stdin:
    st = n.stats()
    st.pop("metrics")
    print(json.dumps(st), flush=True)
n.close()
"""


def test_socket_limit_is_a_counted_refusal_not_a_traceback(
    tmp_path: Path, zctx: zmq.Context[Any], make_node: Callable[..., Node]
) -> None:
    """Budgets lifted and the fd limit low: the flood reaches the socket limit, which must
    be counted, never a traceback, and the node keeps its presence ticks going."""
    m = unique("hostile")
    proc = python_child(_VICTIM, json.dumps({"dir": str(tmp_path / "v"), "mesh": m}), "128",
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    socks: list[zmq.Socket[Any]] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = json.loads(proc.stdout.readline())

        def stats() -> dict[str, Any]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())  # type: ignore[no-any-return]

        for i in range(150):
            f = _fake_id(i)
            s = _raw(zctx, ready["ep"], f.encode())
            s.send_multipart(_hello(f, m))
            socks.append(s)
        wait_until(lambda: stats().get("socket_refused", 0) >= 1 or proc.poll() is not None
                   or stats().get("dial_errors", 0) >= 1, 10, what=stats)
        assert stats().get("socket_refused", 0) >= 1
        for s in socks:
            s.close()
        socks.clear()
        # fakes gone and pruned: their links and fds are back, and a real node joins
        wait_until(lambda: stats()["links"] == 0, 10, what=stats)
        b = make_node("b", mesh=m, static_peers=(ready["ep"],))
        wait_until(lambda: b.peers.state(ready["id"]) is PeerState.JOINED
                   and stats()["peers_joined"] == 1, 10, what=stats)
        assert stats()["reactor_errors"] == 0
    finally:
        for s in socks:
            s.close()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    err = proc.stderr.read().decode() if proc.stderr is not None else ""
    assert "Traceback" not in err, err[-3000:]
    assert err.count("\n") <= 40, err[-3000:]


def test_nothing_after_bye_revives_a_node(
    make_node: Callable[..., Node], zctx: zmq.Context[Any]
) -> None:
    """BYE is a connection's last message: what still arrives on it (a PING in flight, a
    replayed frame) does not bring the node back; only a new HELLO does."""
    a = make_node("a")
    fid = _fake_id(21)
    raw = _raw(zctx, _ctl(a), fid.encode())
    try:
        raw.send_multipart(_hello(fid, a.mesh))
        wait_until(lambda: a.peers.state(fid) is PeerState.JOINED, 5)
        raw.send_multipart(control.encode_frames([(control.BYE, msgpack.packb(None))]))
        wait_until(lambda: a.peers.state(fid) is PeerState.GONE, 5)
        before = a.stats().get("unknown_sender", 0)
        ping = control.encode_frames([(control.PING, msgpack.packb(1))])
        for _ in range(3):
            raw.send_multipart(ping)
        wait_until(lambda: a.stats().get("unknown_sender", 0) >= before + 3, 5,
                   what=lambda: (a.peers.state(fid), a.stats().get("unknown_sender")))
        assert a.peers.state(fid) is PeerState.GONE
        raw.send_multipart(_hello(fid, a.mesh))  # a new session: back at once
        wait_until(lambda: a.peers.state(fid) is PeerState.JOINED, 5)
    finally:
        raw.close()


# --- 3. message size -----------------------------------------------------------------------------


def _trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def test_oversize_multipart_is_refused_whole_and_batches_still_pass(
    make_node: Callable[..., Node], zctx: zmq.Context[Any]
) -> None:
    mib = 1 << 20
    a = make_node("a", max_message_bytes=mib)
    b = make_node("b", static_peers=(_ctl(a),), max_message_bytes=mib)
    wait_until(lambda: _joined(a, b), 5)
    got: list[tuple[str, int]] = []
    a.handle("t.big", lambda p, body: got.append((p, len(body))))
    raw = _raw(zctx, _ctl(a), _fake_id(1).encode())
    try:
        raw.send_multipart(_hello(_fake_id(1), a.mesh))
        wait_until(lambda: a.peers.get(_fake_id(1)) is not None, 5)
        # 32 pairs of just under a MiB each: every frame passes MAXMSGSIZE, the message is 32x
        big = control.encode_frames([("t.big", msgpack.packb(b"x" * (mib - 64)))] * 32)
        raw.send_multipart(big)
        raw.send_multipart(control.encode_frames([("t.big", msgpack.packb(b"y" * 10))]))
        wait_until(lambda: got, 10)
        assert got == [(_fake_id(1), 10)] and a.stats().get("oversize") == 1
        # legit: many large messages to one peer are split into multiparts under the limit
        for _ in range(8):
            b.send(a.id, "t.big", b"z" * (mib // 2))
        wait_until(lambda: len(got) == 9, 10, what=lambda: (len(got), a.stats()["oversize"]))
        assert a.stats()["oversize"] == 1
        # nothing of a refused message is held: after the first flood (which warms the
        # allocator's caches), eight more of 32 MiB each grow the process by less than one.
        # Held memory would grow by 256 MiB; glibc's cache of freed pages does not add up.
        _trim()
        rss0 = _status_kb("VmRSS")
        for i in range(8):
            raw.send_multipart(big)
            raw.send_multipart(control.encode_frames([("t.big", msgpack.packb(b"y" * 10))]))
            wait_until(lambda i=i: a.stats().get("oversize") == 2 + i and len(got) == 10 + i, 10,
                       what=lambda: (len(got), a.stats()["oversize"]))
        _trim()
        grown = _status_kb("VmRSS") - rss0
        assert grown < 32 * 1024, f"RSS grew by {grown} KiB over 8 refused 32 MiB messages"
    finally:
        raw.close()


def test_a_hostile_router_cannot_fill_our_link_dealer(
    make_node: Callable[..., Node], zctx: zmq.Context[Any]
) -> None:
    """A peer whose control ROUTER we dial can send back to our DEALER (which nothing ever
    reads): what it can make us hold there is one message, not the HWM's 10,000."""
    a = make_node("a")
    evil = zctx.socket(zmq.ROUTER)
    evil.setsockopt(zmq.LINGER, 0)
    port = evil.bind_to_random_port("tcp://127.0.0.1")
    raw = _raw(zctx, _ctl(a), _fake_id(7).encode())
    try:
        raw.send_multipart(_hello(_fake_id(7), a.mesh, eps=(f"tcp://127.0.0.1:{port}",)))
        assert evil.poll(5000), "a never dialled the endpoint the HELLO announced"
        rid = evil.recv_multipart()[0]
        rss0 = _status_kb("VmRSS")
        chunk = b"x" * (1 << 20)
        for _ in range(200):  # 200 MiB offered; zero-copy on our side of the test
            evil.send_multipart([rid, chunk], copy=False)
        # 200 MiB cross loopback well within 3 s: had they been queued, RSS would show it
        peak = [0]

        def grew() -> bool:
            peak[0] = max(peak[0], _status_kb("VmRSS") - rss0)
            return peak[0] > 100_000

        assert poll_until(grew, 3.0) is None, peak[0]
        assert peak[0] < 40_000, peak[0]  # kB: one message and the TCP buffers, not 200 MiB
    finally:
        raw.close()
        evil.close()


# --- 4. log lines --------------------------------------------------------------------------------


def test_failed_handshakes_do_not_flood_the_log(
    tmp_path: Path, keys: dict[str, Keypair], zctx: zmq.Context[Any],
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    m = unique("hostile")
    with Node(data_dir=tmp_path / "a", name="a", mesh=m, mdns=False, presence=FAST,
              transports=("tcp",), interface="127.0.0.1", security=_sec(tmp_path, "a")) as a:
        ep = _ctl(a)
        n = 60
        socks = [_raw(zctx, ep, os.urandom(8), keys["stranger"], keys["a"].public)
                 for _ in range(n)]
        socks += [_raw(zctx, ep, os.urandom(8)) for _ in range(n)]  # plaintext to CURVE
        try:
            for s in socks:
                s.send_multipart([b"x", b"y"])
            wait_until(lambda: a.stats().get("security_handshake_failed_auth", 0) >= n
                       and a.stats().get("security_handshake_failed_protocol", 0)
                       + a.stats().get("security_handshake_failed_no_detail", 0) >= n, 10,
                       what=lambda: a.stats())
        finally:
            for s in socks:
                s.close()
        lines = _node_lines(caplog, "mesh.security")
        assert lines <= 3 * 11, lines  # per failure kind: the burst, then one per interval


def test_gossip_entry_without_a_usable_control_endpoint_is_counted(
        make_node: Callable[..., Node]) -> None:
    """Old code skipped such an entry without a trace: a peer gossiping only unusable
    endpoints (ipc of another host, nothing at all) left no number to look at."""
    a = make_node("a")
    ctx = zmq.Context()
    gossiper = _fake_id(900)
    s = _raw(ctx, _ctl(a), gossiper.encode() + os.urandom(8))
    try:
        s.send_multipart(_hello(gossiper, a.mesh))
        wait_until(lambda: a.peers.state(gossiper) is PeerState.JOINED, 5, what="gossiper bound")
        before = a.stats().get("no_endpoint", 0)
        entries = [(_fake_id(901), a.mesh, "another-host", ("ipc:///tmp/zm-elsewhere.sock",),
                    None),
                   (_fake_id(902), a.mesh, "another-host", (), None),
                   (_fake_id(903), a.mesh, "another-host", ("tcp://127.0.0.1:9",), None)]
        body = control.encode_body(control.gossip_to_wire(entries), 1 << 20)
        s.send_multipart(control.encode_frames([(control.GOSSIP, body)]))
        wait_until(lambda: a.stats().get("gossip_dials", 0) >= 1, 5, what="the usable one dialled")
        assert a.stats().get("no_endpoint", 0) - before == 2
    finally:
        s.close()
        ctx.term()
