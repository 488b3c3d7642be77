"""A Node closes the patterns still open on it first (no I/O-thread tracebacks; the patterns
then refuse with ClosedError), and it warns once at start when it listens in plaintext beyond
loopback. Real sockets, real threads."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from mesh import Node
from mesh.errors import ClosedError
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from patterns import Client, Publisher, Service, Subscriber, Worker, WorkQueue
from tests.util import make_node, unique, wait_until


def test_closing_a_node_closes_its_live_patterns_first(
        tmp_path: Path, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    node = Node(data_dir=tmp_path / "n", name="n", mesh=unique("m"), interface="127.0.0.1",
                mdns=False)
    # a peer whose client calls our service and whose service our client calls (a client
    # reaches services of other nodes)
    other = Node(data_dir=tmp_path / "o", name="o", mesh=node.mesh, interface="127.0.0.1",
                 mdns=False, static_peers=(node.info().endpoints["control"][0],))
    q = WorkQueue(node, unique("q"))
    w = Worker(node, q.name)
    svc = Service(node, unique("svc"), lambda req: req.payload)
    client = Client(node)
    theirs = Service(other, unique("svc"), lambda req: req.payload)
    caller = Client(other)
    stream = unique("s")
    pub = Publisher(node, stream)
    sub = Subscriber(node, stream)
    # every pattern is working: its threads and sockets are live when the node closes
    q.push(b"task")
    task = wait_until(lambda: w.get(timeout=0.05), 5, what="a task")
    task.ack()
    assert client.request(theirs.name, b"ping", timeout=5) == b"ping"
    assert caller.request(svc.name, b"pong", timeout=5) == b"pong"
    pub.publish(b"e1")
    assert wait_until(lambda: sub.recv(timeout=0.05), 5, what="an event").data == b"e1"

    try:
        node.close()
    finally:
        caller.close()
        theirs.close()
        other.close()

    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ENOTSOCK" not in err, err
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    for call in (lambda: q.push(b"x"), lambda: w.get(timeout=0.01),
                 lambda: client.request(theirs.name, b"x", timeout=1),
                 lambda: pub.publish(b"x"), lambda: sub.recv(timeout=0.01)):
        with pytest.raises(ClosedError):
            call()
    # a Service has no call to refuse (its handler thread serves); its threads are stopped
    assert svc._closed and not svc._io.is_alive()
    assert len(node._closers) == 0
    # closing a pattern again (the user's own with-block exit) is a no-op
    for p in (sub, pub, client, svc, w, q):
        p.close()


def test_a_pattern_closed_by_its_user_is_not_closed_again_by_the_node(tmp_path: Path) -> None:
    with Node(data_dir=tmp_path / "n", interface="127.0.0.1", mdns=False) as node:
        q = WorkQueue(node, unique("q"))
        assert len(node._closers) == 1
        q.close()
        assert len(node._closers) == 0  # unregistered: the node holds no closed pattern


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "plaintext" in r.getMessage()]


def test_plaintext_on_all_interfaces_warns_once_naming_it_and_curve(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mesh")
    # "*" binds every interface (no traffic leaves: no mDNS, no peers)
    with Node(data_dir=tmp_path / "a", interface="*", mdns=False, transports=("tcp",)) as n:
        WorkQueue(n, unique("q")).close()  # later binds do not warn again
    msgs = _warnings(caplog)
    assert len(msgs) == 1, msgs
    assert "all interfaces (*)" in msgs[0] and "--key-file" in msgs[0] and "CURVE" in msgs[0]
    assert "\n" not in msgs[0]


def test_loopback_or_curve_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mesh")
    with Node(data_dir=tmp_path / "a", interface="127.0.0.1", mdns=False):
        pass
    kp = generate_keypair()
    write_keypair(tmp_path / "keys", "a", kp)
    (tmp_path / "allow").mkdir()
    shutil.copy(tmp_path / "keys" / "a.key", tmp_path / "allow" / "a.key")
    sec = SecurityConfig(key_file=tmp_path / "keys" / "a.key_secret",
                         allowlist_dir=tmp_path / "allow")
    with Node(data_dir=tmp_path / "b", interface="*", mdns=False, transports=("tcp",),
              security=sec):
        pass
    assert _warnings(caplog) == []


def test_a_join_seen_in_the_reactors_last_pass_does_not_raise(tmp_path: Path) -> None:
    # A message read while the node closes can emit a join, which schedules gossip on a
    # reactor that has stopped: that must be dropped, not raised out of the reader (seen
    # as a traceback per node when 200 nodes on 2 cores closed together).
    nd = make_node(tmp_path / "n", unique("m"))
    nd.close()
    ch = nd._channel
    ch._gossip_scheduled = False
    ch.schedule_gossip()  # raised ClosedError before
