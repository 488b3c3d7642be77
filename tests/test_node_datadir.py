"""One Node per data dir: a second one, in this process or another, is refused with a typed
error naming the holder; a SIGKILLed holder frees it (the lock dies with its process)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from mesh import DataDirInUse, Node
from tests.util import python_child, unique

CHILD = """
import sys, threading
from mesh import Node
with Node(data_dir=sys.argv[1], name="holder", interface="127.0.0.1", mdns=False):
    print("READY", flush=True)
    threading.Event().wait()
"""


def _node(path: Path) -> Node:
    return Node(data_dir=path, name=unique("n"), interface="127.0.0.1", mdns=False)


def test_a_second_node_on_one_data_dir_is_refused_and_the_first_keeps_working(
        tmp_path: Path) -> None:
    with _node(tmp_path / "d") as first:
        with pytest.raises(DataDirInUse) as info:
            _node(tmp_path / "d")
        assert str(os.getpid()) in str(info.value) and info.value.holder == str(os.getpid())
        assert not first.closed and first.stats()["links"] == 0
    with _node(tmp_path / "d") as again:  # closed: free again, same node id
        assert again.id == first.id


def test_another_process_holds_it_until_killed(tmp_path: Path) -> None:
    d = tmp_path / "d"
    p = python_child(CHILD, str(d), stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"READY\n"
        with pytest.raises(DataDirInUse) as info:
            _node(d)
        assert info.value.holder == str(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        with _node(d) as n:  # no stale lock after kill -9
            assert n.data_dir == d
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_fixed_control_port_keeps_static_peers_working_across_a_restart(
        tmp_path: Path) -> None:
    from mesh.node import PresenceConfig
    from mesh.peers import PeerState
    from tests.util import wait_until

    port = _free_port()
    fast = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)
    kw = dict(interface="127.0.0.1", mdns=False, presence=fast, mesh=unique("m"))
    a = Node(data_dir=tmp_path / "a", name="a", port=port, **kw)  # type: ignore[arg-type]
    assert f"tcp://127.0.0.1:{port}" in a.info().endpoints["control"]
    a_id = a.id
    with Node(data_dir=tmp_path / "b", name="b",  # type: ignore[arg-type]
              static_peers=(f"tcp://127.0.0.1:{port}",), **kw) as b:
        wait_until(lambda: (b.peers.get(a_id) is not None and b.peers.state(a_id) is not PeerState.GONE), 10, what="a joined")
        a.close()
        wait_until(lambda: not (b.peers.get(a_id) is not None and b.peers.state(a_id) is not PeerState.GONE), 10, what="a gone")
        # restarted on the same port (before: a new port each start, so b's static peer
        # pointed nowhere)
        with Node(data_dir=tmp_path / "a", name="a", port=port, **kw):  # type: ignore[arg-type]
            wait_until(lambda: (b.peers.get(a_id) is not None and b.peers.state(a_id) is not PeerState.GONE), 10, what="a back")


def test_the_control_port_from_the_environment_and_bad_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.errors import ConfigError

    port = _free_port()
    monkeypatch.setenv("ZEROMESH_PORT", str(port))
    with _node(tmp_path / "e") as n:
        assert f"tcp://127.0.0.1:{port}" in n.info().endpoints["control"]
    monkeypatch.setenv("ZEROMESH_PORT", "99999")
    with pytest.raises(ConfigError, match="ZEROMESH_PORT"):
        _node(tmp_path / "f")
    monkeypatch.delenv("ZEROMESH_PORT")
    with pytest.raises(ConfigError, match="port must be"):
        Node(data_dir=tmp_path / "g", port=70000, mdns=False)
