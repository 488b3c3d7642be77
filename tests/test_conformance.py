"""The conformance kit (tests/conformance/kit.py) against a real node in a child process.

The target is ``python -m tests.conformance.target`` (zeromesh), or the command in
``$ZEROMESH_CONFORMANCE_TARGET`` (any implementation: it must print one JSON line with
``control`` = its tcp control endpoint and ``id`` = its node id, offer the service ``echo``
answering ``<payload>#<runs>`` the durable stream ``conf`` holding three events, and the queue ``jobs`` (ack_wait 0.5 s)
holding tasks ``t0``..``t4``, and serve the mesh ``conformance``). Counter checks need the
zeromesh target (it prints ``node.stats()`` when sent ``stats``); they are skipped otherwise.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.kit import (
    DATA,
    DURABLE,
    HEARTBEAT,
    Caller,
    DataSub,
    Peer,
    QueueWorker,
    decode_envelope,
    pump,
)
from tests.util import REPO, wait_until

KIT = Path(__file__).parent / "conformance"
EXTERNAL = os.environ.get("ZEROMESH_CONFORMANCE_TARGET")


class Target:
    def __init__(self) -> None:
        cmd = (shlex.split(EXTERNAL) if EXTERNAL
               else [sys.executable, "-m", "tests.conformance.target"])
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=REPO, text=True)
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        self.control: str = first["control"]
        self.id: str = first["id"]
        #: the stdin commands the target answers (tests/conformance/README.md)
        self.commands: set[str] = set(first.get("commands", []))

    def command(self, line: str) -> Any:
        """Send one command line; its JSON answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def need(self, command: str) -> None:
        """Skip the calling test when the target does not answer ``command``."""
        if command not in self.commands:
            pytest.skip(f"the target does not advertise the {command!r} command")

    def stats(self) -> dict[str, Any] | None:
        if "stats" not in self.commands:
            return None
        return self.command("stats")  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    t = Target()
    try:
        yield t
    finally:
        t.close()


