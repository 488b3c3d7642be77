"""Gossip decisions without sockets (mesh/gossip.py): the digest, the revision negotiation,
the backoff of a persistent mismatch, the per-peer rate limit of lists, and (control 1.3) the
bucket reconciliation: its cost follows the difference between two views, not their size."""

from __future__ import annotations

import hashlib
import random

import msgpack

from mesh import control, gossip
from mesh.gossip import (
    BUCKET_REVISION,
    DIGEST_BYTES,
    GOSSIP_REVISION,
    Compare,
    Gossip,
    Owed,
    Want,
    bucket_count,
    buckets,
    differing,
    digest,
    in_buckets,
    speaks_buckets,
    speaks_digest,
)

A, B, C = "a" * 32, "b" * 32, "0123456789abcdef0123456789abcdef"


def test_digest_is_the_same_for_the_same_set_in_any_order() -> None:
    assert digest([A, B, C]) == digest([C, A, B]) == digest([B, C, A, A])
    assert len(digest([A])) == DIGEST_BYTES == 8
    # blake2b-8 over the sorted ids, concatenated (docs/protocol.md, "Gossip")
    assert digest([B, A]) == hashlib.blake2b((A + B).encode(), digest_size=8).digest()


def test_digest_tells_views_apart() -> None:
    assert digest([A, B]) != digest([A, B, C])
    assert digest([A, B]) != digest([A, C])
    assert digest([]) != digest([A])


def test_a_converged_mesh_has_one_digest() -> None:
    # each node's view is its verified peers; with itself added every node has the same set
    ids = [f"{i:032x}" for i in range(50)]
    views = {me: [p for p in ids if p != me] for me in ids}
    assert len({digest([*views[me], me]) for me in ids}) == 1


def test_which_peers_read_digests() -> None:
    assert GOSSIP_REVISION == (1, 2) and BUCKET_REVISION == control.REVISION == (1, 3)
    assert not speaks_digest(None)  # no rev in its HELLO: a build before 1.2
    assert not speaks_digest((1, 1)) and not speaks_digest((1, 0))
    assert speaks_digest((1, 2)) and speaks_digest((1, 9))
    assert not speaks_digest((2, 0))  # another major: not assumed
    # buckets: 1.3 and later; a 1.2 peer gets the full list and pull of 1.2
    assert not speaks_buckets(None) and not speaks_buckets((1, 2))
    assert speaks_buckets((1, 3)) and speaks_buckets((1, 7)) and not speaks_buckets((2, 3))


def test_a_persistent_mismatch_backs_off() -> None:
    g = Gossip(min_push_s=3.0)
    mine, theirs = digest([A, B]), digest([A, B, C])
    answered = [n for n in range(1, 201) if g.on_mismatch("p", mine, theirs)]
    assert answered == [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192]


def test_a_new_pair_or_agreement_is_answered_at_once() -> None:
    g = Gossip(min_push_s=3.0)
    mine, theirs = digest([A, B]), digest([A, B, C])
    for _ in range(5):
        g.on_mismatch("p", mine, theirs)
    assert not g.on_mismatch("p", mine, theirs)  # the 6th of the same pair: backing off
    assert g.on_mismatch("p", mine, digest([C]))  # the view changed: answered
    for _ in range(5):
        g.on_mismatch("p", mine, theirs)
    g.on_agree("p", mine)
    assert g.on_mismatch("p", mine, theirs)
    # per peer: another peer's mismatch is answered whatever this one's backoff
    assert g.on_mismatch("q", mine, theirs)


def test_full_lists_are_rate_limited_per_peer_and_owed_once() -> None:
    g = Gossip(min_push_s=3.0)
    assert g.request_push("p", 0.0)
    assert not g.request_push("p", 1.0)
    assert not g.request_push("p", 1.5, pull=True)
    assert g.request_push("q", 1.5)  # another peer has its own limit
    assert g.due(2.9) == []
    assert g.due(3.0) == [("p", Owed(full=True, pull=True))]  # one owed list, with the pull
    assert g.due(100.0) == []


def test_a_request_flood_gets_a_bounded_number_of_full_lists() -> None:
    g = Gossip(min_push_s=3.0)
    sent = 0
    t = 0.0
    for i in range(10_000):  # a request every millisecond for 10 s
        t = i / 1000
        sent += g.request_push("p", t, pull=i % 2 == 0)
        if i % 100 == 0:  # the node's tick
            sent += len(g.due(t))
    sent += len(g.due(t + 3.0))
    assert sent <= 10 / 3 + 2


