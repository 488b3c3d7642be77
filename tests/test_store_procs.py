"""Replicated streams with real processes: publisher, stores and subscribers are child
processes (tests/store_child.py) on real sockets and real files, killed with SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.node import Node, PresenceConfig
from tests.util import REPO, ctrl, unique, wait_until

CHILD = os.path.join(REPO, "tests", "store_child.py")
N = 10_000


class Child:
    """A child process whose stdout lines are collected by a reader thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, CHILD, *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())

    def has(self, prefix: str) -> str | None:
        return next((x for x in reversed(self.lines) if x.startswith(prefix)), None)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Node]:
    """The test's own node: the static peer every child dials (it holds nothing). Its
    presence is short, as the children's are, so a killed child is gone from its table in
    about a second, not the default ten (what each test waits for before the next step)."""
    with Node(data_dir=tmp_path / "hub", name="hub", mesh=unique("st"), mdns=False,
              interface="127.0.0.1",
              presence=PresenceConfig(heartbeat_s=0.1, evasive_s=0.5, gone_s=1.5)) as nd:
        yield nd


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for c in started:
        if c.proc.poll() is None:
            c.kill()


def start(children: list[Child], *args: str) -> Child:
    c = Child(*args)
    children.append(c)
    return c


def read_out(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        _i, s, d = line.split()
        out.append((int(s), int(d)))
    return out


def test_subscriber_gets_everything_from_the_store_after_the_publisher_and_its_disk_are_gone(
        tmp_path: Path, hub: Node, children: list[Child]) -> None:
    stream = "plant.temps"
    peer = ctrl(hub)
    st = start(children, "store", str(tmp_path / "store"), hub.mesh, peer, "plant.")
    wait_until(lambda: st.has("READY"), 20, what="store up")
    pub_dir = tmp_path / "pub"
    pub = start(children, "pub", str(pub_dir), hub.mesh, peer, stream, "0", str(N), "1", "500")
    wait_until(lambda: pub.has("DONE"), 60, what=lambda: pub.lines[-3:])
    # replicas=1: every publish_many returned once the store held it durably.
    assert pub.has("ACK") == f"ACK {N - 1}"
    origin = (pub_dir / "node.id").read_text().strip()
    pub.kill()
    # The device is replaced: same identity (node.id), nothing else of the disk.
    shutil.rmtree(pub_dir)
    pub_dir.mkdir()
    (pub_dir / "node.id").write_text(origin + "\n")
    wait_until(lambda: not hub.who_offers("stream", name=stream), 20,
               what="the publisher left the mesh")

    out = tmp_path / "out.txt"
    sub_dir = str(tmp_path / "sub")
    sub = start(children, "sub", sub_dir, hub.mesh, peer, stream, "d1", str(N - 1), str(out))
    assert sub.proc.wait(timeout=60) == 0
    got = read_out(out)
    assert [s for s, _ in got] == list(range(N)), "every event once, in order, from the store"
    assert [d for _, d in got] == list(range(N))

    # The publisher restarts with an empty log: it continues after what the store holds,
    # under a new epoch, and its new events follow for the same durable subscriber.
    pub2 = start(children, "pub", str(pub_dir), hub.mesh, peer, stream, str(N), "50", "1",
                 "50")
    wait_until(lambda: pub2.has("DONE"), 60, what=lambda: pub2.lines[-3:])
    head_line = pub2.has("HEAD")
    assert head_line is not None and int(head_line.split()[1]) == N, head_line
    sub2 = start(children, "sub", sub_dir, hub.mesh, peer, stream, "d1", str(N + 49),
                 str(out))
    assert sub2.proc.wait(timeout=60) == 0
    got = read_out(out)
    tail = [x for x in got[N:] if x[0] >= N]
    assert tail == [(N + i, N + i) for i in range(50)], tail[:5]
    # At-least-once across the subscriber's restart: only events it had not committed come
    # again, and nothing of the old epoch is re-numbered.
    assert all(s < N for s, _ in got[N:len(got) - 50])
    pub2.stop()
    st.stop()


def replica_content(data_dir: Path, origin: str, stream: str) -> list[tuple[int, bytes]]:
    """Every (seq, envelope) a stopped store holds of ``origin``'s ``stream``."""
    from mesh.log import LogConfig
    from patterns.pubsub.store import _Replica

    rep = _Replica(data_dir / "replicas", origin, stream, LogConfig())
    try:
        out: list[tuple[int, bytes]] = []
        seq, head = rep.oldest or 0, rep.head or 0
        while seq < head:
            first, envs = rep.read(seq, 5000)
            out.extend((first + i, e) for i, e in enumerate(envs))
            seq = first + len(envs)
        return out
    finally:
        rep.close()


def held(child: Child, origin: str, stream: str) -> int:
    line = next((x for x in reversed(child.lines) if x.startswith(f"HOLD {origin} {stream} ")),
                None)
    return int(line.split()[3]) if line else -1


def test_two_stores_one_killed_mid_stream_converge_even_with_the_origin_gone(
        tmp_path: Path, hub: Node, children: list[Child]) -> None:
    stream, n, m = "line.speed", 6000, 1500
    peer = ctrl(hub)
    dirs = {k: tmp_path / k for k in ("a", "b")}
    a = start(children, "store", str(dirs["a"]), hub.mesh, peer, "line.")
    b = start(children, "store", str(dirs["b"]), hub.mesh, peer, "line.")
    wait_until(lambda: a.has("READY") and b.has("READY"), 20, what="stores up")
    pub_dir = tmp_path / "pub"
    pub = start(children, "pub", str(pub_dir), hub.mesh, peer, stream, "0", str(n), "1", "100")
    origin_path = pub_dir / "node.id"
    wait_until(lambda: origin_path.exists() and held(b, origin_path.read_text().strip(),
                                                     stream) >= 1000, 30,
               what=lambda: b.lines[-2:])
    origin = origin_path.read_text().strip()
    # 1. b is SIGKILLed while the stream is being published, and restarted: it catches up
    #    from the origin and both stores end with the same content.
    b.kill()
    b = start(children, "store", str(dirs["b"]), hub.mesh, peer, "line.")
    wait_until(lambda: pub.has("DONE"), 60, what=lambda: pub.lines[-2:])
    wait_until(lambda: held(a, origin, stream) == n and held(b, origin, stream) == n, 30,
               what=lambda: (held(a, origin, stream), held(b, origin, stream)))
    # 2. b is down while the origin (restarted: a new epoch) publishes m more, which only a
    #    holds; then the origin dies for good. b restarts and can only catch up from a.
    b.kill()
    pub.stop()
    pub = start(children, "pub", str(pub_dir), hub.mesh, peer, stream, str(n), str(m), "1",
                "100")
    wait_until(lambda: pub.has("DONE"), 60, what=lambda: pub.lines[-2:])
    wait_until(lambda: held(a, origin, stream) == n + m, 10, what="a holds all")
    pub.kill()
    wait_until(lambda: not hub.who_offers("stream", name=stream), 20, what="origin gone")
    b = start(children, "store", str(dirs["b"]), hub.mesh, peer, "line.")
    wait_until(lambda: held(b, origin, stream) == n + m, 30,
               what=lambda: (held(a, origin, stream), held(b, origin, stream)))
    a.stop()
    b.stop()
    ca, cb = (replica_content(dirs[k], origin, stream) for k in ("a", "b"))
    assert [s for s, _ in ca] == list(range(n + m))
    assert ca == cb  # identical content, byte for byte, under the origin's seqs
