"""Membership: which connection speaks for which node id (no sockets, no reactor, no clock).

A node id is public (mDNS, gossip), so a HELLO naming one proves nothing by itself. This
module holds the decisions the control channel (mesh.channel) carries out when a HELLO
arrives (docs/protocol.md, "Connections and node ids"):

- :meth:`Membership.check_hello`: is this HELLO about a node we may talk to at all (our mesh,
  the id its routing id names, not ourselves, under CURVE the key its handshake proved)?
- :meth:`Membership.claim`: a connection not yet bound to the id claims it. A new id is
  charged to its source (CURVE key or address) under the peer budget; a live id moves to the
  new connection at once when it proves it is the same node (same key; in plaintext the proof
  its bound connection showed), else the claim is held until the bound connection is quiet
  (:meth:`retry_claims`, from the heartbeat).
- Incarnations (``info.inc``, mesh.datadir.next_incarnation): a claim with a higher
  incarnation than the bound connection's, and the proof needed above, is a restart (bound
  at once); the connection it replaced is remembered. If that one is heard again while the
  newer one lives, two processes hold one id (a cloned data dir or device image): counted
  ``id_conflicts``, one warning per id naming both, and the connection that appeared first
  is kept (bound again); the second is refused while the first lives. A claim with a lower
  incarnation than a live bound connection's is refused and counted the same way. Equal
  incarnations (the same process), or 0 on either side (an older build), follow the rules
  above alone.
- :meth:`forget` / :meth:`evict_gone`: pruned and evicted rows give their budget back.
- :meth:`gossip_candidates`: which gossiped node ids are worth a dial.

Everything comes in as plain values (routing ids, keys, proofs, times); tests drive it with a
fake clock (tests/test_membership.py).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mesh import control
from mesh.budget import Budget, LogLimiter
from mesh.control import GossipEntry, Hello
from mesh.peers import PeerInfo, PeerRecord, PeerState, Presence

__all__ = ["Claim", "Conflict", "HeldClaim", "Membership", "Superseded", "source_of"]


class Claim(enum.Enum):
    """What :meth:`Membership.claim` decided about a connection claiming a node id."""

    #: the connection now speaks for the id (a new id, or one whose bound connection was
    #: silent or proved to be the same node)
    BOUND = "bound"
    #: bound, and it replaced another connection (counted ``id_rebinds``)
    REBOUND = "rebound"
    #: held until the bound connection is quiet (counted ``id_claims_held``)
    HELD = "held"
    #: held, and the channel should answer the claimant's dial on its own link to the id
    #: (the ack reaches only the real node)
    HELD_ANSWER = "held_answer"
    #: refused (counted): the source introduced too many node ids
    REFUSED = "refused"
    #: refused (counted ``id_conflicts`` or ``id_conflict_refusals``): another process holds
    #: this id on a live connection that appeared first (a lower incarnation than the bound
    #: one, or the second of a conflict already found)
    CONFLICT = "conflict"
    #: dropped (counted ``superseded_dropped``): the connection a restart replaced, read just
    #: after the restart (a message sent before the old process died)
    DROPPED = "dropped"
    #: the claimant is the connection a newer incarnation replaced, heard again while the
    #: newer one lives: a conflict (counted); the claimant, which appeared first, is bound
    #: again
    REVERTED = "reverted"


@dataclass
class HeldClaim:
    """A HELLO for a live node id from a connection not bound to it, waiting."""

    ident: bytes
    key: str | None
    body: Any
    since: float
    #: the claimant's latest UPDATE body, applied if the claim is bound
    update: Any = None


@dataclass
class Superseded:
    """The connection a restart (a higher incarnation) replaced, kept for ``gone_s``: if it is
    heard again, it was not a restart but a second process."""

    ident: bytes
    incarnation: int
    info: PeerInfo
    proof: bytes | None
    since: float


@dataclass
class Conflict:
    """Two live processes claim one node id: ``first`` is kept, ``second`` refused."""

    first: bytes
    second: bytes
    first_incarnation: int
    second_incarnation: int
    since: float


def source_of(key: str | None, peer_address: str | None) -> object:
    """What a new node id is charged to: the CURVE key, else the source address."""
    if key is not None:
        return ("key", key)
    return ("addr", peer_address or "local")


class Membership:
    """The node-id bindings of one node's control channel.

    Args:
        self_id: this node's id.
        mesh: this node's mesh name.
        presence: the peer presence table (read; rows forgotten on eviction).
        lock: the lock guarding ``presence`` against other threads (the PeerTable's).
        heartbeat_s, evasive_s, gone_s: presence timing (mesh.node.PresenceConfig).
        peer_budget: node ids per source and in all.
        secure: CURVE is on (the handshake proves keys).
        key_for_node: under CURVE, the key a certificate names for a node id, or None.
        counters: where counts go (the node's stats).
        log: rate-limited log of what remote peers trigger.
        name: this node's name (log lines).
    """

    def __init__(
        self, self_id: str, mesh: str, presence: Presence, *, heartbeat_s: float,
        evasive_s: float, gone_s: float, peer_budget: Budget, secure: bool = False,
        key_for_node: Callable[[str], str | None] | None = None,
        counters: Counter[str] | None = None, log: LogLimiter | None = None,
        lock: threading.Lock | threading.RLock | None = None, name: str = "",
    ) -> None:
        self.self_id = self_id
        self.mesh = mesh
        self.presence = presence
        self.lock = lock if lock is not None else threading.Lock()
        self.heartbeat_s = heartbeat_s
        self.evasive_s = evasive_s
        self.gone_s = gone_s
        self.peer_budget = peer_budget
        self.secure = secure
        self.key_for_node = key_for_node
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.log = log if log is not None else LogLimiter(logging.getLogger(__name__))
        self.name = name
        #: node id -> the routing id it currently speaks through (set by a HELLO it carried)
        self.node_rid: dict[str, bytes] = {}
        #: node id -> the proof its bound connection showed
        self.proofs: dict[str, bytes] = {}
        #: node id -> the claim of another connection, one per id
        self.claims: dict[str, HeldClaim] = {}
        self.claim_answered: dict[str, float] = {}
        self.id_src: dict[str, object] = {}  # node id -> the source charged for it
        #: node id -> the incarnation its bound connection announced (0: none, older build)
        self.incs: dict[str, int] = {}
        #: node id -> the connection a higher incarnation replaced (see Superseded)
        self.superseded: dict[str, Superseded] = {}
        #: node id -> two live processes found holding it
        self.conflicts: dict[str, Conflict] = {}
        self._conflict_logged: set[str] = set()

    # --- counting ---------------------------------------------------------------------------

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def bad(self, key: str, message: str, *args: object) -> None:
        """Count ``key`` and log through the limiter (a flood cannot flood the log)."""
        self.counters[key] += 1
        self.log.warning(key, "node %s: " + message + " (%s #%d)", self.name, *args, key,
                         self.counters[key])

    # --- who speaks for a node id -----------------------------------------------------------

    def is_bound(self, peer_id: str | None, ident: bytes) -> bool:
        """True when connection ``ident`` speaks for ``peer_id``."""
        return peer_id is not None and self.node_rid.get(peer_id) == ident

    def check_hello(self, ident: bytes, peer_id: str | None, key: str | None,
                    hello: Hello) -> str | None:
        """Is ``hello`` (on connection ``ident``, whose routing id names ``peer_id``, under
        handshake key ``key``) about a node this one talks to?

        Returns:
            ``"ok"``; ``"self"`` (we dialled ourselves); None: refused (counted and logged).
        """
        info = hello.info
        if info.mesh != self.mesh:
            self.bad("wrong_mesh", "HELLO from mesh %r (we are %r)", info.mesh, self.mesh)
            return None
        if peer_id != info.node_id:
            self.bad("malformed", "HELLO node id %s != routing id %r", info.node_id, ident[:40])
            return None
        if info.node_id == self.self_id:
            return "self"
        if self.secure:
            if key is None or info.public_key != key:
                self.bad("security_key_mismatch", "peer %s announces key %r but its handshake "
                         "used %r", peer_id, info.public_key, key)
                return None
            cert_key = self.key_for_node(info.node_id) if self.key_for_node else None
            if cert_key is not None and cert_key != key:
                self.bad("security_key_mismatch", "peer %s: its certificate names another key "
                         "than %r", peer_id, key)
                return None
        return "ok"

    def may_take_over(self, peer_id: str, row: PeerRecord, key: str | None,
                      proof: bytes | None, now: float) -> bool:
        """May a new connection speak for live ``peer_id`` now (its bound one stops)?"""
        quiet = now - row.last_heard
        if row.state is not PeerState.JOINED or quiet > self.evasive_s:
            return True  # evasive or gone: its connection has been silent for evasive_s
        if self.secure:
            # The handshake proves the key: the node id's own key takes over at once (a
            # restart, a new DEALER); another key waits for the old one's silence above.
            return row.info.public_key == key
        # Plaintext proves nothing: the same process (its proof) at once, anyone else only
        # once the bound connection has been quiet for two heartbeats (it died: a restart).
        if proof is not None and self.proofs.get(peer_id) == proof:
            return True
        return quiet >= min(2 * self.heartbeat_s, self.evasive_s)

    def _alive(self, row: PeerRecord, now: float) -> bool:
        """The bound connection of ``row`` speaks (it sends every heartbeat): not quiet for
        two heartbeats (capped at evasive_s)."""
        return (row.state is PeerState.JOINED
                and now - row.last_heard < min(2 * self.heartbeat_s, self.evasive_s))

    def claim(self, ident: bytes, peer_id: str, key: str | None, peer_address: str | None,
              hello: Hello, body: Any, now: float, *, has_link: bool = False) -> Claim:
        """Connection ``ident`` (not bound to ``peer_id``) sent ``hello`` (raw ``body``).

        ``peer_address`` is the connection's source address (charged for a new plaintext id);
        ``has_link`` says whether we have our own link to ``peer_id`` (a held claim's dial may
        be answered there).
        """
        cur = self.node_rid.get(peer_id)
        row = self.presence.get(peer_id)
        inc = hello.info.incarnation
        bound_inc = self.incs.get(peer_id, 0)
        restart = False
        if row is None:
            # A node id new to this node: charged to the source that introduced it.
            if peer_id not in self.id_src:
                src = source_of(key, peer_address)
                # Gone rows hold their budget until pruned; a full budget forgets the longest
                # gone one first, so nodes that come and go with new ids are not locked out.
                budget = self.peer_budget
                if budget.held(src) >= budget.per_key:
                    self.evict_gone(src)
                elif budget.held() >= budget.total:
                    self.evict_gone(None)
                if not budget.take(src):
                    self.bad("peer_ids_refused", "HELLO from %s refused: %s introduced too many "
                             "node ids", peer_id, src)
                    return Claim.REFUSED
                self.id_src[peer_id] = src
        elif cur is not None and not self.may_take_over(peer_id, row, key, hello.proof, now):
            # The node id is live on another connection: this one may be a stranger. Held
            # (one per node id) until the bound connection is quiet, then retried by the tick.
            self.claims[peer_id] = HeldClaim(ident, key, body, now)
            # A restart without its proof (it dialled another endpoint, or lost its data dir)
            # looks exactly like this: counted, and said at INFO, not as a warning.
            self.count("id_claims_held")
            self.log.log(logging.INFO, "id_claims_held", "node %s: HELLO for live %s from "
                         "another connection held until its bound one is quiet",
                         self.name, peer_id)
            if (hello.dial is not None and not hello.reply and has_link
                    and now - self.claim_answered.get(peer_id, -1e9) >= self.heartbeat_s):
                # It may be the node's own dial of an endpoint that reached us: the ack goes
                # out on our link, which reaches only the real node (a stranger learns nothing).
                self.claim_answered[peer_id] = now
                return Claim.HELD_ANSWER
            return Claim.HELD
        elif cur is not None and self._alive(row, now) and (
                (c := self.conflicts.get(peer_id)) is not None and c.first == cur
                and (ident == c.second or (inc and inc > c.first_incarnation))):
            # From here on the claim proves to be the node (proof or key; a stranger's claim
            # was held above). Two processes hold this id and the first one still speaks: the
            # second (or any newer claim: it cannot be told from the second) stays refused.
            self.count("id_conflict_refusals")
            return Claim.CONFLICT
        elif cur is not None and inc and bound_inc and inc < bound_inc \
                and self._alive(row, now):
            sup = self.superseded.get(peer_id)
            if sup is not None and sup.ident == ident:
                if now - sup.since < self.heartbeat_s:
                    # Read just after the restart that replaced it (a message the old process
                    # sent before it died, read late): not yet a sign of a second process.
                    self.count("superseded_dropped")
                    return Claim.DROPPED
                self._revert(peer_id, sup, cur, bound_inc, row.info, now)
                sup_proof = hello.proof if hello.proof is not None else sup.proof
                if sup_proof is not None:
                    self.proofs[peer_id] = sup_proof
                return Claim.REVERTED
            self._conflict(peer_id, cur, ident, bound_inc, inc, row.info, hello.info, now)
            return Claim.CONFLICT
        else:
            # A restart: a newer incarnation replaces a bound connection that still looked
            # alive (it proved to be the node). Remembered, in case it is heard again.
            restart = cur is not None and row is not None and bool(inc) and inc > bound_inc > 0
            if restart:
                assert cur is not None and row is not None
                self.superseded[peer_id] = Superseded(cur, bound_inc, row.info,
                                                      self.proofs.get(peer_id), now)
        self.node_rid[peer_id] = ident
        self.incs[peer_id] = inc
        if hello.proof is not None:
            self.proofs[peer_id] = hello.proof
        else:
            self.proofs.pop(peer_id, None)
        self.claims.pop(peer_id, None)
        if cur is not None:
            self.count("id_rebinds")
            return Claim.REBOUND
        return Claim.BOUND

    def _conflict(self, peer_id: str, first: bytes, second: bytes, first_inc: int,
                  second_inc: int, first_info: PeerInfo, second_info: PeerInfo,
                  now: float) -> None:
        """Record (count, and once per id log) two live processes holding ``peer_id``."""
        old = self.conflicts.get(peer_id)
        if old is None or old.first != first or old.second != second:
            self.count("id_conflicts")
        self.conflicts[peer_id] = Conflict(first, second, first_inc, second_inc, now)
        if peer_id in self._conflict_logged:
            return
        self._conflict_logged.add(peer_id)
        self.log.log(
            logging.WARNING, f"id_conflict:{peer_id}",
            "node %s: two processes claim node id %s (a copied data dir or device image?): "
            "incarnation %d at %s, appeared first, is kept; incarnation %d at %s is refused "
            "while the first one lives", self.name, peer_id, first_inc,
            ",".join(first_info.endpoints.get("control", ())) or "?", second_inc,
            ",".join(second_info.endpoints.get("control", ())) or "?")

    def _revert(self, peer_id: str, sup: Superseded, cur: bytes, cur_inc: int,
                cur_info: PeerInfo, now: float) -> None:
        """The superseded connection speaks again: it appeared first, so it is bound again
        and the newer one (``cur``) is the refused second of a conflict."""
        del self.superseded[peer_id]
        self._conflict(peer_id, sup.ident, cur, sup.incarnation, cur_inc, sup.info, cur_info,
                       now)
        self.node_rid[peer_id] = sup.ident
        self.incs[peer_id] = sup.incarnation
        if sup.proof is not None:
            self.proofs[peer_id] = sup.proof
        else:
            self.proofs.pop(peer_id, None)
        self.claims.pop(peer_id, None)

    def superseded_message(self, peer_id: str | None, ident: bytes, kind: str,
                           now: float) -> PeerInfo | bool:
        """A message other than HELLO from an unbound connection: is it the superseded one?

        Returns:
            False: it is not (the caller goes on as before). True: it is, and it was dropped
            (counted: read just after the restart, or a BYE: that process is leaving).
            A PeerInfo: it is, heard again while the newer connection lives: a conflict; it is
            bound again, and this is the info it last announced (the caller restores it).
        """
        sup = self.superseded.get(peer_id) if peer_id is not None else None
        if sup is None or sup.ident != ident:
            return False
        assert peer_id is not None
        row = self.presence.get(peer_id)
        cur = self.node_rid.get(peer_id)
        if kind == control.BYE or row is None or cur is None:
            del self.superseded[peer_id]  # it said goodbye (or the id moved on): no twin
            self.count("superseded_dropped")
            return True
        if now - sup.since < self.heartbeat_s or not self._alive(row, now):
            self.count("superseded_dropped")
            return True
        info = sup.info
        self._revert(peer_id, sup, cur, self.incs.get(peer_id, 0), row.info, now)
        return info

    def refused_message(self, peer_id: str | None, ident: bytes) -> bool:
        """True when ``ident`` is the refused second of a conflict over ``peer_id`` (its
        messages are dropped and counted, not logged)."""
        c = self.conflicts.get(peer_id) if peer_id is not None else None
        if c is None or c.second != ident:
            return False
        self.count("id_conflict_dropped")
        return True

    def expire(self, now: float) -> None:
        """Forget superseded connections older than gone_s and conflicts whose first process
        stopped speaking (from the heartbeat)."""
        for peer_id, sup in list(self.superseded.items()):
            if now - sup.since > self.gone_s:
                del self.superseded[peer_id]
        for peer_id, c in list(self.conflicts.items()):
            row = self.presence.get(peer_id)
            if row is None or self.node_rid.get(peer_id) != c.first or not self._alive(row, now):
                del self.conflicts[peer_id]

    def same_connection(self, peer_id: str, hello: Hello) -> bool:
        """A HELLO on the bound connection: its proof is the one to compare with. False (and
        counted ``malformed``) when it announces another incarnation than the connection did:
        one connection is one process."""
        if hello.info.incarnation != self.incs.get(peer_id, 0):
            self.bad("malformed", "HELLO from %s changes its incarnation on one connection",
                     peer_id)
            return False
        if hello.proof is not None:
            self.proofs[peer_id] = hello.proof
        return True

    def claimant_message(self, peer_id: str | None, ident: bytes, kind: str, body: Any) -> bool:
        """A message from an unbound connection: True when it is a held claimant's (an UPDATE
        is kept for the claim, anything else dropped and counted)."""
        claim = self.claims.get(peer_id) if peer_id is not None else None
        if claim is None or claim.ident != ident:
            return False
        if kind == control.UPDATE:
            # The claimant's latest state (one per claim): applied if the claim is bound, so
            # a restarted node's offers made meanwhile are not lost.
            claim.update = body
        else:  # expected while its claim is held: counted, not logged
            self.count("claimant_messages_dropped")
        return True

    def unbind(self, peer_id: str) -> None:
        """The bound connection said BYE: nothing more on it speaks for ``peer_id``."""
        self.node_rid.pop(peer_id, None)
        self.incs.pop(peer_id, None)
        self.conflicts.pop(peer_id, None)

    def retry_claims(self, now: float) -> list[tuple[str, HeldClaim]]:
        """Held claims whose node's bound connection went quiet (to replay as HELLOs, in
        order); claims older than gone_s, or for forgotten ids, are dropped."""
        ready = []
        for peer_id, c in list(self.claims.items()):
            row = self.presence.get(peer_id)
            if row is None or now - c.since > self.gone_s:
                del self.claims[peer_id]
                continue
            if self.may_take_over(peer_id, row, c.key, None, now):
                del self.claims[peer_id]
                self.count("id_claims_bound")
                ready.append((peer_id, c))
        return ready

    # --- forgetting -------------------------------------------------------------------------

    def evict_gone(self, src: object | None) -> bool:
        """Forget the longest-gone row charged to ``src`` (to anyone when None)."""
        best: tuple[float, str] | None = None
        for nid, s in self.id_src.items():
            if src is not None and s != src:
                continue
            row = self.presence.get(nid)
            if row is not None and row.state is PeerState.GONE and (
                    best is None or row.since < best[0]):
                best = (row.since, nid)
        if best is None:
            return False
        with self.lock:
            self.presence.forget(best[1])
        self.forget(best[1])
        self.count("peer_ids_evicted")
        return True

    def forget(self, node_id: str) -> None:
        """A pruned row: drop its binding and claim, and return its peer budget."""
        self.node_rid.pop(node_id, None)
        self.proofs.pop(node_id, None)
        self.claims.pop(node_id, None)
        self.claim_answered.pop(node_id, None)
        self.incs.pop(node_id, None)
        self.superseded.pop(node_id, None)
        self.conflicts.pop(node_id, None)
        src = self.id_src.pop(node_id, None)
        if src is not None:
            self.peer_budget.give(src)

    # --- gossip -----------------------------------------------------------------------------

    def gossip_candidates(self, entries: Iterable[GossipEntry], dialling: Collection[str | None],
                          dial_eps: Collection[str], linked: Collection[str],
                          ) -> Iterator[GossipEntry]:
        """The gossiped entries worth a dial: another node of our mesh, not live, with no link
        and no pending dial to it (by id, or by one of its endpoints). ``dialling`` is read as
        the entries are consumed: the caller adds each id it dials, so an id is dialled once.
        """
        for entry in entries:
            node_id, mesh, _host, eps, _key = entry
            if node_id == self.self_id or mesh != self.mesh or node_id in dialling:
                continue
            if node_id in linked or self.presence.is_live(node_id):
                continue
            if any(ep in dial_eps for ep in eps):
                continue  # a configured dial to it is pending; its answer will come
            yield entry
