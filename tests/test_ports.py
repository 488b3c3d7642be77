"""PortBook: the recorded port of each role, bound again at the next start when free.

Real ZeroMQ sockets binding real loopback ports; the book's file is real (a damaged one is
written by the test).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh.errors import ConfigError
from mesh.ports import PORTS_FILE, PortBook, parse_port_range
from tests.util import wait_until


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def _free_range(n: int) -> tuple[int, int]:
    """``n`` consecutive ports free now (each asked of the OS once)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        held = []
        try:
            for p in range(base, base + n):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", p))
            return base, base + n - 1
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no free port range")


def _wait_free(*ports: int) -> None:
    """Until each port can be bound again (a closed zmq socket's listener goes in its I/O
    thread, a moment after close())."""
    def free() -> bool:
        for port in ports:
            with socket.socket() as t:
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    return False
        return True

    wait_until(free, 5, what=f"ports {ports} free again")


def _bind(ctx: zmq.Context[Any], book: PortBook, role: str) -> tuple[zmq.Socket[Any], int]:
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    return s, book.bind_tcp(s, "127.0.0.1", role)


def test_each_role_gets_its_recorded_port_back(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    book = PortBook(tmp_path, None, None)
    socks = [_bind(ctx, book, r) for r in ("control", "pubsub", "rpc.echo")]
    first = {r: p for r, (_, p) in zip(("control", "pubsub", "rpc.echo"), socks, strict=True)}
    for s, _ in socks:
        s.close(0)
    _wait_free(*first.values())
    again = PortBook(tmp_path, None, None)  # the next start
    assert again.recorded() == first
    socks = [_bind(ctx, again, r) for r in ("rpc.echo", "pubsub", "control")]
    assert {r: p for r, (_, p) in zip(("rpc.echo", "pubsub", "control"), socks, strict=True)} \
        == first
    for s, _ in socks:
        s.close(0)


def test_a_taken_recorded_port_moves_inside_the_range(tmp_path: Path,
                                                      ctx: zmq.Context[Any]) -> None:
    lo, hi = _free_range(3)
    book = PortBook(tmp_path, (lo, hi), None)
    s, port = _bind(ctx, book, "pubsub")
    s.close(0)
    squat = socket.socket()
    squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds

    def squatted() -> bool:  # the zmq socket's listener closes in its I/O thread, soon
        try:
            squat.bind(("127.0.0.1", port))
        except OSError:
            return False
        squat.listen()
        return True

    wait_until(squatted, 5, what="the closed socket's port free again")
    with squat:
        s, moved = _bind(ctx, PortBook(tmp_path, (lo, hi), None), "pubsub")
        s.close(0)
    assert moved != port and lo <= moved <= hi
    assert PortBook(tmp_path, (lo, hi), None).recorded()["pubsub"] == moved


def test_a_recorded_port_outside_a_new_range_is_not_used(tmp_path: Path,
                                                         ctx: zmq.Context[Any]) -> None:
    s, port = _bind(ctx, PortBook(tmp_path, None, None), "pubsub")
    s.close(0)
    lo, hi = _free_range(2)
    while lo <= port <= hi:
        lo, hi = _free_range(2)
    s, now = _bind(ctx, PortBook(tmp_path, (lo, hi), None), "pubsub")
    s.close(0)
    assert lo <= now <= hi


def test_two_binds_of_one_role_and_the_range_exhausted(tmp_path: Path,
                                                       ctx: zmq.Context[Any]) -> None:
    lo, hi = _free_range(2)
    book = PortBook(tmp_path, (lo, hi), None)
    a, pa = _bind(ctx, book, "pubsub")
    b, pb = _bind(ctx, book, "pubsub")
    assert {pa, pb} == {lo, hi}
    assert set(book.recorded()) == {"pubsub", "pubsub#1"}
    with pytest.raises(ConfigError, match=f"{lo}-{hi} is exhausted"):
        _bind(ctx, book, "rpc.x")
    a.close(0)
    b.close(0)


def test_a_fixed_control_port_is_not_taken_from_the_book(tmp_path: Path,
                                                          ctx: zmq.Context[Any]) -> None:
    lo, _ = _free_range(1)
    s, port = _bind(ctx, PortBook(tmp_path, None, lo), "control")
    s.close(0)
    assert port == lo


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"version": 9, "ports": {}}',
                                    b'{"version": 1, "ports": ["x"]}',
                                    b'{"version": 1, "ports": {"pubsub": 70000}}'])
def test_a_damaged_book_is_nothing_recorded(tmp_path: Path, ctx: zmq.Context[Any],
                                            damage: bytes,
                                            caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / PORTS_FILE).write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="mesh.ports"):
        book = PortBook(tmp_path, None, None)
    assert book.recorded() == {}
    assert len(caplog.records) <= 1
    s, port = _bind(ctx, book, "pubsub")  # the node still starts, on a fresh port
    s.close(0)
    assert PortBook(tmp_path, None, None).recorded() == {"pubsub": port}


@pytest.mark.parametrize("bad", ["", "7400", "7400-", "a-b", "7500-7400", "0-10", "1-65536",
                                 [1], [1, "2"], (3, 2)])
def test_malformed_ranges_are_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError, match="data_ports"):
        parse_port_range(bad)