def test_full_lists_per_tick_are_bounded_and_owed_ones_dropped_once_views_agree() -> None:
    g = Gossip(min_push_s=3.0, per_tick=8)
    ours = digest([A, B])
    peers = [f"{i:032x}" for i in range(50)]  # 50 views differ at once (a join storm)
    sent = [p for p in peers if g.request_push(p, 0.0, theirs=digest([p]))]
    assert len(sent) == 8 and g.owed()
    # by the next tick, 10 of the owed peers showed our digest: nothing owed to them
    for p in peers[8:18]:
        g.request_push(p, 0.5, theirs=ours)
    out = g.due(1.0, ours)
    assert len(out) == 8 and not {p for p, _ in out} & set(peers[8:18])
    assert all(what.full for _, what in out)
    total = 8 + len(out)
    for t in range(2, 20):
        total += len(g.due(float(t), ours))
    assert total == 50 - 10 and not g.owed()
    # a node that joined through us gets its list whatever the budget (once per window)
    assert g.request_push("new", 20.0, newcomer=True)
    assert not g.request_push("new", 20.5, newcomer=True)


def test_forget_drops_the_state() -> None:
    g = Gossip(min_push_s=3.0)
    g.request_push("p", 0.0)
    g.on_mismatch("p", b"1" * 8, b"2" * 8)
    assert len(g) == 1
    g.forget("p")
    assert len(g) == 0 and g.request_push("p", 0.1)


def test_digest_body_codec() -> None:
    d = control.Digest(digest([A]), 1, True)
    assert control.digest_from_wire(control.digest_to_wire(d)) == d
    assert control.digest_from_wire({"d": b"x" * 8}) == control.Digest(b"x" * 8, 0, False)
    # 1.3: bucket hashes (k = len(b) / 4), or a want of bucket indices out of k
    ask = control.Digest(b"x" * 8, 3, True, b"s" * 8, b"h" * 16, 4)
    assert control.digest_to_wire(ask) == {"d": b"x" * 8, "n": 3, "pull": True,
                                           "s": b"s" * 8, "b": b"h" * 16}
    assert control.digest_from_wire(control.digest_to_wire(ask)) == ask
    want = control.Digest(b"x" * 8, 3, True, b"s" * 8, None, 4, (0, 3))
    assert control.digest_to_wire(want) == {"d": b"x" * 8, "n": 3, "pull": True,
                                            "s": b"s" * 8, "k": 4, "w": [0, 3]}
    assert control.digest_from_wire(control.digest_to_wire(want)) == want
    assert control.MAX_BUCKETS == gossip.MAX_BUCKETS
    base = {"d": b"x" * 8}
    s8 = {"s": b"s" * 8}
    for bad in ([], {"d": b"short"}, {"d": "x" * 8}, {"d": b"x" * 8, "n": -1},
                {"d": b"x" * 8, "n": True}, {"d": b"x" * 8, "pull": 1},
                {**base, "b": b"h" * 4},  # no salt
                {**base, "s": b"short", "b": b"h" * 4},
                {**base, **s8, "b": b""}, {**base, **s8, "b": b"h" * 6},
                {**base, **s8, "b": b"h" * (4 * 1025)}, {**base, **s8, "b": "hhhh"},
                {**base, **s8, "b": b"h" * 4, "k": 1, "w": [0]},  # both steps at once
                {**base, **s8, "w": [0]},  # a want without k
                {**base, **s8, "k": 0, "w": []}, {**base, **s8, "k": 1025, "w": []},
                {**base, **s8, "k": 4, "w": [4]}, {**base, **s8, "k": 4, "w": [1, 1]},
                {**base, **s8, "k": 4, "w": [-1]}, {**base, **s8, "k": 4, "w": [True]},
                {**base, **s8, "k": 4, "w": "01"}, {**base, **s8, "k": True, "w": []}):
        try:
            control.digest_from_wire(bad)
        except control.ProtocolError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_hello_rev_is_written_read_and_optional() -> None:
    from mesh.peers import PeerInfo
    info = PeerInfo(node_id=A, name="a", mesh="m")
    wire = control.hello_to_wire(control.Hello(info))
    assert wire["rev"] == [1, 3]
    assert control.hello_from_wire(wire).rev == (1, 3)
    old = control.hello_to_wire(control.Hello(info, rev=None))
    assert "rev" not in old and control.hello_from_wire(old).rev is None
    for bad in ([1], [1, "2"], "1.2", [1, True], [1, 1 << 20]):
        try:
            control.hello_from_wire({**wire, "rev": bad})
        except control.ProtocolError:
            continue
        raise AssertionError(f"accepted rev {bad!r}")


# --- buckets (control 1.3) ----------------------------------------------------------------------

SALT = bytes(range(8))


def _ids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


def test_bucket_count_keeps_one_or_two_ids_per_bucket() -> None:
    assert [bucket_count(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 50, 200, 512, 5000)] == [
        1, 1, 1, 2, 2, 4, 8, 16, 32, 128, 256, 256]