def test_the_kit_imports_neither_mesh_nor_patterns() -> None:
    for path in KIT.glob("kit.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("mesh", "patterns", "tests"), (path, n)


def test_join_presence_and_call(target: Target) -> None:
    peer = Peer(target.control)
    try:
        info = peer.join()
        assert info["node_id"] == target.id
        # presence: a ping is answered with a pong echoing an int body
        peer.send("ping", 12345)
        assert peer.recv("pong") == 12345
        ep = next(e for e in info["endpoints"]["rpc.echo"] if e.startswith("tcp://"))
        caller = Caller(ep, target.id, "echo")
        try:
            meta, body = caller.request("conf-1", "echo", b"hi")
            assert meta[1] == 0 and body.startswith(b"hi#"), (meta, body)
            # retry with the same id: served from the cache (the handler did not run again)
            meta2, body2 = caller.request("conf-1", "echo", b"hi", attempt=1)
            assert (meta2[1], body2) == (0, body)
            assert caller.request("conf-2", "echo", b"x", ttl_ms=0)[0][1] == 3  # EXPIRED
            assert caller.request("conf-3", "nope", b"x")[0][1] == 4  # UNKNOWN_SERVICE
        finally:
            caller.close()
    finally:
        peer.close()


def test_replay_from_a_durable_stream(target: Target) -> None:
    peer = Peer(target.control)
    try:
        peer.join()
        base = {"v": 1, "sid": "kit", "stream": "conf", "from": 0}
        # max / max_bytes are optional (pub/sub 2.2): the publisher's caps apply
        got = peer.replay({**base, "req": 1})
        assert got["error"] is None and got["first"] == 0 and len(got["events"]) == 3, got
        assert got["head"] == 3 and got["oldest"] == 0
        got = peer.replay({**base, "req": 2, "from": 1, "max": 1})
        assert got["first"] == 1 and len(got["events"]) == 1
        # a malformed but answerable request gets a refusal it can see, not silence
        got = peer.replay({**base, "req": 3, "max": -1})
        assert got["error"] == "malformed" and got["events"] == [], got
    finally:
        peer.close()


def test_work_a_queue(target: Target) -> None:
    peer = Peer(target.control)
    try:
        info = peer.join()
        ep = next(e for e in info["endpoints"]["pipe.jobs"] if e.startswith("tcp://"))
        w = QueueWorker(ep)
        try:
            w.send(0x01, ["jobs", 1, peer.id, "kit"])  # READY, credit 1
            (a,) = w.task()
            assert a[1] == 1 and a[4] == b"t0"  # [id, delivery, ack_wait_ms, key, payload]
            assert w.quiet(0.2), "credit 1: a second task before the first was answered"
            w.send(0x03, [a[0]])  # ACK
            (b,) = w.task()
            assert b[4] == b"t1"
            w.send(0x04, [[b[0], 0, "", "ValueError", "kit", None]])  # NACK, retry now
            seen = {}
            for _ in range(3):
                (t,) = w.task()
                seen[t[4]] = t
                if t[4] == b"t1":
                    assert t[1] == 2  # redelivered: delivery 2
                    w.send(0x05, [t[0]])  # IN_PROGRESS
                    w.send(0x06, [[t[0], None, "poison", None, None, None]])  # TERM: DLQ
                else:
                    w.send(0x03, [t[0]])
            assert b"t1" in seen
            (late,) = w.task()  # do not answer: redelivered after ack_wait (0.5 s)
            (again,) = w.task(3)
            assert again[0] == late[0] and again[1] == late[1] + 1
            w.send(0x03, [again[0]])
            w.send(0x07, [])  # BYE
        finally:
            w.close()
    finally:
        peer.close()


def test_unexpected_input_is_counted(target: Target) -> None:
    before = target.stats()
    peer = Peer(target.control)
    try:
        # a fresh connection's first message is an update: dropped, counted unknown_sender
        peer.send("update", {"info": peer.info()})
        if before is None:
            pytest.skip("counters are read from the zeromesh target only")
        wait_until(lambda: (target.stats() or {}).get("unknown_sender", 0)
                   > before.get("unknown_sender", 0), 5, what="unknown_sender counted")
        # a hello of another mesh: wrong_mesh; a header without "ZM": malformed; a hello
        # whose info lacks a required field: malformed; a control major of 9:
        # unsupported_version. None of them stops the node.
        other = Peer(target.control, mesh="another-mesh")
        try:
            other.send("hello", {"info": other.info(), "reply": False})
            peer.dealer.send_multipart([b"XX\x01\x04ping", b"\xc0"])
            peer.send("hello", {"info": {"node_id": peer.id, "mesh": "conformance"}})
            peer.dealer.send_multipart([b"ZM\x09\x04ping", b"\xc0"])
            for key in ("wrong_mesh", "malformed", "unsupported_version"):
                wait_until(lambda k=key: (target.stats() or {}).get(k, 0)
                           > before.get(k, 0), 5, what=f"{key} counted")
        finally:
            other.dealer.close(0)
            other.router.close(0)
        peer.join()  # and the connection still works once it says hello
    finally:
        peer.close()


def test_gossip(target: Target) -> None:
    a, b = Peer(target.control), Peer(target.control)
    c = Peer(target.control)  # never joins: the node hears of it only from our gossip
    try:
        a.join()
        b.join()
        # Both answer the node's pings, so it verifies both links; its gossip to a then
        # names b (JOINED, verified), and never a (the receiver) nor the node itself.
        lists: list[list[Any]] = []

        def on_message(p: Peer, kind: str, body: Any) -> None:
            if p is a and kind == "gossip":
                lists.append(body)

        assert pump([a, b], lambda: any(e[0] == b.id for g in lists for e in g), 8,
                    on_message), f"no gossip to a naming b: {lists}"
        for g in lists:
            for e in g:
                assert len(e) in (4, 5) and e[0] not in (a.id, target.id), e
                assert e[1] == "conformance" and isinstance(e[3], list), e
        entry = next(e for g in lists for e in g if e[0] == b.id)
        assert entry[3] == [b.endpoint] and entry[2] == "conformance-kit-host", entry
        # a gossips c (4-element entry, no public key): the node dials it, DEALER + hello
        a.send("gossip", [[c.id, "conformance", "conformance-kit-host", [c.endpoint]]])
        hello = c.recv("hello")
        assert hello["info"]["node_id"] == target.id and hello.get("reply") is not True
        assert c.last_rid[:32] == target.id.encode() and 32 <= len(c.last_rid) <= 64
    finally:
        for p in (a, b, c):
            p.close()


def test_subscribe_to_the_data_socket_with_a_forced_gap(target: Target) -> None:
    target.need("publish")
    peer = Peer(target.control)
    subs: list[DataSub] = []
    try:
        info = peer.join()
        assert "live" in info["offers"]["stream"], info["offers"]
        ep = next(e for e in info["endpoints"]["pubsub"] if e.startswith("tcp://"))
        sub = DataSub(ep, target.id)
        subs.append(sub)
        sub.subscribe("live")
        # a new subscription is answered at once with a HEARTBEAT of the stream
        hb = sub.recv()
        assert (hb.kind, hb.topic, hb.flags, hb.publisher) == (HEARTBEAT, "live", DURABLE,
                                                               target.id), vars(hb)
        assert hb.epoch != 0 and hb.count == 0
        start, epoch = hb.seq, hb.epoch
        head = target.command("publish live 10")["head"]
        assert head == start + 10
        # Read DATA until a HEARTBEAT announces the head; drop seqs start+3..start+6 on our
        # side (a forced gap, as if the HWM had dropped them).
        hole = range(start + 3, start + 7)
        kept: dict[int, list[Any]] = {}
        seen: list[int] = []
        last_head = start
        while last_head < head:
            m = sub.recv()
            assert m.topic == "live" and m.epoch == epoch and m.publisher == target.id
            if m.kind == HEARTBEAT:
                last_head = m.seq
                continue
            assert m.kind == DATA and m.flags == DURABLE
            for i, raw in enumerate(m.envelopes):
                ev = decode_envelope(raw)
                assert (ev[2], ev[3]) == ("live", m.seq + i), ev[2:4]
                seen.append(ev[3])
                if ev[3] not in hole:
                    kept[ev[3]] = ev
        assert seen == list(range(start, head)), seen  # in order, no hole on the wire
        # repair the hole with a replay request under the epoch we saw
        got = peer.replay({"v": 1, "sid": "kit-live", "req": 1, "stream": "live",
                           "from": hole.start, "to": hole.stop, "epoch": epoch})
        assert got["error"] is None and got["first"] == hole.start, got
        assert got["epoch"] == epoch and "truncate" not in got and got["head"] == head, got
        assert len(got["events"]) == len(hole)
        for i, raw in enumerate(got["events"]):
            ev = decode_envelope(raw)
            assert (ev[2], ev[3]) == ("live", hole.start + i)
            kept[ev[3]] = ev
        assert sorted(kept) == list(range(start, head))
        assert [kept[s][14] for s in range(start, head)] == list(range(10))
        # subscribing late: the first HEARTBEAT says the head; nothing before it is pushed
        late = DataSub(ep, target.id)
        subs.append(late)
        late.subscribe("live")
        m = late.recv()
        assert (m.kind, m.seq, m.epoch) == (HEARTBEAT, head, epoch), vars(m)
        # UNSUBSCRIBE: nothing more of the stream on that connection. Requests of one
        # connection are handled in order, so the HEARTBEAT answering a SUBSCRIBE of
        # another stream sent after it shows the UNSUBSCRIBE was handled.
        late.subscribe("live", op=2)
        late.subscribe("conf")
        m = late.recv()
        assert (m.kind, m.topic) == (HEARTBEAT, "conf"), vars(m)
        assert target.command("publish live 2")["head"] == head + 2
        m = sub.recv()
        while m.kind != DATA:
            m = sub.recv()
        assert m.seq == head, vars(m)
        try:
            while True:
                m = late.recv(0.3)
                assert m.topic != "live", f"{vars(m)} after UNSUBSCRIBE"
        except TimeoutError:
            pass
    finally:
        for s in subs:
            s.close()
        peer.close()
