"""Presence as a pure state machine, driven by a fake clock (no sockets)."""

from __future__ import annotations

from dataclasses import replace

from mesh.peers import PeerEventKind, PeerInfo, PeerState, PeerTable, Presence

A = PeerInfo(node_id="a" * 32, name="a", mesh="m")
B = PeerInfo(node_id="b" * 32, name="b", mesh="m")


def kinds(events: list) -> list[PeerEventKind]:  # type: ignore[type-arg]
    return [e.kind for e in events]


def test_join_evasive_ping_gone_prune() -> None:
    p = Presence(evasive_s=3, gone_s=10, prune_s=60)
    assert kinds(p.upsert(A, now=0)) == [PeerEventKind.JOINED]
    t = p.tick(3.0)
    assert t.events == [] and t.ping == []
    t = p.tick(3.5)
    assert kinds(t.events) == [PeerEventKind.EVASIVE] and t.ping == [A.node_id]
    t = p.tick(4.5)  # still evasive: pinged every tick, reported once
    assert t.events == [] and t.ping == [A.node_id]
    assert p.get(A.node_id).state is PeerState.EVASIVE  # type: ignore[union-attr]
    t = p.tick(10.5)
    assert kinds(t.events) == [PeerEventKind.LEFT] and t.gone == [A.node_id]
    assert p.get(A.node_id).state is PeerState.GONE  # type: ignore[union-attr]
    assert p.tick(60.0).pruned == []
    assert p.tick(70.6).pruned == [A.node_id]
    assert A.node_id not in p


def test_any_message_makes_evasive_or_gone_peer_joined_again() -> None:
    p = Presence(3, 10, 60)
    p.upsert(A, 0)
    p.tick(4)
    assert kinds(p.heard(A.node_id, 5)) == [PeerEventKind.JOINED]
    assert p.heard(A.node_id, 6) == []  # already joined: no event
    p.tick(17)
    assert p.get(A.node_id).state is PeerState.GONE  # type: ignore[union-attr]
    assert kinds(p.heard(A.node_id, 18)) == [PeerEventKind.JOINED]
    assert p.heard(B.node_id, 18) == []  # unknown: nothing


def test_goodbye_is_gone_at_once_and_only_once() -> None:
    p = Presence(3, 10, 60)
    p.upsert(A, 0)
    assert kinds(p.goodbye(A.node_id, 1)) == [PeerEventKind.LEFT]
    assert p.goodbye(A.node_id, 2) == []
    assert not p.is_live(A.node_id)
    assert kinds(p.upsert(A, 3)) == [PeerEventKind.JOINED]  # came back


def test_changed_info_and_evasive_comeback_with_new_info() -> None:
    p = Presence(3, 10, 60)
    p.upsert(A, 0)
    assert p.upsert(A, 1) == []
    a2 = replace(A, offers={"stream": ("s",)})
    assert kinds(p.upsert(a2, 2)) == [PeerEventKind.CHANGED]
    p.tick(6)
    a3 = replace(a2, name="renamed")
    assert kinds(p.upsert(a3, 7)) == [PeerEventKind.JOINED, PeerEventKind.CHANGED]
    assert p.get(A.node_id).info.name == "renamed"  # type: ignore[union-attr]


def test_liveness_keeps_peer_joined() -> None:
    p = Presence(3, 10, 60)
    p.upsert(A, 0)
    p.upsert(B, 0)
    for now in range(1, 30):
        p.heard(A.node_id, now)
        t = p.tick(now + 0.5)
        assert A.node_id not in t.ping
    assert p.get(A.node_id).state is PeerState.JOINED  # type: ignore[union-attr]
    assert p.get(B.node_id).state is PeerState.GONE  # type: ignore[union-attr]


def test_peer_table_reads_and_discovery_hooks() -> None:
    now = [100.0]
    calls: list[object] = []
    table = PeerTable(
        Presence(3, 10, 60),
        on_upsert=lambda info, src: calls.append((info.node_id, src)),
        on_goodbye=calls.append,
        clock=lambda: now[0],
    )
    with table.lock:
        table.presence.upsert(A, now[0])
        table.presence.upsert(B, now[0])
        table.presence.goodbye(B.node_id, now[0])
    assert table.list() == [A] and len(table.list(include_gone=True)) == 2
    assert table.state(B.node_id) is PeerState.GONE and table.get(B.node_id) == B
    assert table.state("c" * 32) is None and table.last_seen("c" * 32) is None
    now[0] += 5
    import time

    assert abs(table.last_seen(A.node_id) - (time.time() - 5)) < 1  # type: ignore[operator]
    table.upsert(A, source="mdns")
    table.goodbye(A.node_id)
    assert calls == [(A.node_id, "mdns"), A.node_id]
    assert A.node_id in table and len(table) == 2
