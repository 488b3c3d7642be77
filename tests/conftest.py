"""Fixtures shared by every test."""

from __future__ import annotations

import os
import subprocess
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
