"""Hostile-peer tests of mDNS discovery and the metrics HTTP endpoint.

The attacker is a stranger on the LAN: a real python-zeroconf instance on 127.0.0.1 sending
forged goodbyes, bare pointers, floods of records and malformed ones; and raw TCP sockets
against the metrics port. mDNS carries no identity, so none of this involves CURVE: the
attacker needs no key at all. After each attack: nothing forged took effect, real traffic still
works, the budget counters moved, threads/RSS are back within a stated bound, and the log
lines the attack could trigger are rate-limited.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from zeroconf import DNSOutgoing, DNSPointer, IPVersion, ServiceInfo, Zeroconf
from zeroconf.const import _CLASS_IN, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_PTR

from mesh.discovery import DiscoveryConfig, MdnsDiscovery
from mesh.metrics import Registry, parse_prometheus, serve_prometheus
from mesh.peers import PeerEventKind, PeerInfo
from mesh.txt import encode_txt
from tests.discovery_child import StandInNode
from tests.test_discovery import unique_type
from tests.util import poll_until, unique, wait_until

LO = "127.0.0.1"
BURST = 10  # LogLimiter's default burst: at most this many lines (+1 per interval) per key


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def attacker() -> Iterator[Any]:
    zc = Zeroconf(interfaces=[LO], ip_version=IPVersion.V4Only)
    yield zc
    zc.close()


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


def fake(stype: str, mesh: str, *, host: str = "10.99.0.1", node_id: str | None = None,
         props: Mapping[Any, Any] | None = None, label: str | None = None) -> ServiceInfo:
    """A well-formed (unless ``props``) zeromesh record for a node that does not exist."""
    node_id = node_id or uuid.uuid4().hex
    info = PeerInfo(node_id=node_id, name="fake", mesh=mesh, host="evil",
                    endpoints={"control": (f"tcp://{host}:4999",)}, offers={})
    if props is None:
        props = encode_txt(info).properties
    return ServiceInfo(stype, f"{label or node_id}.{stype}", port=4999, properties=props,
                       server=f"zm-{node_id}.local.", parsed_addresses=[LO])


def lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


def flood(zc: Any, infos: list[ServiceInfo], heard: Callable[[], int],
          ttl: int | None = None, batch: int = 10) -> None:
    """Announce each record (or its goodbye, ``ttl=0``), ``batch`` at a time, re-sending a
    batch until ``heard()`` grew by its size: UDP on loopback drops packets while a receiver
    in this process is busy, and the attack is about how many records, not how fast."""
    for i in range(0, len(infos), batch):
        chunk = infos[i:i + batch]
        goal = heard() + len(chunk)
        for _ in range(5):
            for info in chunk:
                zc.send(zc.generate_service_broadcast(info, ttl))
            if poll_until(lambda goal=goal: heard() >= goal, 1.0):
                break


# --- 1. forged mDNS goodbye ----------------------------------------------------------------


def test_forged_mdns_goodbye_takes_no_live_peer_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attacker: Any
) -> None:
    """A TTL-0 goodbye for a live peer's instance name, sent by anyone on the LAN, used to
    disconnect it (events_left 1). Now it is counted and presence stays with the control
    channel; the peer's own BYE still takes it away at once."""
    from mesh.node import Node

    stype = unique_type()
    monkeypatch.setenv("ZEROMESH_SERVICE_TYPE", stype)
    mesh = unique("gb")
    a = Node(data_dir=tmp_path / "a", name="a", mesh=mesh, interface=LO, mdns=True)
    b = Node(data_dir=tmp_path / "b", name="b", mesh=mesh, interface=LO, mdns=True)
    try:
        events: list[Any] = []
        a.on_peer(events.append)
        got: list[Any] = []
        b.handle("gb-test", lambda peer, body: got.append((peer, body)))

        def joined(n: Any) -> set[str]:
            return {r.info.node_id for r in n.peers.records() if r.state.value == "joined"}

        wait_until(lambda: joined(a) == {b.id} and joined(b) == {a.id}, 5, what="joined")
        wait_until(lambda: a.stats().get("mdns_accepted", 0) >= 1
                   or a._discovery.stats()["accepted"] >= 1, 5, what="a heard b on mDNS")

        # The forgery: b's instance name, every record with TTL 0, repeated.
        forged = ServiceInfo(stype, f"{b.id}.{stype}", port=1, properties={b"v": b"1"},
                             server=f"zm-{b.id}.local.", parsed_addresses=[LO])
        for _ in range(3):
            attacker.send(attacker.generate_service_broadcast(forged, 0))

        def left() -> list[Any]:
            return [e for e in events if e.kind is PeerEventKind.LEFT]

        # zeroconf expires a TTL-0 record after 1 s (RFC 6762 10.1), then reports the removal.
        wait_until(lambda: left() or (a.stats().get("mdns_goodbyes", 0) >= 1
                                      and a.stats().get("discovery_goodbyes_ignored", 0) >= 1),
                   5, what="forged goodbye processed")
        assert not left(), f"forged goodbye disconnected b: {events}"
        st = a.stats()
        assert st.get("events_left", 0) == 0 and st["peers_joined"] == 1
        assert joined(a) == {b.id} and joined(b) == {a.id}
        # Real traffic still flows over the link the goodbye did not cut.
        a.send(b.id, "gb-test", {"n": 1})
        wait_until(lambda: got, 5, what="control message after the forged goodbye")
        assert got == [(a.id, {"n": 1})]
        # The goodbye shows in /metrics too.
        fams = parse_prometheus(_render(a))
        assert fams["discovery_goodbyes_total"][0][1] >= 1
    finally:
        b.close()
    try:
        # b's own BYE (control channel) still takes it away at once.
        wait_until(lambda: any(e.kind is PeerEventKind.LEFT and e.peer.node_id == b.id
                               for e in events), 5, what="real BYE seen")
    finally:
        a.close()


