"""mDNS discovery with real zeroconf on 127.0.0.1 and real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from mesh.discovery import ENV_INTERFACE, DiscoveryConfig, MdnsDiscovery, choose_interfaces
from mesh.errors import ConfigError
from tests.discovery_child import StandInConfig, StandInNode
from tests.util import REPO, unique, wait_until

LO = "127.0.0.1"


def unique_type() -> str:
    return f"_zm-{uuid.uuid4().hex[:8]}._tcp.local."


class Child:
    """A discovery child process and the JSON events it printed."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.discovery_child", *args], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == kind]

    @property
    def id(self) -> str:
        ready = wait_until(lambda: self.of("ready"), 10, what="child ready")
        return str(ready[0]["id"])

    def sees(self) -> set[str]:
        seen: set[str] = set()
        for e in self.of("upsert") + self.of("goodbye"):
            if e["event"] == "upsert":
                seen.add(e["id"])
        for e in self.of("goodbye"):
            seen.discard(e["id"])
        return seen

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        if self.proc.poll() is None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        stats = self.of("stats")
        return stats[0] if stats else {}


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


@pytest.fixture
def discoveries() -> Iterator[list[MdnsDiscovery]]:
    made: list[MdnsDiscovery] = []
    yield made
    for d in made:
        d.close()


def start(made: list[MdnsDiscovery], node: StandInNode, stype: str,
          **kw: Any) -> MdnsDiscovery:
    d = MdnsDiscovery(node, DiscoveryConfig(service_type=stype, **kw))
    made.append(d)
    d.start()
    return d


@pytest.mark.parametrize("n", [2, 3])
def test_processes_discover_each_other(children: list[Child], n: int) -> None:
    stype, mesh = unique_type(), unique("mesh")
    for i in range(n):
        children.append(Child("--mesh", mesh, "--name", f"c{i}", "--service-type", stype,
                              "--interface", LO))
    ids = {c.id for c in children}
    for c in children:
        wait_until(lambda c=c: c.sees() == ids - {c.id}, 5, what="every peer discovered")
    # A clean stop says goodbye: the others drop it.
    first = children[0]
    stats = first.stop()
    assert stats["registered"] == 1 and stats["malformed"] == 0
    for c in children[1:]:
        wait_until(lambda c=c: first.id not in c.sees(), 5, what="goodbye seen")


def test_meshes_on_one_host_do_not_mix(discoveries: list[MdnsDiscovery]) -> None:
    stype = unique_type()
    mesh_a, mesh_b = unique("a"), unique("b")
    a1, a2 = StandInNode(mesh=mesh_a, name="a1"), StandInNode(mesh=mesh_a, name="a2")
    b1 = StandInNode(mesh=mesh_b, name="b1")
    da1 = start(discoveries, a1, stype)
    for node in (a2, b1):
        start(discoveries, node, stype)
    wait_until(lambda: a1.peers.ids() == {a2.id} and a2.peers.ids() == {a1.id}, 5)
    wait_until(lambda: da1.stats()["ignored_other_mesh"] >= 1, 5)
    assert b1.peers.ids() == set()
    assert b1.id not in a1.peers.ids() | a2.peers.ids()
    assert da1.stats()["ignored_self"] >= 1


def test_update_reaches_peers_and_close_says_goodbye(discoveries: list[MdnsDiscovery]) -> None:
    stype, mesh = unique_type(), unique("m")
    a, b = StandInNode(mesh=mesh, name="a"), StandInNode(mesh=mesh, name="b")
    da = start(discoveries, a, stype)
    db = start(discoveries, b, stype)
    wait_until(lambda: a.id in b.peers.ids(), 5)
    a.offers = {"stream": ("temps",), "service": ("echo",)}
    da.update()
    wait_until(lambda: b.peers.known.get(a.id) is not None
               and b.peers.known[a.id].offers.get("stream") == ("temps",), 5, what="update seen")
    assert b.peers.known[a.id].offers["service"] == ("echo",)
    da.close()
    da.close()  # idempotent
    wait_until(lambda: a.id in b.peers.gone, 5, what="goodbye after close")
    assert db.stats()["goodbyes"] == 1


def test_truncated_record_is_announced_with_more(discoveries: list[MdnsDiscovery]) -> None:
    stype, mesh = unique_type(), unique("m")
    big = StandInNode(mesh=mesh, name="big",
                      offers={"stream": tuple(f"sensor-stream-{i:05d}" for i in range(300))})
    watcher = StandInNode(mesh=mesh, name="w")
    dbig = start(discoveries, big, stype)
    start(discoveries, watcher, stype)
    wait_until(lambda: big.id in watcher.peers.ids(), 5)
    got = watcher.peers.known[big.id].offers["stream"]
    assert 0 < len(got) < 300
    assert watcher.peers.known[big.id].endpoints == big.endpoints
    assert dbig.stats()["truncated"] == 1 and dbig.stats()["txt_bytes"] <= 1000


def test_peer_heard_again_is_reupserted(discoveries: list[MdnsDiscovery]) -> None:
    stype, mesh = unique_type(), unique("m")
    a, b = StandInNode(mesh=mesh, name="a"), StandInNode(mesh=mesh, name="b")
    da = start(discoveries, a, stype, reannounce_interval=1.0)
    db = start(discoveries, b, stype)
    wait_until(lambda: a.id in b.peers.ids(), 5)
    before = b.peers.upserts
    wait_until(lambda: da.stats()["reannounced"] >= 1, 5, what="re-announcement sent")
    wait_until(lambda: b.peers.upserts > before, 5, what="re-upsert on re-announcement")
    assert db.stats()["refreshes"] >= 1


