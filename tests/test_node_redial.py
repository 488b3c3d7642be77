"""A peer that restarts with new data ports is found again through its control port.

The deployment story for networks without multicast: a node has a fixed control port
(``--port``) that others name in ``--peer``/``static_peers``, and its data endpoints move inside
a port range (``--data-ports``). Here the peer is a real ``mesh`` process, SIGKILLed (no BYE, no
goodbye) and started again on the same data dir and control port with a *disjoint* data-port
range, so nothing it had bound before is bound again. The test's node must re-dial the control
port, learn the new data endpoints from HELLO, and use them: a service answers again, a
durable stream continues with the events published after the restart.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from mesh.node import Node
from patterns.pubsub import Publisher, Start, Subscriber
from patterns.reqrep import Client, ClientConfig
from tests.util import REPO, ctrl, unique, wait_until


def _free_range(n: int, avoid: range | None = None) -> range:
    """``n`` consecutive tcp ports that are free now (asked of the OS: each is bound once)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        ports = range(base, base + n)
        if ports.stop > 65535 or (avoid is not None and set(ports) & set(avoid)):
            continue
        socks = []
        try:
            for p in ports:
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return ports
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port range")


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


class Proc:
    """A ``mesh`` command as a real process (its own ipc dir), killed at the end."""

    def __init__(self, ipc: Path, *args: str, stdin: bool = False) -> None:
        env = dict(os.environ, ZEROMESH_IPC_DIR=str(ipc), PYTHONPATH=str(REPO))
        self.p = subprocess.Popen([sys.executable, "-m", "mesh", *args], cwd=REPO, env=env,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)

    @property
    def stdin(self) -> IO[str]:
        assert self.p.stdin is not None
        return self.p.stdin

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)
        if self.p.stdin is not None:
            self.p.stdin.close()
        assert self.p.stderr is not None
        self.p.stderr.close()


@pytest.fixture
def mesh_and_port(tmp_path: Path) -> Iterator[tuple[str, int, Node]]:
    mesh = unique("redial")
    port = _free_range(1)[0]
    with Node(data_dir=tmp_path / "here", name="here", mesh=mesh, mdns=False,
              interface="127.0.0.1", static_peers=(f"tcp://127.0.0.1:{port}",)) as nd:
        yield mesh, port, nd


def _data_ports(nd: Node, peer_name: str, role: str) -> set[int]:
    """The tcp ports of ``role`` that ``nd`` knows for its peer named ``peer_name``."""
    for p in nd.peers.list():
        if p.name == peer_name:
            return {_port(e) for e in p.endpoints.get(role, ()) if e.startswith("tcp://")}
    return set()


def _node_args(tmp: Path, mesh: str, port: int, ports: range, name: str) -> list[str]:
    return ["--data-dir", str(tmp / name), "--mesh", mesh, "--no-mdns", "--interface",
            "127.0.0.1", "--name", name, "--port", str(port),
            "--data-ports", f"{ports.start}-{ports.stop - 1}"]


def test_service_restarted_on_new_data_ports_is_called_again(
        tmp_path: Path, ipc_dir: Path, mesh_and_port: tuple[str, int, Node]) -> None:
    mesh, port, here = mesh_and_port
    first = _free_range(4)
    second = _free_range(4, avoid=first)
    svc = unique("svc")
    role = f"rpc.{svc}"
    calls = Client(here, config=ClientConfig(timeout=20.0))
    try:
        a = Proc(ipc_dir, "serve", svc, *_node_args(tmp_path, mesh, port, first, "there"))
        try:
            assert calls.request(svc, b"one") == b"one"
            assert _data_ports(here, "there", role) <= set(first)
        finally:
            a.kill()
        b = Proc(ipc_dir, "serve", svc, *_node_args(tmp_path, mesh, port, second, "there"))
        try:
            # SIGKILL said nothing: the peer is found again through its fixed control port,
            # and its HELLO names the new data endpoint, which nothing of the first run had.
            wait_until(lambda: bool(_data_ports(here, "there", role))
                       and _data_ports(here, "there", role) <= set(second), 30,
                       what=lambda: f"ports {_data_ports(here, 'there', role)}")
            assert calls.request(svc, b"two") == b"two"
        finally:
            b.kill()
    finally:
        calls.close()


