"""Replicated streams, the behaviour beyond the first slice (real nodes, sockets, files):
holdings paging past one page, ``Start.time`` on a store, overlapping store topics, and the
faults the stores must survive (docs/architecture.md, "Replicated streams")."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.envelope import Event, decode, encode
from mesh.errors import LogCorruptedRange, ProtocolError
from mesh.log import LogConfig
from patterns.pubsub import frames
from patterns.pubsub.holdings import board_for
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.store import HOLDINGS_PEER_PAGES, Store, _Replica, read_holdings
from patterns.pubsub.subscriber import Start, Subscriber
from tests.test_store import ORIGIN, Mesh
from tests.util import unique, wait_until


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.close()


def _env(stream: str, seq: int, data: Any) -> bytes:
    return encode(Event(type="t", source="origin", stream=stream, seq=seq, data=data))


def _seed_replicas(data_dir: Path, streams: list[str], per: int = 1) -> None:
    """Copies of ``ORIGIN``'s streams on a store's disk, as a store writes them (an origin
    that is gone: only the store can serve them)."""
    root = data_dir / "replicas"
    for s in streams:
        rep = _Replica(root, ORIGIN, s, LogConfig())
        rep.append(0, [_env(s, i, i) for i in range(per)], 1)
        rep.sync()
        rep.close()


def test_holdings_are_paged_past_one_answer_and_every_copy_is_served(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    # More (origin, stream) copies than one holdings answer carries: the asker follows the
    # store's ``next`` cursor until the last page, and a subscriber reads every stream,
    # including those of the last page.
    n = frames.MAX_HOLDINGS + 150
    prefix = unique("p").replace("-", "") + "."
    streams = [f"{prefix}s{i:05d}" for i in range(n)]
    sn = mesh.add("store")
    _seed_replicas(Path(sn.data_dir), streams)
    store = Store(sn, topics=(prefix,))
    assert store.stats().replicas == n
    cn = mesh.add("sub")
    wait_until(lambda: cn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    board = board_for(cn)
    board.ask(prefix, force=True)
    wait_until(lambda: len(board.keys()) >= n, 20, what=lambda: (len(board.keys()),
                                                                  store.stats()))
    assert set(board.keys()) == {(ORIGIN, s) for s in streams}
    assert board.answered.get(sn.id) is not None  # answered: its last page is in
    sub = Subscriber(cn, prefix, start=Start.beginning())
    got: dict[str, int] = {}

    def pump() -> bool:
        while batch := sub.recv_batch(timeout=0.05):  # one stream's events per batch
            for ev in batch:
                got[ev.stream] = got.get(ev.stream, 0) + 1
        return len(got) >= n

    wait_until(pump, 60, what=lambda: (len(got), sorted(set(streams) - set(got))[:5],
                                       {k: v for k, v in got.items() if v > 1}, sub.stats()))
    assert got == dict.fromkeys(streams, 1)  # every copy once, none twice
    sub.close()
    # What a page costs the store is the copies it walks: a peer's second holds a budget
    # of them (here 2,500: two full pages and a short one), not only of requests.
    import patterns.pubsub.store as store_mod

    monkeypatch.setattr(store_mod, "HOLDINGS_PEER_SCAN", 2500)
    raw = mesh.add("raw")
    wait_until(lambda: raw.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    before = store.stats()
    for i in range(10):
        raw.send(sn.id, frames.CTRL_HOLDINGS_REQ, frames.encode_holdings_req(prefix, 900 + i))
    wait_until(lambda: store.stats().holdings_answers + store.stats().holdings_refused
               >= before.holdings_answers + before.holdings_refused + 10, 10)
    assert store.stats().holdings_refused > before.holdings_refused


def test_holdings_pages_are_budgeted_per_peer(mesh: Mesh) -> None:
    # A peer that asks for pages in a tight loop gets HOLDINGS_PEER_PAGES answers a second;
    # the rest are counted and dropped, and a well-behaved asker is still answered.
    prefix = unique("p").replace("-", "") + "."
    sn = mesh.add("store")
    _seed_replicas(Path(sn.data_dir), [prefix + "a", prefix + "b"])
    store = Store(sn, topics=(prefix,))
    hostile = mesh.add("hostile")
    got: list[object] = []
    hostile.handle(frames.CTRL_HOLDINGS, lambda peer, body: got.append(body))
    wait_until(lambda: hostile.who_offers("service", name=frames.STORE_SERVICE), 10,
               what="store")
    burst = 4 * HOLDINGS_PEER_PAGES
    for i in range(burst):
        hostile.send(sn.id, frames.CTRL_HOLDINGS_REQ, frames.encode_holdings_req(prefix, i))
    wait_until(lambda: store.stats().holdings_answers + store.stats().holdings_refused
               >= burst, 10, what=lambda: store.stats())
    st = store.stats()
    assert st.holdings_answers <= 2 * HOLDINGS_PEER_PAGES  # at most two one-second windows
    assert st.holdings_refused >= burst - 2 * HOLDINGS_PEER_PAGES
    # A cursor past everything held: an empty last page, not an error.
    wait_until(lambda: len(got) >= st.holdings_answers, 5)
    other = mesh.add("other")
    board = board_for(other)
    wait_until(lambda: other.who_offers("service", name=frames.STORE_SERVICE), 10,
               what="store")
    board.ask(prefix, force=True)
    wait_until(lambda: len(board.keys()) == 2, 10, what=lambda: store.stats())


def test_an_unsolicited_or_malformed_page_is_not_believed(mesh: Mesh) -> None:
    # Rows only come from answers to our own requests; a bad cursor is a typed error.
    nd = mesh.add("n")
    board = board_for(nd)
    board._on_holdings("f" * 32, frames.encode_holdings(
        99, [frames.Holding(ORIGIN, "x", 0, 5, 1)], False))
    assert board.keys() == [] and board.unasked == 1
    with pytest.raises(ProtocolError):
        frames.decode_holdings({"v": 1, "req": 1, "more": True, "items": [],
                                "next": ["nothex", "x"]})
    with pytest.raises(ProtocolError):
        frames.decode_holdings_req({"v": 1, "prefix": "", "req": 1, "after": [ORIGIN]})


def _first_at(store: Store, origin: str, stream: str, t_ns: int) -> int:
    """The first seq the store answers a ``Start.time(t_ns)`` fetch with."""
    rq = frames.ReplayRequest("s", 1, stream, None, t_ns, None, 1, 1 << 20, origin=origin)
    return store._serve(rq).first


def test_start_time_on_a_store_finds_the_origins_first_event(mesh: Mesh) -> None:
    # The store joins after the origin logged everything (it copies it all at once, later):
    # a Start.time lookup must still find what the origin's log finds, for single events,
    # a publish_many batch, and events whose ``time`` the application set (historical).
    from datetime import UTC, datetime

    stream = unique("s").replace("-", "")
    pn = mesh.add("pub")
    with Publisher(pn, stream, heartbeat_s=0.1) as pub:
        for i in range(4):
            pub.publish(i)
        pub.publish_many(list(range(4, 9)))
        old = datetime(2010, 1, 1, tzinfo=UTC)
        pub.publish_events([Event(type="t", source="app", data=i, time=old) for i in (9, 10)])
        for i in range(11, 14):
            pub.publish(i)
        sn = mesh.add("store")
        store = Store(sn, topics=(stream,))
        wait_until(lambda: (store.durable().get((pn.id, stream)) or (0, 0))[1] >= 14, 20,
                   what=lambda: store.stats())
        log = pub._log
        assert log is not None
        evs = [decode(env) for _seq, env in store.read(pn.id, stream)]
        assert [e.data for e in evs] == list(range(14))
        # Every event's own time (what an application asks for: "from the time of this
        # event on"), before everything, after everything. (A time within the few µs
        # between an event's ``time`` and the origin's append of it can differ by that
        # event: the origin's log stamps the append, the store only knows the event;
        # docs/architecture.md, "Replicated streams".)
        probes = {0, 1 << 62} | {e.time_us * 1000 for e in evs}
        for t in sorted(probes):
            assert _first_at(store, pn.id, stream, t) == log.offset_for_time(t), t
        # End to end, the origin gone: a subscriber from the fifth event's time on.
        t5 = evs[5].time_us * 1000
        want = log.offset_for_time(t5)
    pn.close()
    wait_until(lambda: not mesh.hub.who_offers("stream", name=stream), 10, what="origin gone")
    sub = Subscriber(mesh.add("sub"), stream, start=Start.time(t5))
    got: list[Event] = []
    wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 14 - want, 20,
               what=lambda: (len(got), sub.stats()))
    assert [e.seq for e in got] == list(range(want, 14))
    sub.close()


def test_origin_time_of_an_envelope() -> None:
    from datetime import UTC, datetime

    from patterns.pubsub.store import origin_time_ns

    ev = Event(type="t", source="s", stream="x" * 200, seq=1 << 40, data=b"d")
    assert origin_time_ns(encode(ev)) == ev.time_us * 1000  # the publisher's clock, in µs
    old = Event(type="t", source="s", stream="x", data=1,
                time=datetime(2010, 1, 1, tzinfo=UTC))
    t = origin_time_ns(encode(old))  # the application's time is not the origin's: the id's
    assert t is not None and t % 1_000_000 == 0 and t > old.time_us * 1000
    not7 = Event(type="t", source="s", stream="x", data=1,
                 id="0190a000-0000-4000-8000-000000000000")
    assert origin_time_ns(encode(not7)) is None  # no UUIDv7: the store's own clock
    assert origin_time_ns(b"") is None and origin_time_ns(b"\x9f\x01") is None


def test_followed_topics_drop_what_another_topic_covers() -> None:
    from patterns.pubsub.store import followed_topics

    assert followed_topics(["a.", "a.b.", "a.b.c", "b"]) == ("a.", "b")
    assert followed_topics(["a.b.", "a."]) == ("a.",)
    assert followed_topics(["a.", "a.*", "a."]) == ("a.",)
    assert followed_topics(["x", "x", "xy"]) == ("x", "xy")  # names: only a repeat
    assert followed_topics(["a*", "a"]) == ("a*",)  # "a*" matches the stream "a"
    assert followed_topics(["", "s.", "t"]) == ("*",)
    assert followed_topics(["a.b", "a.b."]) == ("a.b", "a.b.")  # "a.b" is not under "a.b."


def test_overlapping_store_topics_copy_each_stream_once(mesh: Mesh) -> None:
    # "a." covers "a.b." and the name "a.b.c": one follower, each event written once, every
    # copy byte for byte the origin's, and the store restarts with them as they were.
    base = unique("o").replace("-", "")
    names = [f"{base}.b.c", f"{base}.b.x", f"{base}.y"]
    sn = mesh.add("store")
    store = Store(sn, topics=(f"{base}.b.", f"{base}.", f"{base}.b.c", f"{base}.*"))
    assert store.topics == (f"{base}.",) and len(store._followers) == 1
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    pubs = [Publisher(pn, s, replicas=1, heartbeat_s=0.1) for s in names]
    for k, p in enumerate(pubs):
        p.publish_many([f"{k}-{i}" for i in range(30)])
        p.publish(f"{k}-30")
    assert store.stats().appended == 31 * len(names)  # none twice
    for p in pubs:
        log = p._log
        assert log is not None
        _first, mine = log.read_batch_payloads(0, 100)
        assert [e for _s, e in store.read(pn.id, p.stream)] == mine
        assert store.durable()[(pn.id, p.stream)][1] == 31
        p.close()
    store.close()
    store = Store(sn, topics=(f"{base}.", f"{base}.b."))
    assert {h.stream: (h.oldest, h.head) for h in store.holdings()} == dict.fromkeys(
        names, (0, 31))
    store.close()


def _replica_dir(data_dir: str | Path, origin: str, stream: str) -> Path:
    return Path(data_dir) / "replicas" / origin / "streams" / stream


@pytest.mark.parametrize("cut", ["log", "map", "log-then-map", "log-flip", "last-flip",
                                 "map-flip"])
def test_a_store_cut_by_a_power_cut_or_a_flipped_byte_copies_again_what_it_lost(
        mesh: Mesh, cut: str) -> None:
    # The store's files after a power cut (the replica log and its REPLICA map cut back to
    # earlier sizes, separately) or with a flipped byte in the middle: at restart the store
    # starts, never serves a record under a wrong seq, copies again what it lost from the
    # origin, and ends byte for byte the origin's.
    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    store = Store(sn, topics=(stream,), log_config=LogConfig(segment_bytes=64 << 10))
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    pub = Publisher(pn, stream, replicas=1, heartbeat_s=0.1)
    for i in range(0, 2000, 100):
        pub.publish_many([b"v" * 80 + str(i + k).encode() for k in range(100)])
    pub.publish(b"last")  # a second run of the map would start here after a restart
    store.close()
    rdir = _replica_dir(sn.data_dir, pn.id, stream)
    segs = sorted(p for p in rdir.iterdir() if p.name.endswith(".log"))
    assert len(segs) >= 3
    mp = rdir / "REPLICA"
    if cut.startswith("log") or cut == "last-flip":
        # in a sealed segment or the active one: found by a read (the open checks the tail)
        victim = segs[len(segs) // 2] if cut == "log-flip" else segs[-1]
        size = victim.stat().st_size
        if cut.endswith("flip"):
            with open(victim, "r+b") as f:
                f.seek(size // 2)
                b = f.read(1)
                f.seek(size // 2)
                f.write(bytes([b[0] ^ 0x5A]))
        else:
            os.truncate(victim, size // 3)  # mid-record: a torn tail, then less held
            for later in segs[segs.index(victim) + 1:]:
                later.unlink()
    if cut in ("map", "log-then-map"):
        os.truncate(mp, mp.stat().st_size // 2)
    if cut == "map-flip":
        body = bytearray(mp.read_bytes())
        i = body.index(b'"runs": [[') + len(b'"runs": [[')
        body[i] = ord("7") if body[i] != ord("7") else ord("3")  # the first run's seq
        mp.write_bytes(bytes(body))
    store = Store(sn, topics=(stream,), log_config=LogConfig(segment_bytes=64 << 10))
    log = pub._log
    assert log is not None
    _f, want = log.read_batch_payloads(0, 5000)
    want = [e for part in [want] for e in part]
    while len(want) < 2001:
        _f, more = log.read_batch_payloads(len(want), 5000)
        want.extend(more)
    try:
        early = store.read(pn.id, stream, 0, 5000)
    except LogCorruptedRange:
        assert cut in ("log-flip", "last-flip")  # a typed error; the store copies them again
        early = []
    for seq, env in early:
        assert env == want[seq]  # nothing served under a wrong seq, even before the catch-up
    wait_until(lambda: (store.durable().get((pn.id, stream)) or (0, 0))[1] == 2001, 20,
               what=lambda: (store.holdings(), store.stats()))
    got = store.read(pn.id, stream, 0, 5000)
    assert [s for s, _e in got] == list(range(2001))
    assert [e for _s, e in got] == want
    if cut.startswith("map"):
        assert store.stats().damaged == 1  # the bad map was seen, the copy moved aside
        assert list((Path(sn.data_dir) / "replicas" / "aside").iterdir())
    if cut.endswith("-flip") and cut != "map-flip":
        assert store.stats().damaged == 1
    pub.close()
    store.close()


def _at(ms: int, data: int) -> Event:
    """An event as an origin whose clock reads ``ms`` would make it (UUIDv7 id and time)."""
    from datetime import UTC, datetime, timedelta

    h = f"{ms:012x}"
    ident = f"{h[:8]}-{h[8:]}-7000-8000-{data:012x}"
    return Event(type="t", source="o", data=[data, "x" * 400], id=ident,
                 time=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms))


def test_an_origin_clock_far_behind_or_ahead_keeps_store_retention_and_start_time_sane(
        mesh: Mesh) -> None:
    # The origin's clock jumps to 2001, back, to 2100, back: the store (copying it all at
    # once, later) neither deletes the 2001 events by age at once nor lets the 2100 ones
    # capture a Start.time lookup, and finds what the origin's log finds.
    import time as _time

    from mesh.log import Retention

    stream = unique("s").replace("-", "")
    pn = mesh.add("pub")
    now_ms = _time.time_ns() // 1_000_000
    with Publisher(pn, stream, heartbeat_s=0.1) as pub:
        pub.publish_events([_at(978_307_200_000 + i, i) for i in range(5)])  # 2001
        pub.publish_many([[i, "x" * 400] for i in range(5, 10)])
        pub.publish_events([_at(4_102_444_800_000 + i, 10 + i) for i in range(5)])  # 2100
        pub.publish_many([[i, "x" * 400] for i in range(15, 20)])
        sn = mesh.add("store")
        cfg = LogConfig(segment_bytes=4096, retention=Retention(max_age_s=3600))
        store = Store(sn, topics=(stream,), log_config=cfg)
        wait_until(lambda: (store.durable().get((pn.id, stream)) or (0, 0))[1] >= 20, 20,
                   what=lambda: store.stats())
        rep = store._replica((pn.id, stream), create=False)
        assert rep is not None
        rep.log.enforce_retention()
        got = store.read(pn.id, stream)
        assert rep.log.stats().segments >= 3
        assert [decode(e).data[0] for _s, e in got] == list(range(20))  # none deleted by age
        log = pub._log
        assert log is not None
        for i in (5, 15):
            t = decode(got[i][1]).time_us * 1000
            assert _first_at(store, pn.id, stream, t) == log.offset_for_time(t) == i
        assert _first_at(store, pn.id, stream, (now_ms + 3_600_000) * 1_000_000) == 20
        store.close()


def test_a_copy_cut_below_what_the_origin_still_keeps_reports_the_truly_lost_range(
        mesh: Mesh) -> None:
    # A power cut takes most of a store's copy; meanwhile the origin's retention deleted
    # those seqs (the store had acked them): at restart the store copies what the origin
    # still has, and the range nobody holds any more is reported, not papered over.
    from mesh.log import Retention

    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    scfg = LogConfig(segment_bytes=16 << 10)
    store = Store(sn, topics=(stream,), log_config=scfg)
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    pcfg = LogConfig(segment_bytes=4096, retention=Retention(max_records=200))
    pub = Publisher(pn, stream, replicas=1, heartbeat_s=0.1, log_config=pcfg)
    for i in range(0, 1000, 50):
        pub.publish_many([b"v" * 80 + str(i + k).encode() for k in range(50)])
    store.close()
    oldest = pub.stats().oldest
    assert oldest > 300, oldest
    rdir = _replica_dir(sn.data_dir, pn.id, stream)
    segs = sorted(p for p in rdir.iterdir() if p.name.endswith(".log"))
    for p in segs[1:]:
        p.unlink()  # the copy keeps only its first segment
    (before,) = read_holdings(sn.data_dir)  # before the store runs (it catches up at once)
    cut = before["head"]
    assert 0 < cut < oldest
    store = Store(sn, topics=(stream,), log_config=scfg)
    wait_until(lambda: (store.durable().get((pn.id, stream)) or (0, 0))[1] == 1000, 20,
               what=lambda: (store.holdings(), store.stats()))
    assert store.missing() == {(pn.id, stream): [(cut, oldest)]}
    got = store.read(pn.id, stream, 0, 5000)
    assert [s for s, _e in got] == [*range(cut), *range(oldest, 1000)]
    (row,) = read_holdings(sn.data_dir)
    assert row["missing"] == [[cut, oldest]]
    pub.close()
    store.close()


def test_origin_times_of_a_batch_match_one_by_one() -> None:
    # The batch fast path reads at the first envelope's offsets; it must agree with the
    # one-by-one parse, across a change of seq width, application times and junk.
    from datetime import UTC, datetime

    from mesh.envelope import encode_new_many
    from patterns.pubsub.store import origin_time_ns, origin_times_ns

    envs = encode_new_many([b"x" * 10] * 700, type="t", source="s", stream="plant.t",
                           first_seq=65_200)  # seqs cross 65536: uint16 -> uint32
    old = datetime(2010, 1, 1, tzinfo=UTC)
    mix = [encode(Event(type="t", source="s", stream="plant.t", seq=70_000 + i, data=i,
                        time=old if i % 3 == 0 else None)) for i in range(50)]
    for batch in (envs, [*envs[:3], *mix, b"", b"junk", *envs[3:9]]):
        assert origin_times_ns(batch) == [origin_time_ns(e) for e in batch]


def test_a_damaged_copy_is_repaired_from_another_store_when_the_origin_is_gone(
        mesh: Mesh) -> None:
    # Two stores hold the stream; the origin is gone; a byte flips in store a's copy. A
    # read finds it; a copies those records again from store b, byte for byte.
    stream = unique("s").replace("-", "")
    cfg = LogConfig(segment_bytes=64 << 10)
    an, bn = mesh.add("a"), mesh.add("b")
    a, b = Store(an, topics=(stream,), log_config=cfg), Store(bn, topics=(stream,))
    pn = mesh.add("pub")
    wait_until(lambda: len(pn.who_offers("service", name=frames.STORE_SERVICE)) == 2, 10,
               what="stores")
    with Publisher(pn, stream, replicas=2, heartbeat_s=0.1) as pub:
        for i in range(0, 2000, 100):
            pub.publish_many([b"v" * 80 + str(i + k).encode() for k in range(100)])
    origin = pn.id
    pn.close()
    wait_until(lambda: not mesh.hub.who_offers("stream", name=stream), 10, what="origin gone")
    want = b.read(origin, stream, 0, 5000)
    assert len(want) == 2000
    a.close()
    rdir = _replica_dir(an.data_dir, origin, stream)
    segs = sorted(p for p in rdir.iterdir() if p.name.endswith(".log"))
    victim = segs[len(segs) // 2]
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        c = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([c[0] ^ 0x5A]))
    a = Store(an, topics=(stream,), log_config=cfg)
    with pytest.raises(LogCorruptedRange):
        a.read(origin, stream, 0, 5000)  # typed; the store copies it again from b

    def healed() -> bool:
        try:
            return a.read(origin, stream, 0, 5000) == want
        except LogCorruptedRange:
            return False

    wait_until(healed, 20, what=lambda: (a.holdings(), a.stats()))
    assert a.stats().damaged == 1
    a.close()
    b.close()


def test_a_copy_of_events_whose_ids_run_ahead_of_the_clock_is_found_by_time(
        tmp_path: Path) -> None:
    # An origin whose clock jumped forward (to 2033) and back keeps minting ids at the
    # forward time (UUIDv7 stays monotonic), with the events' own time now: the store must
    # not stamp the copy in 2033, where every time lookup passes over it.
    from mesh.uuid7 import uuid7

    rep = _Replica(tmp_path, ORIGIN, "s", LogConfig())
    now = time.time_ns()
    ahead = 2_000_000_000_000_000_000
    envs = [encode(Event(type="t", source="o", stream="s", seq=i, data=i, id=uuid7(ahead)))
            for i in range(5)]
    rep.append(0, envs, 7)
    assert rep.log.offset_for_time(now - 10**9) == 0  # before: 5 (nothing found)
    rep.close()