def test_bucket_hashes_are_the_documented_function() -> None:
    ids = _ids(20)
    k = 8
    b = buckets(ids, SALT, k)
    assert len(b) == 4 * k and buckets(reversed(ids), SALT, k) == b  # any order
    for i in range(k):
        mine = sorted(x for x in ids if gossip.bucket_of(x, SALT, k) == i)
        assert gossip.bucket_of(mine[0], SALT, k) == int.from_bytes(hashlib.blake2b(
            mine[0].encode(), digest_size=4, key=SALT).digest(), "big") % k if mine else True
        want = hashlib.blake2b("".join(mine).encode(), digest_size=4, key=SALT).digest() \
            if mine else bytes(4)
        assert b[4 * i:4 * i + 4] == want
    # another salt: another bucketing and other hashes (a collision is never the same twice)
    assert buckets(ids, b"\xff" * 8, k) != b


def _entry(nid: str) -> bytes:
    # the size of one real gossip entry on the wire (one tcp endpoint, no key)
    return msgpack.packb(control.gossip_to_wire(
        [(nid, "scale123456789", "4c1f0e9a", ("tcp://127.0.0.1:40000",), None)])[0])


def _exchange(a: set[str], b: set[str], salt: bytes = SALT) -> tuple[int, set[str], set[str]]:
    """One bucket reconciliation as the channel runs it (b saw a's digest differ): the wire
    bytes of its three steps, and the ids each side got from the other."""
    k = bucket_count(len(b))
    ask = control.Digest(digest(b), len(b), True, salt, buckets(b, salt, k))
    wire = len(msgpack.packb(control.digest_to_wire(ask)))
    # a compares and answers with its entries of the differing buckets and a want of them
    got = control.digest_from_wire(msgpack.packb(control.digest_to_wire(ask)) and
                                   control.digest_to_wire(ask))
    assert got.salt is not None and got.buckets is not None
    diff = differing(buckets(a, got.salt, got.k), got.buckets)
    to_b = set(in_buckets(a, salt, k, diff))
    want = control.Digest(digest(a), len(a), True, salt, None, k, tuple(diff))
    wire += len(msgpack.packb(control.digest_to_wire(want)))
    # b answers the want with its entries of those buckets
    to_a = set(in_buckets(b, salt, k, diff))
    wire += sum(len(_entry(x)) for x in to_b | to_a)
    return wire, to_b, to_a


def test_one_differing_id_costs_a_few_entries_not_n() -> None:
    """With a full list (1.2) a difference of one id among 200 costs 200 entries; with
    buckets, the bucket hashes (4 bytes each, about n/2 buckets) and the entries of one
    bucket each way."""
    ids = set(_ids(200))
    extra = _ids(1, seed=99)[0]
    full = sum(len(_entry(x)) for x in ids)
    for a, b in ((ids | {extra}, ids), (ids, ids | {extra})):
        wire, to_b, to_a = _exchange(a, b)
        # each side learnt what it lacked
        assert extra in (to_b if extra in a else to_a)
        # what the other side learnt was at most the ids of that bucket (1-2, a few at most)
        assert len(to_b) + len(to_a) <= 8
        assert wire <= 4 * bucket_count(200) + 100 + 8 * len(_entry(extra))
        assert wire * 8 < full, (wire, full)


def test_the_cost_follows_the_difference() -> None:
    ids = _ids(400)
    base = set(ids[:200])
    costs = []
    for d in (1, 4, 16):
        a = base | set(ids[200:200 + d])  # a holds d ids b lacks
        b = base - set(ids[:d])  # and b lacks d of the shared ones too: a holds them
        b |= set(ids[300:300 + d])  # and b holds d that a lacks
        wire, to_b, to_a = _exchange(a, b)
        assert (a - b) <= to_b and (b - a) <= to_a  # both sides get all they lack
        costs.append(wire)
    # bucket hashes are a fixed part; the entries grow with d, never to the whole view
    assert costs[0] < costs[1] < costs[2] < sum(len(_entry(x)) for x in base)


def test_equal_views_have_no_differing_bucket_and_differing_views_some() -> None:
    ids = _ids(64)
    k = bucket_count(64)
    assert differing(buckets(ids, SALT, k), buckets(list(reversed(ids)), SALT, k)) == []
    d = differing(buckets(ids, SALT, k), buckets(ids[1:], SALT, k))
    assert d == [gossip.bucket_of(ids[0], SALT, k)]


