"""Incarnations, with real processes and sockets: a restart is told from a second process
holding the same node id (a copied data dir), and the ipc files of a live twin survive.

The decisions themselves are unit-tested in tests/test_membership.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh import control
from mesh.datadir import next_incarnation
from mesh.metrics import render_prometheus
from mesh.node import Node, PresenceConfig
from mesh.peers import PeerInfo
from mesh.transport import ipc_in_use, ipc_path, remove_stale_ipc
from tests.test_node_procs import Child
from tests.util import unique, wait_until

# A twin counts as alive while heard within two heartbeats: 1 s leaves room for a loaded CI.
FAST = PresenceConfig(heartbeat_s=0.5, evasive_s=1.5, gone_s=5.0)


def conflict_lines(caplog: pytest.LogCaptureFixture, node_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and "two processes claim" in r.getMessage() and node_id in r.getMessage()]


@pytest.fixture
def third(tmp_path: Path) -> Iterator[Node]:
    """The node both twins dial (in this process, so its stats and log are at hand)."""
    got: list[tuple[str, Any]] = []
    with Node(data_dir=tmp_path / "t", name="t", mesh=unique("inc"), interface="127.0.0.1",
              mdns=False, presence=FAST) as t:
        t.handle("test.msg", lambda peer, body: got.append((peer, body)))
        t.got = got  # type: ignore[attr-defined]
        yield t


def child_cfg(t: Node, data_dir: Path, name: str) -> dict[str, Any]:
    tcp = next(e for e in t.info().endpoints["control"] if e.startswith("tcp://"))
    return dict(data_dir=str(data_dir), name=name, mesh=t.mesh, interface="127.0.0.1",
                presence=[FAST.heartbeat_s, FAST.evasive_s, FAST.gone_s],
                static_peers=[tcp])


def echo_reaches(t: Node, node_id: str, body: str) -> None:
    """Send test.echo to ``node_id`` and wait for its test.msg answer."""
    got: list[tuple[str, Any]] = t.got  # type: ignore[attr-defined]
    wait_until(lambda: t.peers.get(node_id) is not None and t.peers.state(node_id) is not None
               and t.peers.state(node_id).value == "joined", 10, what="peer joined")
    t.send(node_id, "test.echo", body)
    wait_until(lambda: (node_id, body) in got, 5, what=f"echo {body} answered")


@pytest.mark.parametrize("transports", [["tcp", "ipc"], ["tcp"]])
def test_copied_data_dir_beside_its_original_is_a_conflict_and_the_original_is_kept(
        third: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        transports: list[str]) -> None:
    caplog.set_level(logging.INFO)
    t = third
    orig_dir, copy_dir = tmp_path / "orig", tmp_path / "copy"
    orig = Child({**child_cfg(t, orig_dir, "orig"), "transports": transports})
    try:
        echo_reaches(t, orig.id, "before")
        shutil.copytree(orig_dir, copy_dir)  # the cloned device image, taken while it runs
        copy = Child({**child_cfg(t, copy_dir, "copy"), "transports": transports})
        try:
            assert copy.id == orig.id
            # the copy's ipc control socket is not the original's (same node id, same host)
            assert set(copy.endpoints["control"]).isdisjoint(orig.endpoints["control"])
            wait_until(lambda: t.stats().get("id_conflicts", 0) >= 1, 10,
                       what="the third node saw two processes with one id")
            # it keeps talking to the original, and only to it, also once the copy, which
            # hears nothing from the third any more, has redialled it (past its gone_s)
            for i in range(5):
                echo_reaches(t, orig.id, f"after-{i}")
            wait_until(lambda: t.stats().get("id_conflict_refusals", 0) >= 1, 15,
                       what="the copy's later claims refused")
            for i in range(5, 10):
                echo_reaches(t, orig.id, f"after-{i}")
            row = t.peers.get(orig.id)
            assert row is not None and row.endpoints["control"] == tuple(orig.endpoints["control"])
            echoed = [e["body"] for e in copy.seen + list(copy.events.queue)
                      if e.get("event") == "msg" and e["kind"] == "test.echo"]
            assert not any(b.startswith("after") for b in echoed), echoed
            assert len(conflict_lines(caplog, orig.id)) == 1, conflict_lines(caplog, orig.id)
            text = render_prometheus(t)
            line = next(ln for ln in text.splitlines()
                        if ln.startswith("control_id_conflicts_total "))
            assert float(line.rsplit(" ", 1)[1]) >= 1
        finally:
            copy.stop()
    finally:
        orig.stop()
    assert len(conflict_lines(caplog, orig.id)) == 1


def test_kill_and_restart_on_one_data_dir_is_accepted_at_once_without_conflict(
        third: Node, tmp_path: Path) -> None:
    t = third
    first = Child(child_cfg(t, tmp_path / "b", "b"))
    echo_reaches(t, first.id, "one")
    row = t.peers.get(first.id)
    assert row is not None and row.incarnation > 0
    inc1 = row.incarnation
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    first.stop()
    held = t.stats().get("id_claims_held", 0)
    second = Child(child_cfg(t, tmp_path / "b", "b"))
    try:
        wait_until(lambda: (r := t.peers.get(second.id)) is not None and r.incarnation > inc1,
                   10, what="the restart's incarnation")
        echo_reaches(t, second.id, "two")
        st = t.stats()
        assert st.get("id_conflicts", 0) == 0, st
        # bound by its proof, not held until the dead connection went quiet
        assert st.get("id_claims_held", 0) == held, st
        for i in range(5):  # and it stays bound
            echo_reaches(t, second.id, f"more-{i}")
        assert t.stats().get("id_conflicts", 0) == 0
    finally:
        second.stop()




def test_raw_peer_with_a_lower_incarnation_is_refused(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    mesh = unique("inc")
    node_id = os.urandom(16).hex()
    proof = b"r" * 16
    with Node(data_dir=tmp_path / "t", name="t", mesh=mesh, interface="127.0.0.1",
              mdns=False, transports=("tcp",)) as t:
        ep = t.info().endpoints["control"][0]
        ctx = zmq.Context()
        socks = []
        try:
            def dealer(inc: int) -> zmq.Socket[Any]:
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.ROUTING_ID, node_id.encode() + os.urandom(8))
                s.connect(ep)
                info = PeerInfo(node_id=node_id, name=f"raw-{inc}", mesh=mesh,
                                endpoints={"control": ("tcp://127.0.0.1:9",)}, incarnation=inc)
                body = control.hello_to_wire(control.Hello(info, reply=True, proof=proof))
                s.send_multipart(control.encode_frames(
                    [(control.HELLO, control.encode_body(body, 1 << 20))]))
                socks.append(s)
                return s

            newer = dealer(100)
            wait_until(lambda: (r := t.peers.get(node_id)) is not None and r.name == "raw-100",
                       5, what="the first raw HELLO bound")
            ping = control.encode_frames([(control.PING, control.encode_body(1, 64))])
            newer.send_multipart(ping)  # it is alive
            dealer(50)  # the same id and proof, an older incarnation
            wait_until(lambda: t.stats().get("id_conflicts", 0)
                       + t.stats().get("id_rebinds", 0) >= 1, 5, what="the older claim seen")
            st = t.stats()
            assert st.get("id_rebinds", 0) == 0, st  # not bound to the older claim
            row = t.peers.get(node_id)
            assert row is not None and row.name == "raw-100" and row.incarnation == 100
            assert st.get("id_conflicts", 0) == 1, st
            assert len(conflict_lines(caplog, node_id)) == 1
        finally:
            for s in socks:
                s.close()
            ctx.term()


def test_stale_ipc_files_go_and_a_live_twins_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = Path(tempfile.mkdtemp(prefix="zmi", dir="/tmp"))
    try:
        node_id = os.urandom(16).hex()
        stale = ipc_path(directory, node_id, "pubsub")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(stale)  # a socket file nobody listens on any more (a killed process's)
        s.close()
        ctx = zmq.Context()
        live = ctx.socket(zmq.ROUTER)
        live.setsockopt(zmq.LINGER, 0)
        path = ipc_path(directory, node_id, "control")
        live.bind(f"ipc://{path}")
        try:
            assert ipc_in_use(path) and not ipc_in_use(stale)
            assert remove_stale_ipc(directory, node_id) == 1
            assert not os.path.exists(stale)
            assert os.path.exists(path) and ipc_in_use(path)
            # a Node with this id (a copy of its data dir) binds beside it, not over it
            monkeypatch.setenv("ZEROMESH_IPC_DIR", str(directory))
            data = directory / "d"
            data.mkdir()
            (data / "node.id").write_text(node_id + "\n")
            with Node(data_dir=data, name="twin", mesh=unique("inc"), interface="127.0.0.1",
                      mdns=False) as twin:
                ipc = [e for e in twin.info().endpoints["control"] if e.startswith("ipc://")]
                assert ipc and ipc[0] != f"ipc://{path}"
                assert ipc_in_use(path)  # the live one still answers
                peer = ctx.socket(zmq.DEALER)
                peer.setsockopt(zmq.LINGER, 0)
                peer.connect(f"ipc://{path}")
                peer.send(b"x")
                assert live.poll(5000)
        finally:
            ctx.destroy(linger=0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_incarnation_file_grows_at_every_start_and_survives_damage(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mesh = unique("inc")
    incs = []
    for _ in range(3):
        with Node(data_dir=tmp_path / "n", name="n", mesh=mesh, interface="127.0.0.1",
                  mdns=False) as n:
            assert n.info().incarnation == n.incarnation
            assert (tmp_path / "n" / "node.incarnation").read_text().strip() == str(n.incarnation)
            incs.append(n.incarnation)
    assert incs == sorted(set(incs)) and incs[0] > 0
    # the clock stepped back: still larger
    back = next_incarnation(tmp_path / "n", now_ms=1)
    assert back == incs[-1] + 1
    # a damaged file: one warning, and still larger than every earlier value
    (tmp_path / "n" / "node.incarnation").write_text("garbage\n")
    caplog.set_level(logging.WARNING)
    after = next_incarnation(tmp_path / "n", now_ms=1)
    assert after > back
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
    assert not [p for p in os.listdir(tmp_path / "n") if p.endswith(".tmp")]