def _render(node: Any) -> str:
    from mesh.metrics import render_prometheus
    return render_prometheus(node)


# --- 2. discovery counters in node.stats() and /metrics ------------------------------------


def test_discovery_counters_reach_node_stats_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attacker: Any
) -> None:
    from mesh.node import Node

    stype = unique_type()
    monkeypatch.setenv("ZEROMESH_SERVICE_TYPE", stype)
    mesh = unique("cnt")
    a = Node(data_dir=tmp_path / "a", name="a", mesh=mesh, interface=LO, mdns=True)
    try:
        bad = [fake(stype, mesh, props={b"v": b"1", b"mesh": mesh.encode(), b"name": b"x"},
                    label=f"bad{i}") for i in range(3)]
        other = fake(stype, unique("other-mesh"))
        mismatch = fake(stype, mesh, label="not-its-id")
        for info in (*bad, other, mismatch):
            attacker.send(attacker.generate_service_broadcast(info, None))

        def st() -> dict[str, Any]:
            return a.stats()

        wait_until(lambda: st().get("mdns_malformed", 0) >= 3
                   and st().get("mdns_ignored_other_mesh", 0) >= 1
                   and st().get("mdns_ignored_name_mismatch", 0) >= 1, 5,
                   what=f"discovery counters in node.stats(): {st()}")
        assert st()["mdns_services_held"] == 0  # nothing forged was kept
        assert st()["peers_joined"] == 0
        server, port = serve_prometheus(a)
        try:
            with urllib.request.urlopen(f"http://{LO}:{port}/metrics", timeout=5) as r:
                fams = parse_prometheus(r.read().decode())
        finally:
            server.close()
        by = {s[0]["result"]: s[1] for s in fams["discovery_records_total"]}
        assert by["malformed"] >= 3 and by["ignored_other_mesh"] >= 1
        assert by["ignored_name_mismatch"] >= 1 and by["accepted"] == 0
        budgets = {s[0]["budget"] for s in fams["discovery_budget_refused_total"]}
        assert budgets == {"services", "pending_resolves", "pending_refreshes", "malformed_seen"}
    finally:
        a.close()


# --- 4. tables a stranger can grow, and log lines ------------------------------------------