def test_owed_bucket_answers_merge() -> None:
    w1 = Owed(want=Want(SALT, 8, frozenset({1})))
    w2 = Owed(want=Want(SALT, 8, frozenset({2, 3})))
    assert w1.merge(w2) == Owed(want=Want(SALT, 8, frozenset({1, 2, 3})))
    # a want of another exchange: the later one (the peer's newer exchange finds the rest)
    w3 = Owed(want=Want(b"2" * 8, 8, frozenset({5})))
    assert w1.merge(w3) == w3
    c1 = Owed(compare=Compare(SALT, b"1" * 32))
    c2 = Owed(compare=Compare(b"2" * 8, b"2" * 32))
    assert c1.merge(c2) == c2  # the later compare: the peer's newer view
    # two exchanges crossed (each side asked the other): both answers, not the full list
    assert c1.merge(w1) == w1.merge(c1) == Owed(compare=c1.compare, want=w1.want)
    assert c1.compare is not None and c1.compare.k == 8
    # with a full list: the full list, with a pull when either asked for the peer's entries
    assert Owed(full=True).merge(w1) == Owed(full=True)
    assert Owed(full=True).merge(c1) == Owed(full=True, pull=True)
    assert w1.merge(Owed(full=True, pull=True)) == Owed(full=True, pull=True)


def test_bucket_answers_share_the_list_rate_limit_and_asks_have_their_own() -> None:
    g = Gossip(min_push_s=3.0)
    # asks: one per peer per 3 s, dropped (not owed) beyond
    assert g.may_ask("p", 0.0) == "send" and g.may_ask("p", 1.0) == "limited"
    assert g.may_ask("q", 1.0) == "send" and g.may_ask("p", 3.0) == "send"
    # the answer to our ask is a list of its own: an ask does not spend the per-peer list limit
    want = Owed(want=Want(SALT, 4, frozenset({0})))
    assert g.request_push("p", 3.1, what=want)
    more = Owed(want=Want(SALT, 4, frozenset({2})))
    assert not g.request_push("p", 3.2, what=more)  # owed, merged
    assert not g.request_push("p", 3.3, what=want)
    assert g.due(6.2) == [("p", Owed(want=Want(SALT, 4, frozenset({0, 2}))))]
    assert not g.owed()


def test_asks_share_the_per_tick_budget_and_are_owed_beyond_it() -> None:
    """A join storm: every view differs at once. In 1.2 at most 8 mismatches per tick were
    answered (full list and pull), the rest owed; asks are held to the same budget."""
    g = Gossip(min_push_s=3.0, per_tick=8)
    ours = digest([A, B])
    peers = [f"{i:032x}" for i in range(50)]
    verdicts = [g.may_ask(p, 0.0) for p in peers]
    assert verdicts.count("send") == 8 and verdicts.count("owed") == 42 and g.owed()
    for p in peers[8:18]:  # by the next tick these showed our digest: nothing owed to them
        g.on_mismatch(p, ours, ours)
        g.request_push(p, 0.5, theirs=ours, what=Owed(want=Want(SALT, 1, frozenset())))
    out = g.due(1.0, ours)
    assert len(out) == 8 and all(w == Owed(ask=True) for _, w in out)
    assert not {p for p, _ in out} & set(peers[:18])
    total = 8 + len(out)
    for t in range(2, 20):
        total += len(g.due(float(t), ours))
    assert total == 50 - 10 and not g.owed()


def test_an_ask_flood_is_bounded() -> None:
    g = Gossip(min_push_s=3.0)
    asks = 0
    for i in range(10_000):  # 10 s of 1 kHz mismatches from one peer, a tick each 100 ms
        asks += g.may_ask("p", i / 1000) == "send"
        if i % 100 == 0:
            asks += sum(1 for _, w in g.due(i / 1000) if w.ask)
    assert asks == 4  # 0, 3, 6, 9 s


def test_agreement_drops_what_is_owed() -> None:
    """A join storm leaves lists (and bucket hashes) owed to many peers. Once a peer's digest
    equals ours they carry nothing it lacks. The old code forgot the peer's digest on
    agreement (``theirs = None``), so the owed lists were never dropped: 200 idle nodes sent
    0.16 full lists per node per second (each with a pull, answered with another full list),
    drained from the join at 8 per heartbeat; this fails there."""
    g = Gossip(min_push_s=3.0, per_tick=1)
    ours = digest([A, B, C])
    assert g.request_push("p", 0.0, theirs=digest([A]))
    assert not g.request_push("q", 0.0, pull=True, theirs=digest([B]))  # over the budget
    assert g.may_ask("r", 0.0) == "owed"
    assert g.owed()
    g.on_agree("q", ours)  # their next round's digest equals ours
    g.on_agree("r", ours)
    assert not g.owed()
    assert g.due(10.0, ours) == []
    # what the peer shows later is compared again: a new mismatch is answered
    assert g.on_mismatch("q", ours, digest([A])) and g.request_push("q", 10.0, pull=True)
