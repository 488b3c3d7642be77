"""Discovery across real interfaces: nodes in network namespaces on a veth bridge."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.test_discovery import unique_type
from tests.util import unique, wait_until

pytestmark = pytest.mark.netns

_why = netns.available()


@pytest.fixture
def lab() -> Iterator[netns.NetnsLab]:
    if _why is not None:
        pytest.skip(f"no network namespaces here: {_why}")
    lab = netns.NetnsLab(3)
    yield lab
    lab.close()


class NsChild:
    def __init__(self, lab: netns.NetnsLab, i: int, *args: str) -> None:
        self.proc = lab.popen(i, ["-m", "tests.discovery_child", "--interface", lab.addr(i),
                                  *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self.events.append(json.loads(line))

    def upserts_of(self, node_id: str) -> int:
        with self.lock:
            return sum(1 for e in self.events if e["event"] == "upsert" and e["id"] == node_id)

    def live(self) -> set[str]:
        """Peers whose last presence event is joined/changed/evasive (real nodes)."""
        state: dict[str, str] = {}
        with self.lock:
            for e in self.events:
                if e["event"] in ("joined", "changed", "evasive", "left"):
                    state[e["id"]] = e["event"]
        return {i for i, ev in state.items() if ev != "left"}

    def seen(self) -> set[str]:
        with self.lock:
            return {e["id"] for e in self.events if e["event"] == "upsert"}

    @property
    def id(self) -> str:
        def ready() -> str | None:
            with self.lock:
                return next((e["id"] for e in self.events if e["event"] == "ready"), None)
        return wait_until(ready, 10, what="child ready")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        if self.proc.poll() is None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_discovery_across_namespaces_survives_link_down_and_up(lab: netns.NetnsLab) -> None:
    stype, mesh = unique_type(), unique("ns")
    # Node 1 does not re-announce periodically: it is heard again after the link returns only
    # because it notices its link came up (RFC 6762 8.3). Nodes 2 and 3 re-announce every
    # second, which shows the partition: node 2 keeps hearing 3 but not 1.
    kids = [NsChild(lab, i, "--mesh", mesh, "--service-type", stype, "--name", f"n{i}",
                    *(["--reannounce", "1"] if i > 1 else [])) for i in (1, 2, 3)]
    try:
        ids = [k.id for k in kids]
        for k, own in zip(kids, ids, strict=True):
            wait_until(lambda k=k, own=own: k.seen() == set(ids) - {own}, 5,
                       what="all peers discovered across the bridge")
        _n1, n2, n3 = kids
        # Partition node 1: while its port is down node 2 keeps hearing node 3's
        # re-announcements but nothing from node 1.
        lab.link(1, up=False)
        base1, base3 = n2.upserts_of(ids[0]), n2.upserts_of(ids[2])
        wait_until(lambda: n2.upserts_of(ids[2]) >= base3 + 2, 6,
                   what="re-announcements of node 3 still arrive")
        assert n2.upserts_of(ids[0]) <= base1 + 1  # at most one in flight when the link went
        frozen = n2.upserts_of(ids[0])
        wait_until(lambda: n2.upserts_of(ids[2]) >= base3 + 3, 6)
        assert n2.upserts_of(ids[0]) == frozen, "heard node 1 through a downed link"
        # Link back: node 1's next re-announcement reaches both peers again.
        lab.link(1, up=True)
        wait_until(lambda: n2.upserts_of(ids[0]) > frozen, 5, what="node 1 heard again")
        wait_until(lambda: n3.upserts_of(ids[0]) > 1, 5)
        # Node 1 browsed afresh on link-up: it re-reported its peers.
        wait_until(lambda: _n1.upserts_of(ids[1]) > 1, 5)
    finally:
        for k in kids:
            k.stop()
    for k in kids:
        assert k.proc.returncode == 0, k.proc.stderr.read() if k.proc.stderr else ""
    stats = next(e for e in _n1.events if e["event"] == "stats")
    assert stats["link_changes"] >= 1 and stats["reannounced"] == 0
    assert stats["malformed"] == 0


def _node_available() -> bool:
    try:
        import mesh.node  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _node_available(), reason="mesh.node not built yet")
def test_presence_across_namespaces_gone_while_link_down(
    lab: netns.NetnsLab, tmp_path: Path
) -> None:
    """Real nodes: presence (the node's heartbeats) says LEFT while the link is down and
    JOINED again after it returns; discovery brings the peers back together.

    tcp only: the namespaces share one filesystem and one host id, so nodes would otherwise
    prefer ipc, which does not cross the veth link at all."""
    stype, mesh = unique_type(), unique("nsp")
    kids = [NsChild(lab, i, "--mesh", mesh, "--service-type", stype, "--name", f"n{i}",
                    "--node", str(tmp_path / f"n{i}"), "--heartbeat", "0.2", "--tcp-only")
            for i in (1, 2, 3)]
    try:
        ids = [k.id for k in kids]
        for k, own in zip(kids, ids, strict=True):
            wait_until(lambda k=k, own=own: k.live() == set(ids) - {own}, 5,
                       what="all joined across the bridge")
        n1, n2, n3 = kids
        lab.link(1, up=False)
        # gone_s is 6 heartbeats = 1.2 s.
        wait_until(lambda: ids[0] not in n2.live() and ids[0] not in n3.live(), 5,
                   what=f"node 1 gone while its link is down: {n2.events}")
        wait_until(lambda: not n1.live(), 5, what="node 1 sees everyone gone")
        assert n2.live() == {ids[2]}
        lab.link(1, up=True)
        for k, own in zip(kids, ids, strict=True):
            wait_until(lambda k=k, own=own: k.live() == set(ids) - {own}, 5,
                       what="joined again after the link returned")
    finally:
        for k in kids:
            k.stop()
    for k in kids:
        assert k.proc.returncode == 0, k.proc.stderr.read() if k.proc.stderr else ""
