"""Fixtures shared by every test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mesh.node import Node
from tests.util import unique, wait_until


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data directory for one node or log."""
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A fresh, short directory for ipc sockets (``ZEROMESH_IPC_DIR`` of a test's processes).

    Not under ``tmp_path``: a socket path must stay under 108 bytes, and a pytest-xdist
    worker's ``tmp_path`` is longer than the plain one.
    """
    d = Path(tempfile.mkdtemp(prefix="zmi-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def node_pair(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    """Two nodes of one fresh mesh on loopback (no mDNS), joined through a static peer."""
    a = Node(data_dir=tmp_path / "a", name="a", mesh=unique("m"), interface="127.0.0.1",
             mdns=False)
    ep = a.info().endpoints["control"][0]
    b = Node(data_dir=tmp_path / "b", name="b", mesh=a.mesh, interface="127.0.0.1", mdns=False,
             static_peers=(ep,))
    try:
        wait_until(lambda: a.peers.get(b.id) is not None and b.peers.get(a.id) is not None, 10,
                   what="nodes joined")
        yield a, b
    finally:
        b.close()
        a.close()


@pytest.fixture
def pair(node_pair: tuple[Node, Node]) -> tuple[Node, Node]:
    """``node_pair`` under the short name most pattern tests use."""
    return node_pair


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A ZeroMQ context whose teardown fails on sockets the test leaked instead of hanging."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    leaked = [s for s in list(ctx._sockets) if not s.closed]  # type: ignore[attr-defined]
    for s in leaked:
        s.close(linger=0)
    ctx.term()
    assert not leaked, f"test leaked {len(leaked)} socket(s)"


def pytest_report_header() -> str:
    return f"zmq {zmq.zmq_version()}, pyzmq {zmq.__version__}, pid {os.getpid()}"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes a test starts: killed (if still running) and reaped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


#: Tests that build network namespaces and root-namespace bridges (the chaos suite, the
#: netns lab): under pytest-xdist they all run on one worker, one after another, so two of
#: them never pick a subnet or sweep namespaces at the same time.
_NETNS_GROUP = ("chaos/", "test_discovery_netns.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path.as_posix()
        if item.get_closest_marker("netns") or any(p in path for p in _NETNS_GROUP):
            item.add_marker(pytest.mark.xdist_group("netns"))
