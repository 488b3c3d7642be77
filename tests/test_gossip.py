"""Gossip decisions without sockets (mesh/gossip.py): the digest, the revision negotiation,
the backoff of a persistent mismatch and the per-peer rate limit of full lists."""

from __future__ import annotations

import hashlib

from mesh import control
from mesh.gossip import DIGEST_BYTES, GOSSIP_REVISION, Gossip, digest, speaks_digest

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
    assert GOSSIP_REVISION == control.REVISION == (1, 2)
    assert not speaks_digest(None)  # no rev in its HELLO: a build before 1.2
    assert not speaks_digest((1, 1)) and not speaks_digest((1, 0))
    assert speaks_digest((1, 2)) and speaks_digest((1, 9))
    assert not speaks_digest((2, 0))  # another major: not assumed


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
    g.on_agree("p")
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
    assert g.due(3.0) == [("p", True)]  # one owed list (with the pull asked for)
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
    for bad in ([], {"d": b"short"}, {"d": "x" * 8}, {"d": b"x" * 8, "n": -1},
                {"d": b"x" * 8, "n": True}, {"d": b"x" * 8, "pull": 1}):
        try:
            control.digest_from_wire(bad)
        except control.ProtocolError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_hello_rev_is_written_read_and_optional() -> None:
    from mesh.peers import PeerInfo
    info = PeerInfo(node_id=A, name="a", mesh="m")
    wire = control.hello_to_wire(control.Hello(info))
    assert wire["rev"] == [1, 2]
    assert control.hello_from_wire(wire).rev == (1, 2)
    old = control.hello_to_wire(control.Hello(info, rev=None))
    assert "rev" not in old and control.hello_from_wire(old).rev is None
    for bad in ([1], [1, "2"], "1.2", [1, True], [1, 1 << 20]):
        try:
            control.hello_from_wire({**wire, "rev": bad})
        except control.ProtocolError:
            continue
        raise AssertionError(f"accepted rev {bad!r}")
