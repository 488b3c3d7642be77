"""The TXT record over real mDNS (python-zeroconf on 127.0.0.1): dotted role keys, RFC 6763
key rules read from the raw rdata, and records whose id is not their instance name.

Strangers' records are sent by a second real ``Zeroconf`` with hand-built TXT rdata
(``ServiceInfo(properties=<bytes>)`` puts those bytes on the wire as they are), so that
case-variant and repeated keys really travel, which a properties dict cannot express.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from mesh.discovery import DiscoveryConfig, MdnsBrowser, MdnsDiscovery
from mesh.txt import TxtRecord, pack_txt
from tests.discovery_child import StandInNode
from tests.test_discovery import unique_type
from tests.util import unique, wait_until

LO = "127.0.0.1"


@pytest.fixture
def stranger() -> Iterator[Any]:
    zc = Zeroconf(interfaces=[LO], ip_version=IPVersion.V4Only)
    yield zc
    zc.close()


@pytest.fixture
def discoveries() -> Iterator[list[MdnsDiscovery]]:
    made: list[MdnsDiscovery] = []
    yield made
    for d in made:
        d.close()


def start(made: list[MdnsDiscovery], node: StandInNode, stype: str) -> MdnsDiscovery:
    d = MdnsDiscovery(node, DiscoveryConfig(service_type=stype))
    made.append(d)
    d.start()
    return d


def announce(zc: Any, stype: str, label: str, strings: list[tuple[str, str | None]]) -> None:
    """Register a service named ``label`` whose TXT rdata is exactly ``strings``."""
    info = ServiceInfo(stype, f"{label}.{stype}", port=4999, properties=pack_txt(strings),
                       server=f"zm-{label[:12]}.local.", parsed_addresses=[LO])
    zc.register_service(info, cooperating_responders=True)


def base(mesh: str, node_id: str) -> list[tuple[str, str | None]]:
    return [("v", "1"), ("mesh", mesh), ("id", node_id), ("name", "stranger"),
            ("ep.control", "tcp://127.0.0.1:4999")]


def test_pipe_and_rpc_endpoints_travel_in_the_record(discoveries: list[MdnsDiscovery]) -> None:
    """Old code left the pipe.* and rpc.* endpoints out and announced more=1."""
    stype, mesh = unique_type(), unique("m")
    a = StandInNode(mesh=mesh, name="a", offers={"queue": ("jobs",), "service": ("echo",)})
    a.endpoints = {**a.endpoints, "pipe.jobs": ("tcp://127.0.0.1:41001",),
                   "rpc.echo": ("tcp://127.0.0.1:41002", f"ipc:///tmp/zm-{a.id[:8]}.rpc.echo")}
    watcher = StandInNode(mesh=mesh, name="w")
    da = start(discoveries, a, stype)
    start(discoveries, watcher, stype)
    wait_until(lambda: a.id in watcher.peers.ids(), 5, what="a discovered")
    got = watcher.peers.known[a.id]
    assert got.endpoints == a.endpoints
    assert got.offers == a.offers
    assert da.stats()["truncated"] == 0  # no more=1: nothing needs asking over HELLO


def test_real_node_with_a_queue_and_a_service_announces_their_endpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stranger: Any
) -> None:
    """A real Node, WorkQueue and Service; the record is read by a passive browser (what
    ``mesh peers`` uses)."""
    from mesh.node import Node
    from patterns.pipeline import WorkQueue
    from patterns.reqrep import Service

    stype = unique_type()
    monkeypatch.setenv("ZEROMESH_SERVICE_TYPE", stype)
    mesh = unique("real")
    seen: dict[str, TxtRecord] = {}
    browser = MdnsBrowser(stranger, service_type=stype, mesh=mesh,
                          on_peer=lambda rec: seen.__setitem__(rec.info.node_id, rec),
                          on_goodbye=lambda _id: None)
    browser.start()
    node = Node(data_dir=tmp_path / "a", name="a", mesh=mesh, interface=LO, mdns=True)
    try:
        with WorkQueue(node, "jobs") as q, Service(node, "echo", lambda req: req.payload) as s:

            def complete() -> bool:
                rec = seen.get(node.id)
                return rec is not None and {"pipe.jobs", "rpc.echo"} <= set(rec.info.endpoints)

            wait_until(complete, 5, what=lambda: f"queue and service endpoints in {seen}")
            rec = seen[node.id]
            assert not rec.truncated and rec.skipped == ()
            assert set(rec.info.endpoints["pipe.jobs"]) <= set(q.endpoints)
            assert set(rec.info.endpoints["rpc.echo"]) <= set(s.endpoints)
            assert rec.info.endpoints["pipe.jobs"] and rec.info.endpoints["rpc.echo"]
            assert browser.stats()["malformed"] == 0
    finally:
        browser.close()
        node.close()


def test_a_peer_record_with_dotted_role_keys_is_accepted(
    discoveries: list[MdnsDiscovery], stranger: Any
) -> None:
    """Old code dropped both records whole ("bad role name"; "missing v" for the second)."""
    stype, mesh = unique_type(), unique("m")
    victim = StandInNode(mesh=mesh, name="victim")
    d = start(discoveries, victim, stype)
    plain, mixed = uuid.uuid4().hex, uuid.uuid4().hex
    announce(stranger, stype, plain, [*base(mesh, plain),
                                      ("ep.pipe.jobs", "tcp://127.0.0.1:5001"),
                                      ("ep.rpc.echo", "tcp://127.0.0.1:5002"),
                                      ("inc", "3"),  # the incarnation (control 1.1)
                                      ("gen", "3")])  # an unknown (later) integer key
    announce(stranger, stype, mixed, [("V", "1"), ("Mesh", mesh), ("ID", mixed), ("Name", "x"),
                                      ("EP.Control", "tcp://127.0.0.1:5003"),
                                      ("Ep.Pipe.Jobs", "tcp://127.0.0.1:5004"),
                                      ("O.Queue", "Jobs"), ("more", None)])
    wait_until(lambda: victim.peers.ids() == {plain, mixed}, 5,
               what=lambda: f"both records accepted: {d.stats()}")
    p, m = victim.peers.known[plain], victim.peers.known[mixed]
    assert p.endpoints == {"control": ("tcp://127.0.0.1:4999",),
                           "pipe.jobs": ("tcp://127.0.0.1:5001",),
                           "rpc.echo": ("tcp://127.0.0.1:5002",)}
    assert m.endpoints == {"control": ("tcp://127.0.0.1:5003",),
                           "pipe.Jobs": ("tcp://127.0.0.1:5004",)}
    assert m.offers == {"queue": ("Jobs",)} and m.name == "x"
    assert p.incarnation == 3 and m.incarnation == 0
    st = d.stats()
    assert st["malformed"] == 0 and st["callback_errors"] == 0 and st["txt_skipped"] == 0


def test_a_record_whose_id_is_not_its_instance_name_is_refused(
    discoveries: list[MdnsDiscovery], stranger: Any
) -> None:
    """The first ``id`` by RFC 6763's rules decides: old code read only the lower-case key,
    so ``ID=<other>`` before ``id=<its name>`` was accepted; and a record naming our own id
    under another name was counted as ours (ignored_self), not as a forgery."""
    stype, mesh = unique_type(), unique("m")
    victim = StandInNode(mesh=mesh, name="victim")
    d = start(discoveries, victim, stype)
    case_first, repeated, plain, ours, good = (uuid.uuid4().hex for _ in range(5))
    other = uuid.uuid4().hex
    announce(stranger, stype, case_first,
             [("v", "1"), ("mesh", mesh), ("ID", other), ("id", case_first), ("name", "f"),
              ("ep.control", "tcp://127.0.0.1:4999")])
    announce(stranger, stype, repeated,
             [("v", "1"), ("mesh", mesh), ("id", other), ("id", repeated), ("name", "r"),
              ("ep.control", "tcp://127.0.0.1:4999")])
    announce(stranger, stype, plain, base(mesh, other))
    announce(stranger, stype, ours, base(mesh, victim.id))
    announce(stranger, stype, good, base(mesh, good))  # the control: it is accepted
    wait_until(lambda: d.stats()["ignored_name_mismatch"] >= 4 and good in victim.peers.ids(),
               5, what=lambda: f"four refused, one accepted: {d.stats()}")
    assert victim.peers.ids() == {good}
    st = d.stats()
    assert st["ignored_self"] <= 1  # our own announcement only, not the forged one
    assert st["malformed"] == 0 and st["callback_errors"] == 0
    assert st["services_held"] == 1


def test_skipped_txt_pieces_are_a_metrics_family(
    discoveries: list[MdnsDiscovery], stranger: Any
) -> None:
    """Old code counted them in stats() only: no /metrics family to alert on."""
    from mesh.metrics import Registry, render_prometheus

    stype, mesh = unique_type(), unique("m")
    victim = StandInNode(mesh=mesh, name="victim")
    d = start(discoveries, victim, stype)
    nid = uuid.uuid4().hex
    announce(stranger, stype, nid, [*base(mesh, nid), ("host", None),  # a bare host: skipped
                                    ("name", "again"),  # a repeated key: skipped
                                    ("ep.pubsub", "tcp://127.0.0.1:5001")])
    wait_until(lambda: nid in victim.peers.ids(), 5, what=lambda: f"accepted: {d.stats()}")
    assert d.stats()["txt_skipped"] >= 2  # 2 per resolution of the record
    registry = Registry()
    registry.register_collector(d.collect)
    (line,) = [ln for ln in render_prometheus(registry).splitlines()
               if ln.startswith("discovery_txt_skipped_total ")]
    assert float(line.split()[1]) >= 2
