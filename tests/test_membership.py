"""mesh.membership: who speaks for a node id, decided from plain values and a fake clock
(no sockets, no reactor). The real-socket versions of these rules are in test_node*.py and
test_hostile_node.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from mesh.budget import Budget
from mesh.control import Hello
from mesh.membership import Claim, Membership
from mesh.peers import PeerInfo, PeerState, Presence

MESH = "m"
SELF = "0" * 32
A = "a" * 32
B = "b" * 32
C = "c" * 32
HB, EVASIVE, GONE, PRUNE = 1.0, 3.0, 10.0, 300.0


def make(per_source: int = 4, total: int = 16, secure: bool = False,
         certs: dict[str, str] | None = None) -> Membership:
    presence = Presence(EVASIVE, GONE, PRUNE)
    return Membership(SELF, MESH, presence, heartbeat_s=HB, evasive_s=EVASIVE, gone_s=GONE,
                      peer_budget=Budget("peer_ids", per_source, total), secure=secure,
                      key_for_node=(certs or {}).get, name="test")


def hello(node_id: str, proof: bytes | None = None, key: str | None = None,
          mesh: str = MESH, dial: int | None = None, reply: bool = False, inc: int = 0,
          ep: str = "tcp://10.0.0.1:1") -> Hello:
    return Hello(PeerInfo(node_id=node_id, name=node_id[:4], mesh=mesh, public_key=key,
                          endpoints={"control": (ep,)}, incarnation=inc),
                 dial=dial, reply=reply, proof=proof)


def arrive(m: Membership, ident: bytes, h: Hello, now: float, key: str | None = None,
           addr: str | None = "10.0.0.1", has_link: bool = False) -> Claim | str | None:
    """What the channel does with a HELLO: check, claim when unbound, upsert when bound."""
    node_id = h.info.node_id
    verdict = m.check_hello(ident, node_id, key, h)
    if verdict != "ok":
        return verdict
    if m.is_bound(node_id, ident):
        m.same_connection(node_id, h)
        decision: Claim | str = "same"
    else:
        decision = m.claim(ident, node_id, key, addr, h, {"hello": 1}, now, has_link=has_link)
        if decision not in (Claim.BOUND, Claim.REBOUND):
            return decision
    m.presence.upsert(h.info, now)
    return decision


def rid(node_id: str, n: int) -> bytes:
    return node_id.encode() + bytes([n]) * 8


def test_new_id_binds_and_is_charged_to_its_source() -> None:
    m = make()
    assert arrive(m, rid(A, 1), hello(A), 0.0) is Claim.BOUND
    assert m.is_bound(A, rid(A, 1)) and not m.is_bound(A, rid(A, 2))
    assert m.id_src[A] == ("addr", "10.0.0.1")
    assert m.peer_budget.held(("addr", "10.0.0.1")) == 1
    # the same connection again: no new claim, nothing charged twice
    assert arrive(m, rid(A, 1), hello(A), 0.5) == "same"
    assert m.peer_budget.held() == 1


def test_restart_with_its_proof_takes_over_at_once() -> None:
    m = make()
    proof = b"p" * 16
    assert arrive(m, rid(A, 1), hello(A, proof), 0.0) is Claim.BOUND
    # a new connection 0.1 s later (the bound one is not quiet) showing the same proof
    assert arrive(m, rid(A, 2), hello(A, proof), 0.1) is Claim.REBOUND
    assert m.is_bound(A, rid(A, 2))
    assert m.counters["id_rebinds"] == 1 and m.counters["id_claims_held"] == 0


def test_secure_same_key_takes_over_at_once_other_key_waits() -> None:
    m = make(secure=True)
    assert arrive(m, rid(A, 1), hello(A, key="K1"), 0.0, key="K1") is Claim.BOUND
    assert arrive(m, rid(A, 2), hello(A, key="K1"), 0.1, key="K1") is Claim.REBOUND
    assert arrive(m, rid(A, 3), hello(A, key="K2"), 0.2, key="K2") is Claim.HELD
    assert m.is_bound(A, rid(A, 2))


def test_secure_hello_must_match_its_handshake_key_and_certificate() -> None:
    m = make(secure=True, certs={A: "K1"})
    assert arrive(m, rid(A, 1), hello(A, key="K1"), 0.0, key="K2") is None
    assert m.counters["security_key_mismatch"] == 1
    assert arrive(m, rid(A, 1), hello(A, key="K2"), 0.0, key="K2") is None  # cert names K1
    assert m.counters["security_key_mismatch"] == 2
    assert arrive(m, rid(A, 1), hello(A, key="K1"), 0.0, key="K1") is Claim.BOUND


def test_stranger_waits_for_the_bound_connection_to_go_quiet() -> None:
    m = make()
    assert arrive(m, rid(A, 1), hello(A, b"p" * 16), 0.0) is Claim.BOUND
    # another connection, another (or no) proof, while the bound one speaks: held
    assert arrive(m, rid(A, 2), hello(A, b"q" * 16), 0.5) is Claim.HELD
    assert m.is_bound(A, rid(A, 1))
    assert m.counters["id_claims_held"] == 1 and A in m.claims
    # its messages are the claimant's: an UPDATE kept for the claim, others dropped
    assert m.claimant_message(A, rid(A, 2), "update", {"u": 1})
    assert m.claimant_message(A, rid(A, 2), "PING", 1)
    assert not m.claimant_message(A, rid(A, 3), "PING", 1)
    assert m.counters["claimant_messages_dropped"] == 1
    # the bound connection keeps talking: the claim stays held
    m.presence.heard(A, 1.0)
    assert m.retry_claims(1.5) == []
    # quiet for two heartbeats: the claim is ready to be replayed
    ready = m.retry_claims(1.0 + 2 * HB)
    assert [(pid, c.ident, c.update) for pid, c in ready] == [(A, rid(A, 2), {"u": 1})]
    assert m.counters["id_claims_bound"] == 1 and not m.claims
    assert arrive(m, rid(A, 2), hello(A, b"q" * 16), 3.0) is Claim.REBOUND


def test_held_claim_is_answered_on_our_link_at_most_once_per_heartbeat() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A), 0.0)
    assert arrive(m, rid(A, 2), hello(A, dial=7), 0.1, has_link=True) is Claim.HELD_ANSWER
    assert arrive(m, rid(A, 2), hello(A, dial=7), 0.2, has_link=True) is Claim.HELD
    assert arrive(m, rid(A, 2), hello(A, dial=7), 0.2 + HB, has_link=True) is Claim.HELD_ANSWER
    # no link of ours to answer on, or a reply (never answered): just held
    m.presence.heard(A, 4.9)
    assert arrive(m, rid(A, 3), hello(A, dial=8), 5.0) is Claim.HELD
    m.claim_answered.clear()
    assert arrive(m, rid(A, 3), hello(A, dial=8, reply=True), 5.0, has_link=True) is Claim.HELD


def test_old_claims_expire_after_gone_s() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A), 0.0)
    assert arrive(m, rid(A, 2), hello(A), 0.5) is Claim.HELD
    for t in range(1, 12):  # the bound connection never goes quiet
        m.presence.heard(A, float(t))
        assert m.retry_claims(float(t) + 0.1) == []
    assert not m.claims


def test_evasive_or_gone_id_is_taken_over_by_anyone() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A, b"p" * 16), 0.0)
    m.presence.tick(EVASIVE + 0.5)
    row = m.presence.get(A)
    assert row is not None and row.state is PeerState.EVASIVE
    assert arrive(m, rid(A, 2), hello(A), EVASIVE + 0.6) is Claim.REBOUND


def test_full_source_budget_evicts_its_longest_gone_id() -> None:
    m = make(per_source=2, total=16)
    arrive(m, rid(A, 1), hello(A), 0.0)
    arrive(m, rid(B, 1), hello(B), 1.0)
    assert arrive(m, rid(C, 1), hello(C), 1.5) is Claim.REFUSED  # nobody gone to evict
    assert m.counters["peer_ids_refused"] == 1
    m.presence.goodbye(B, 2.0)
    m.presence.goodbye(A, 3.0)  # A gone later than B: B is the one forgotten
    assert arrive(m, rid(C, 1), hello(C), 4.0) is Claim.BOUND
    assert B not in m.presence and B not in m.id_src and not m.is_bound(B, rid(B, 1))
    assert A in m.presence
    assert m.counters["peer_ids_evicted"] == 1
    assert m.peer_budget.held(("addr", "10.0.0.1")) == 2
    # another source is not charged for this one's ids
    assert arrive(m, rid(B, 2), hello(B), 5.0, addr="10.0.0.2") is Claim.BOUND


def test_full_total_budget_evicts_anyones_gone_id() -> None:
    m = make(per_source=4, total=2)
    arrive(m, rid(A, 1), hello(A), 0.0, addr="10.0.0.1")
    arrive(m, rid(B, 1), hello(B), 0.0, addr="10.0.0.2")
    m.presence.goodbye(A, 1.0)
    assert arrive(m, rid(C, 1), hello(C), 2.0, addr="10.0.0.3") is Claim.BOUND
    assert A not in m.presence and m.peer_budget.held(("addr", "10.0.0.1")) == 0


def test_forget_returns_the_budget_and_drops_the_binding() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A, b"p" * 16), 0.0)
    arrive(m, rid(A, 2), hello(A), 0.5)  # a held claim
    m.forget(A)
    assert not m.is_bound(A, rid(A, 1)) and A not in m.claims and A not in m.proofs
    assert m.peer_budget.held() == 0


def test_check_hello_refuses_other_mesh_wrong_id_and_notes_self() -> None:
    m = make()
    assert m.check_hello(rid(A, 1), A, None, hello(A, mesh="other")) is None
    assert m.counters["wrong_mesh"] == 1
    assert m.check_hello(rid(B, 1), B, None, hello(A)) is None  # routing id names another id
    assert m.counters["malformed"] == 1
    assert m.check_hello(rid(SELF, 1), SELF, None, hello(SELF)) == "self"


def test_gossip_candidates_skip_self_other_mesh_live_linked_and_pending() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A), 0.0)  # live
    D, E, F, G = "d" * 32, "e" * 32, "f" * 32, "1" * 32

    def entry(nid: str, mesh: str = MESH, eps: tuple[str, ...] = ("tcp://h:1",)) -> Any:
        return (nid, mesh, "host", eps, None)

    entries = [entry(SELF), entry(A), entry(B, mesh="other"), entry(C), entry(D),
               entry(E, eps=("tcp://pending:9",)), entry(F), entry(F), entry(G)]
    dialling: set[str | None] = {D}
    out = []
    for e in m.gossip_candidates(entries, dialling, {"tcp://pending:9"}, linked={G}):
        out.append(e[0])
        dialling.add(e[0])  # what the channel does once it dialled
    assert out == [C, F]  # F once: the second entry finds it dialling


# --- incarnations ------------------------------------------------------------------------------

P = b"p" * 16  # the proof a copy of a data dir shows too (same proof key, same endpoint)


def conflict_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "two processes claim" in r.getMessage()]


def test_restart_with_a_higher_incarnation_is_bound_at_once_and_no_conflict() -> None:
    m = make()
    assert arrive(m, rid(A, 1), hello(A, P, inc=10), 0.0) is Claim.BOUND
    assert arrive(m, rid(A, 2), hello(A, P, inc=11), 0.2) is Claim.REBOUND
    assert m.is_bound(A, rid(A, 2)) and m.incs[A] == 11
    assert m.superseded[A].ident == rid(A, 1)
    m.presence.heard(A, 1.0)
    m.expire(1.0)
    # the old process is dead: never heard again; its record goes after gone_s
    m.presence.heard(A, GONE + 0.1)
    m.expire(GONE + 0.5)
    assert A not in m.superseded
    assert m.counters["id_conflicts"] == 0


def test_higher_incarnation_still_needs_the_takeover_proof() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A, P, inc=10), 0.0)
    assert arrive(m, rid(A, 2), hello(A, b"q" * 16, inc=11), 0.2) is Claim.HELD
    assert m.is_bound(A, rid(A, 1))


def test_superseded_connection_heard_again_is_a_conflict_and_the_first_is_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    m = make()
    first, second = rid(A, 1), rid(A, 2)
    arrive(m, first, hello(A, P, inc=10, ep="tcp://10.0.0.1:1"), 0.0)
    # a copy of the data dir starts later: a higher incarnation, the same proof
    assert arrive(m, second, hello(A, P, inc=11, ep="tcp://10.0.0.2:2"), 0.5) is Claim.REBOUND
    # within a heartbeat of the rebind, the old connection's messages are only dropped
    assert m.superseded_message(A, first, "ping", 0.9) is True
    assert m.counters["id_conflicts"] == 0 and m.counters["superseded_dropped"] == 1
    m.presence.heard(A, 1.4)  # the newer one speaks too
    restored = m.superseded_message(A, first, "ping", 1.6)
    assert isinstance(restored, PeerInfo) and restored.endpoints["control"] == ("tcp://10.0.0.1:1",)
    assert m.is_bound(A, first) and m.incs[A] == 10 and m.proofs[A] == P
    assert m.counters["id_conflicts"] == 1
    # the second is refused while the first lives: its HELLOs, its other messages, and any
    # newer claim (a restart of the second cannot be told from the second)
    m.presence.heard(A, 2.0)
    assert arrive(m, second, hello(A, P, inc=11), 2.1) is Claim.CONFLICT
    assert m.refused_message(A, second)
    assert arrive(m, rid(A, 3), hello(A, P, inc=12), 2.2) is Claim.CONFLICT
    assert m.counters["id_conflict_refusals"] == 2 and m.counters["id_conflict_dropped"] == 1
    assert m.is_bound(A, first) and m.counters["id_conflicts"] == 1
    # one warning per id, naming both
    (text,) = conflict_warnings(caplog)
    assert "tcp://10.0.0.1:1" in text and "tcp://10.0.0.2:2" in text and A in text
    # the first stops speaking: the conflict ends, the next claim follows the usual rules
    t = 2.0 + 2 * HB
    m.expire(t)
    assert A not in m.conflicts
    assert arrive(m, rid(A, 3), hello(A, P, inc=12), t) is Claim.REBOUND


def test_superseded_hello_again_reverts_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    m = make()
    first, second = rid(A, 1), rid(A, 2)
    arrive(m, first, hello(A, P, inc=10), 0.0)
    arrive(m, second, hello(A, P, inc=11), 0.5)
    m.presence.heard(A, 1.5)
    assert arrive(m, first, hello(A, P, inc=10), 1.8) is Claim.REVERTED
    assert m.is_bound(A, first) and m.counters["id_conflicts"] == 1
    # the two swap again later (the first restarts, the copy supersedes it...): counted,
    # never logged again for this id
    m.forget(A)
    m.presence.forget(A)
    arrive(m, first, hello(A, P, inc=20), 10.0)
    arrive(m, second, hello(A, P, inc=21), 10.5)
    m.presence.heard(A, 11.5)
    assert arrive(m, first, hello(A, P, inc=20), 11.8) is Claim.REVERTED
    assert len(conflict_warnings(caplog)) == 1


def test_bye_of_the_superseded_connection_is_no_conflict() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A, P, inc=10), 0.0)
    arrive(m, rid(A, 2), hello(A, P, inc=11), 0.2)
    m.presence.heard(A, 1.5)
    assert m.superseded_message(A, rid(A, 1), "bye", 1.6) is True
    assert A not in m.superseded and m.counters["id_conflicts"] == 0
    assert m.is_bound(A, rid(A, 2))


def test_lower_incarnation_than_the_live_bound_one_is_refused() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A, P, inc=10), 0.0)
    assert arrive(m, rid(A, 2), hello(A, P, inc=9), 0.5) is Claim.CONFLICT
    assert m.counters["id_conflicts"] == 1 and m.is_bound(A, rid(A, 1))
    assert arrive(m, rid(A, 2), hello(A, P, inc=9), 0.7) is Claim.CONFLICT
    assert m.counters["id_conflicts"] == 1 and m.counters["id_conflict_refusals"] == 1
    # the bound one went quiet (dead): the older process may have the id again
    t = 0.0 + 2 * HB
    m.expire(t)
    assert arrive(m, rid(A, 2), hello(A, P, inc=9), t) is Claim.REBOUND


def test_equal_or_missing_incarnations_follow_the_old_rules() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A, P, inc=10), 0.0)
    assert arrive(m, rid(A, 2), hello(A, b"q" * 16, inc=10), 0.1) is Claim.HELD
    assert arrive(m, rid(A, 3), hello(A, P, inc=10), 0.2) is Claim.REBOUND
    assert A not in m.superseded  # the same process: nothing superseded
    # an older build (no incarnation) with the proof: as before, bound at once
    assert arrive(m, rid(A, 4), hello(A, P, inc=0), 0.3) is Claim.REBOUND
    # and after it, any incarnation with the proof
    assert arrive(m, rid(A, 5), hello(A, P, inc=3), 0.4) is Claim.REBOUND
    assert m.counters["id_conflicts"] == 0


def test_one_connection_keeps_one_incarnation() -> None:
    m = make()
    arrive(m, rid(A, 1), hello(A, P, inc=10), 0.0)
    assert arrive(m, rid(A, 1), hello(A, P, inc=10), 0.1) == "same"
    assert not m.same_connection(A, hello(A, P, inc=11))
    assert m.counters["malformed"] == 1


def test_a_stranger_with_a_lower_incarnation_is_held_not_a_conflict() -> None:
    """No proof, no key: nothing says it is the node, so it is no second process either."""
    m = make()
    arrive(m, rid(A, 1), hello(A, P, inc=10), 0.0)
    assert arrive(m, rid(A, 2), hello(A, None, inc=9), 0.5) is Claim.HELD
    assert arrive(m, rid(A, 3), hello(A, b"q" * 16, inc=99), 0.6) is Claim.HELD
    assert m.counters["id_conflicts"] == 0 and not m.conflicts


def test_secure_same_key_lower_incarnation_is_a_conflict_other_key_held() -> None:
    m = make(secure=True)
    assert arrive(m, rid(A, 1), hello(A, key="K", inc=10), 0.0, key="K") is Claim.BOUND
    assert arrive(m, rid(A, 2), hello(A, key="K", inc=9), 0.3, key="K") is Claim.CONFLICT
    assert arrive(m, rid(A, 3), hello(A, key="K2", inc=9), 0.4, key="K2") is Claim.HELD
    assert m.counters["id_conflicts"] == 1