MALFORMED: dict[str, dict[bytes, bytes | None]] = {
    "missing-id": {b"v": b"1", b"mesh": b"M", b"name": b"x"},
    "wrong-version": {b"v": b"9", b"mesh": b"M", b"id": b"a" * 32, b"name": b"x"},
    "bad-key": {b"v": b"1", b"mesh": b"M", b"id": b"b" * 32, b"name": b"x", b"pk": b"short"},
    "non-utf8": {b"v": b"1", b"mesh": b"M", b"id": b"c" * 32, b"name": b"\xff\xfe"},
    "no-value": {b"v": b"1", b"mesh": b"M", b"id": b"d" * 32, b"name": None},
    "oversize": {b"v": b"1", b"mesh": b"M", b"id": b"e" * 32, b"name": b"x",
                 **{f"pad{i}".encode(): b"z" * 200 for i in range(7)}},
}


def test_malformed_records_are_ignored_and_counted(
    discoveries: list[MdnsDiscovery], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="mesh.discovery")
    stype, mesh = unique_type(), unique("m")
    node = StandInNode(mesh=mesh, name="victim")
    d = start(discoveries, node, stype)
    zc = Zeroconf(interfaces=[LO], ip_version=IPVersion.V4Only)
    try:
        for label, props in MALFORMED.items():
            props = {k: (mesh.encode() if v == b"M" else v) for k, v in props.items()}
            info = ServiceInfo(stype, f"{label}.{stype}", port=9, properties=props,
                               server=f"{label}.local.", parsed_addresses=[LO])
            zc.register_service(info, cooperating_responders=True)
        good = StandInNode(mesh=mesh, name="good")
        start(discoveries, good, stype)
        wait_until(lambda: d.stats()["malformed"] >= len(MALFORMED), 5,
                   what=f"malformed counted: {d.stats()}")
        wait_until(lambda: node.peers.ids() == {good.id}, 5)
        assert d.stats()["callback_errors"] == 0
        logged = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
        for label in MALFORMED:  # one line per bad record, however often it was heard
            assert sum(f" {label}.{stype}" in m for m in logged) == 1, label
    finally:
        zc.close()


def test_bad_interface_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_INTERFACE, "no-such-if0")
    with pytest.raises(ConfigError, match="no-such-if0"):
        choose_interfaces(None)
    node = StandInNode(mesh="m", config=StandInConfig(interface=None))
    with pytest.raises(ConfigError):
        MdnsDiscovery(node, DiscoveryConfig(service_type=unique_type())).start()
    with pytest.raises(ConfigError):
        DiscoveryConfig(service_type="bogus")


def test_interface_choice_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_INTERFACE, raising=False)
    assert choose_interfaces(None) is None
    assert choose_interfaces("all") is None
    monkeypatch.setenv(ENV_INTERFACE, "lo")
    assert choose_interfaces(None) == [LO]  # an interface name resolves to its address
    assert choose_interfaces("127.0.0.1,127.0.0.1") == [LO]  # config beats env
    assert choose_interfaces("lo", ("10.9.9.9",)) == ["10.9.9.9"]  # explicit beats config


def test_cli_peers_json_lists_announced_nodes(discoveries: list[MdnsDiscovery]) -> None:
    stype, mesh = unique_type(), unique("m")
    a = StandInNode(mesh=mesh, name="alpha", offers={"queue": ("jobs",)})
    b = StandInNode(mesh=mesh, name="beta")
    other = StandInNode(mesh=unique("other"), name="gamma")
    for node in (a, b, other):
        start(discoveries, node, stype)
    wait_until(lambda: a.id in b.peers.ids(), 5)  # announcements are out
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "mesh", "peers", "--json", "--timeout", "2", "--mesh", mesh,
         "--interface", LO, "--service-type", stype],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, timeout=20,
        check=True)
    assert time.monotonic() - t0 < 10
    rows = json.loads(out.stdout)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {a.id, b.id}
    assert by_id[a.id]["name"] == "alpha" and by_id[a.id]["offers"] == {"queue": ["jobs"]}
    assert by_id[a.id]["endpoints"]["control"] == list(a.endpoints["control"])
    assert by_id[a.id]["state"] == "announced" and by_id[a.id]["last_seen"] > 0


def _node_or_skip() -> Any:
    try:
        from mesh import node
    except ImportError:
        pytest.skip("mesh.node not built yet")
    return node


def test_real_nodes_discover_each_other_and_exchange(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_mod = _node_or_skip()
    monkeypatch.setenv("ZEROMESH_SERVICE_TYPE", unique_type())
    mesh = unique("real")
    a = node_mod.Node(data_dir=tmp_path / "a", name="a", mesh=mesh, interface=LO, mdns=True)
    try:
        b = node_mod.Node(data_dir=tmp_path / "b", name="b", mesh=mesh, interface=LO, mdns=True)
        try:
            got: list[Any] = []
            b.handle("disc-test", lambda peer, body: got.append((peer, body)))

            def live(n: Any) -> set[str]:
                return {r.info.node_id for r in n.peers.records() if r.state.value == "joined"}

            wait_until(lambda: live(a) == {b.id} and live(b) == {a.id}, 5, what="joined")
            a.send(b.id, "disc-test", {"hello": 1})
            wait_until(lambda: got, 5, what="control message delivered")
            assert got[0][0] == a.id
            assert a._discovery.stats()["upserts"] >= 1
        finally:
            b.close()
        wait_until(lambda: b.id not in live(a), 5, what="b gone after close")
    finally:
        a.close()