def test_bare_pointer_flood_does_not_starve_discovery(
    discoveries: list[MdnsDiscovery], attacker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """200 PTR records naming services that never answer. Each used to block zeroconf's
    browser thread for the whole resolve timeout, one after the other (200 s here), so a real
    peer announced after them was not found. Now resolves run in zeroconf's loop, at most
    32 at once (budget pending_resolves), the rest refused and counted."""
    caplog.set_level(logging.INFO, logger="mesh.discovery")
    stype, mesh = unique_type(), unique("ptr")
    victim = StandInNode(mesh=mesh, name="victim")
    d = start(discoveries, victim, stype, resolve_timeout=1.0)
    wait_until(lambda: d.stats().get("registered", 0) == 1, 5)
    out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
    for i in range(200):
        out.add_answer_at_time(DNSPointer(stype, _TYPE_PTR, _CLASS_IN, 120,
                                          f"ghost{i}-{uuid.uuid4().hex[:6]}.{stype}"), 0)
    attacker.send(out)
    good = StandInNode(mesh=mesh, name="good")
    start(discoveries, good, stype)
    wait_until(lambda: good.id in victim.peers.ids(), 3,
               what=f"real peer found during the flood: {d.stats()}")
    st = d.stats()
    assert st["pending_resolves_held"] <= 32
    wait_until(lambda: d.stats()["pending_resolves_refused"] >= 200 - 32, 5,
               what=f"refusals counted: {d.stats()}")
    # Every resolve in flight ends (1 s timeout): the budget is back to zero.
    wait_until(lambda: d.stats()["pending_resolves_held"] == 0, 5, what="resolves ended")
    st = d.stats()
    assert st["resolve_failed"] == 200 - st["pending_resolves_refused"]
    assert victim.peers.ids() == {good.id}
    # Log lines: rate-limited per kind, whatever the flood's size (two discoveries in this
    # process hear the flood, each with its own limit).
    assert lines(caplog, "could not resolve") <= 2 * (BURST + 1)
    assert lines(caplog, "resolves in flight") <= 2 * (BURST + 1)
    assert st["log_suppressed"] >= 200 - 2 * (BURST + 1)


def test_service_flood_is_bounded_counted_and_released(
    discoveries: list[MdnsDiscovery], attacker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """300 well-formed records of the victim's mesh, all announcing one control address: at
    most 64 per address are kept (budget services), the rest refused and counted; a real
    peer at another address is still found; goodbyes give the budget back."""
    caplog.set_level(logging.WARNING, logger="mesh.discovery")
    stype, mesh = unique_type(), unique("flood")
    victim = StandInNode(mesh=mesh, name="victim")
    d = start(discoveries, victim, stype)
    wait_until(lambda: d.stats().get("registered", 0) == 1, 5)
    rss0 = rss_kib()
    fakes = [fake(stype, mesh) for _ in range(300)]
    flood(attacker, fakes, lambda: d.stats()["resolved"])
    st = d.stats()
    assert len(victim.peers.ids()) <= 64, "the services table grew past its budget"
    assert st["services_held"] == 64 and st["services_keys"] == 1
    assert st["services_refused"] >= 300 - 64
    good = StandInNode(mesh=mesh, name="good")  # announces 127.0.0.1: another address
    start(discoveries, good, stype)
    wait_until(lambda: good.id in victim.peers.ids(), 5, what="real peer found")
    assert lines(caplog, "services budget full") <= BURST + 1
    # The stranger's goodbyes (TTL 0) free what it held (zeroconf expires them after 1 s).
    held = [f for f in fakes if f.name.split(".", 1)[0] in victim.peers.ids()]
    assert len(held) == 64
    last = [0.0]

    def resend_lost() -> None:
        if time.monotonic() - last[0] > 1.5:
            last[0] = time.monotonic()
            for f in held:
                if f.name.split(".", 1)[0] in victim.peers.ids():
                    attacker.send(attacker.generate_service_broadcast(f, 0))

    assert poll_until(lambda: d.stats()["services_held"] == 1, 8, between=resend_lost), \
        f"budget not given back: {d.stats()}"
    assert victim.peers.ids() == {good.id}
    assert rss_kib() - rss0 < 20 * 1024  # KiB: zeroconf's cache of 300 records, not more


def test_malformed_records_with_unique_names_are_rate_limited(
    discoveries: list[MdnsDiscovery], attacker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING per distinct bad record was the rule, so unique names meant one line each:
    150 names, 150 lines. Now every bad record is counted and the lines are rate-limited."""
    caplog.set_level(logging.WARNING, logger="mesh.discovery")
    stype, mesh = unique_type(), unique("bad")
    victim = StandInNode(mesh=mesh, name="victim")
    d = start(discoveries, victim, stype)
    junk = [fake(stype, mesh, label=f"junk{i}",
                 props={b"v": b"1", b"mesh": mesh.encode(), b"id": b"z" * 32, b"name": b"x"})
            for i in range(150)]
    flood(attacker, junk, lambda: d.stats()["malformed"])
    wait_until(lambda: d.stats()["malformed"] >= 150, 5, what=f"counted: {d.stats()}")
    assert lines(caplog, "malformed zeromesh record") <= BURST + 1
    assert d.stats()["log_suppressed"] >= 150 - BURST - 1
    assert victim.peers.ids() == set()


# --- 3. the metrics HTTP endpoint ----------------------------------------------------------


def _status(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{LO}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_metrics_head_and_paths() -> None:
    reg = Registry()
    reg.counter("hits_total", "Hits.").inc(3)
    server, port = serve_prometheus(reg)
    try:
        code, headers, body = _status(port, "GET", "/metrics")
        assert code == 200 and b"hits_total 3" in body
        code, hheaders, hbody = _status(port, "HEAD", "/metrics")
        assert code == 200 and hbody == b""
        assert hheaders["Content-Type"] == headers["Content-Type"]
        assert hheaders["Content-Type"].startswith("text/plain; version=0.0.4")
        assert int(hheaders["Content-Length"]) > 0
        assert _status(port, "HEAD", "/metrics.json")[0] == 200
        assert _status(port, "GET", "/")[0] == 404  # docs: any other path is a 404
        assert _status(port, "GET", "/nope")[0] == 404
        assert _status(port, "POST", "/metrics")[0] == 501
        text = _status(port, "GET", "/metrics")[2].decode()
        codes = {s[0]["code"]: s[1] for s in parse_prometheus(text)["metrics_http_requests_total"]}
        assert codes["200"] >= 3 and codes["404"] == 2 and codes["501"] == 1
    finally:
        server.close()


@pytest.mark.parametrize(("sources", "cap"), [(1, 8), (4, 16)])
def test_idle_connections_are_bounded_and_released(sources: int, cap: int) -> None:
    """300 idle connections used to make about 300 threads that never ended. Now at most
    max_connections (16) are served at once, at most max_per_source (8) from one address; the
    rest get a 503 at once (counted), the idle ones end at the read timeout, and threads and
    memory come back. From one address the per-source cap binds, from four the total."""
    reg = Registry()
    threads0, rss0 = threading.active_count(), rss_kib()
    server, port = serve_prometheus(reg, read_timeout_s=2.0)
    socks: list[socket.socket] = []
    try:
        for i in range(300):
            socks.append(socket.create_connection(
                (LO, port), timeout=5, source_address=(f"127.0.0.{1 + i % sources}", 0)))
        wait_until(lambda: server.stats()["accepted"] + server.stats()["refused"] >= 300, 5,
                   what=f"all 300 seen: {server.stats()}")
        peak = threading.active_count()
        assert peak <= threads0 + 1 + cap, f"{peak - threads0} threads for 300 idle connections"
        st = server.stats()
        # Slots free as idle ones time out while the 300 still connect (the listen backlog
        # makes later connects wait), so a few more than the cap are served, never at once.
        assert st["open_peak"] == cap and st["accepted"] + st["refused"] == 300
        assert st["refused"] >= 250
        # Idle ones are dropped at the read timeout; then a real scrape is served.
        wait_until(lambda: server.stats()["open"] == 0, 5, what=f"idle cut: {server.stats()}")
        assert server.stats()["timed_out"] >= 1
        code, _, body = _status(port, "GET", "/metrics")
        assert code == 200
        fams = parse_prometheus(body.decode())
        refused = {s[0]["result"]: s[1] for s in fams["metrics_http_connections_total"]}
        assert refused["refused"] == st["refused"]
        assert poll_until(lambda: threading.active_count() <= threads0 + 1, 5), \
            "handler threads did not end"
        assert rss_kib() - rss0 < 20 * 1024  # KiB
    finally:
        for s in socks:
            s.close()
        server.close()


def test_slow_client_is_cut_at_the_deadline() -> None:
    """A client dribbling header bytes faster than the read timeout kept its thread forever;
    now the connection is cut at its deadline."""
    server, port = serve_prometheus(Registry(), read_timeout_s=0.5, deadline_s=1.0)
    s = socket.create_connection((LO, port), timeout=5)
    try:
        s.sendall(b"GET /metrics HTTP/1.0\r\n")
        s.settimeout(0.1)

        def closed_by_server() -> bool:
            try:
                s.sendall(b"X-Slow: 1\r\n")
                return s.recv(1) == b""  # the recv's 0.1 s timeout paces the dribble
            except TimeoutError:
                return False
            except OSError:
                return True

        assert poll_until(closed_by_server, 5, interval=0.0), "slow client never cut"
        wait_until(lambda: server.stats()["cut"] == 1 and server.stats()["open"] == 0, 5)
    finally:
        s.close()
        server.close()


def test_reset_connections_are_counted_not_tracebacks(capfd: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A client that resets mid-request made socketserver print a traceback to stderr per
    connection. Now each is counted and the lines are rate-limited."""
    caplog.set_level(logging.INFO, logger="mesh.metrics")
    server, port = serve_prometheus(Registry())
    try:
        for i in range(60):
            s = socket.create_connection((LO, port), timeout=5)
            s.sendall(b"GET /metr")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
            wait_until(lambda i=i: server.stats()["accepted"] > i and server.stats()["open"] == 0,
                       5, what="one reset at a time")
        wait_until(lambda: server.stats()["errors"] >= 60, 5, what=f"{server.stats()}")
        assert "Traceback" not in capfd.readouterr().err
        assert lines(caplog, "metrics: error serving") <= BURST + 1
        assert server.stats()["log_suppressed"] >= 60 - BURST - 1
        assert _status(port, "GET", "/metrics")[0] == 200
    finally:
        server.close()
