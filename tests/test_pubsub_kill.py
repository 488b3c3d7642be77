"""Pub/sub under SIGKILL: real child processes, real sockets, real files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import REPO, ctrl, make_node, unique, wait_until

CHILD = os.path.join(REPO, "tests", "pubsub_child.py")


def child(*args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, CHILD, *args], env=env, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture
def mesh_name() -> str:
    return unique("ps")




def read_lines(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    out = []
    text = path.read_text()
    # A child appends each line with one write(); a read while that write copies in can see
    # part of it: only what ends in a newline is a line yet (it is whole at the next read).
    for line in text[:text.rfind("\n") + 1].splitlines():
        i, s, d = line.split()
        out.append((i, int(s), int(d)))
    return out



def test_subscriber_killed_many_times_gets_everything_once_in_order(
        tmp_path: Path, mesh_name: str, procs: list[subprocess.Popen[bytes]]) -> None:
    n = 20_000
    out = tmp_path / "out.txt"
    rng = random.Random(7)
    with make_node(tmp_path / "pub", mesh_name) as nd, Publisher(nd, "k.s", heartbeat_s=0.1) as pub:
        stop = threading.Event()

        def publish() -> None:
            # A long run: about 4 s of steady publishing while the subscriber is killed.
            for i in range(0, n, 50):
                pub.publish_many(range(i, i + 50), type="tick")
                time.sleep(0.01)  # pacing the producer, not waiting for an outcome
                if stop.is_set():
                    return

        th = threading.Thread(target=publish)
        th.start()
        kills = 0
        try:
            args = ("sub", str(tmp_path / "sub"), mesh_name, ctrl(nd), "k.", "agg", str(n),
                    str(out))
            while kills < 8:
                p = child(*args)
                procs.append(p)
                # Kill it at a random moment once it made some progress.
                target = len(read_lines(out)) + rng.randint(1, 2000)
                wait_until(lambda p=p, t=target: len(read_lines(out)) > t
                           or p.poll() is not None, timeout=20, what="subscriber progress")
                if p.poll() is not None:
                    break
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=10)
                kills += 1
            p = child(*args)
            procs.append(p)
            assert p.wait(timeout=60) == 0
        finally:
            stop.set()
            th.join()
        assert kills >= 5
        lines = read_lines(out)
        seen: dict[str, int] = {}
        order = []
        for i, s, d in lines:
            assert s == d  # data is exactly what was published under that seq
            if i not in seen:
                seen[i] = s
                order.append(s)
        assert order == list(range(n))
        assert len(lines) >= n  # at-least-once: some redelivered after kills, deduped above


def test_publisher_killed_and_restarted_loses_nothing_acked(
        tmp_path: Path, mesh_name: str, procs: list[subprocess.Popen[bytes]]) -> None:
    with make_node(tmp_path / "sub", mesh_name) as nd, Subscriber(
            nd, "p.s", start=Start.beginning()) as sub:
        pdir = str(tmp_path / "pub")
        p = child("pub", pdir, mesh_name, ctrl(nd), "p.s", "0", "1000000",
                  stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None
        acked = -1
        while acked < 3000:
            line = p.stdout.readline()
            assert line.startswith(b"ACK"), line
            acked = int(line.split()[1])
        p.send_signal(signal.SIGKILL)
        # Everything printed before the kill was acknowledged by publish().
        rest = p.stdout.read()
        p.wait(timeout=10)
        for line in rest.splitlines():
            if line.startswith(b"ACK"):
                acked = max(acked, int(line.split()[1]))
        p2 = child("pub", pdir, mesh_name, ctrl(nd), "p.s", "5000000", "500",
                   stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        procs.append(p2)
        assert p2.stdout is not None
        first2 = int(p2.stdout.readline().split()[1])
        assert first2 > acked  # the seq continues without reuse
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + 30
        while (not got or got[-1][0] < first2 + 499) and time.monotonic() < deadline:
            ev = sub.recv(timeout=1.0)
            if ev is not None:
                assert ev.seq is not None
                got.append((ev.seq, ev.data))
        seqs = [s for s, _ in got]
        assert got, (sub.stats(), nd.peers.list(), sub._connected)
        assert seqs == list(range(first2 + 500))  # in order, no hole, no duplicate
        assert all(d == s for s, d in got[:acked + 1])
        assert [d for _, d in got[first2:]] == list(range(5_000_000, 5_000_500))
        assert p2.stdin is not None
        p2.stdin.close()
        assert p2.wait(timeout=10) == 0