def test_durable_stream_continues_after_publisher_restarts_on_new_data_ports(
        tmp_path: Path, ipc_dir: Path, mesh_and_port: tuple[str, int, Node]) -> None:
    mesh, port, here = mesh_and_port
    first = _free_range(4)
    second = _free_range(4, avoid=first)
    topic = unique("redial") + ".s"
    got: list[Any] = []
    with Subscriber(here, topic, durable=unique("d"), start=Start.beginning()) as sub:

        def pull(n: int) -> bool:
            got.extend(e.data for e in sub.recv_batch(timeout=0.05))
            return len(got) >= n

        pub_args = ["pub", topic, "-", "--lines", "--linger", "60", "--wait", "30"]
        a = Proc(ipc_dir, *pub_args, *_node_args(tmp_path, mesh, port, first, "pubr"),
                 stdin=True)
        try:
            a.stdin.write("a\nb\n")
            a.stdin.flush()
            wait_until(lambda: pull(2), 30, what=lambda: f"got {got}")
        finally:
            a.kill()
        b = Proc(ipc_dir, *pub_args, *_node_args(tmp_path, mesh, port, second, "pubr"),
                 stdin=True)
        try:
            b.stdin.write("c\n")
            b.stdin.flush()
            wait_until(lambda: pull(3), 30, what=lambda: f"got {got}, ports "
                       f"{_data_ports(here, 'pubr', 'pubsub')}")
            assert got == [b"a", b"b", b"c"]
            assert _data_ports(here, "pubr", "pubsub") <= set(second)
        finally:
            b.kill()


def test_a_killed_publishers_data_port_taken_by_another_node_is_used(tmp_path: Path,
                                                                    ipc_dir: Path) -> None:
    """Two nodes on one host share a data-port range. One is SIGKILLed (no BYE: it stays in the
    peer table until presence gives up on it) and the other binds the port it had. The
    subscriber's connection to that port belongs to the dead one; the live one must still be
    heard there, once the dead one is no longer JOINED."""
    mesh = unique("shared")
    port = _free_range(1)[0]
    shared = _free_range(1)
    topic = unique("shared") + ".s"
    got: list[Any] = []
    # tcp only: on one host ipc would be used, and ipc paths are per node id
    with Node(data_dir=tmp_path / "here", name="here", mesh=mesh, mdns=False,
              interface="127.0.0.1", transports=("tcp",),
              static_peers=(f"tcp://127.0.0.1:{port}",)) as here, \
            Subscriber(here, topic, start=Start.beginning()) as sub:

        def pull(want: Any) -> bool:
            got.extend(e.data for e in sub.recv_batch(timeout=0.05))
            return want in got

        a = Proc(ipc_dir, "pub", topic, "-", "--lines", "--linger", "60", "--wait", "30",
                 *_node_args(tmp_path, mesh, port, shared, "first"), stdin=True)
        try:
            a.stdin.write("from-first\n")
            a.stdin.flush()
            wait_until(lambda: pull(b"from-first"), 30, what=lambda: f"got {got}")
        finally:
            a.kill()
        with Node(data_dir=tmp_path / "second", name="second", mesh=mesh, mdns=False,
                  interface="127.0.0.1", static_peers=(ctrl(here),),
                  data_ports=(shared.start, shared.start)) as other, Publisher(other, topic) as pub:
            assert _port(next(e for e in pub.endpoints if e.startswith("tcp://"))) \
                    == shared.start
            wait_until(lambda: any(p.node_id == other.id for p in here.peers.list()), 10,
                       what="the second node joined")
            pub.publish("from-second")
            wait_until(lambda: pull("from-second"), 30,
                       what=lambda: f"got {got}, stats {sub.stats()}")
            # ... and live, on a data connection of its own (a first replay over the
            # control channel can bring the first event without one)
            pub.publish("live")
            wait_until(lambda: pull("live"), 30,
                       what=lambda: f"got {got}, stats {sub.stats()}")
            assert sub.stats().messages > 0
