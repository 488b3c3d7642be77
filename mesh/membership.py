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
from mesh.peers import PeerRecord, PeerState, Presence

__all__ = ["Claim", "HeldClaim", "Membership", "source_of"]


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


@dataclass
class HeldClaim:
    """A HELLO for a live node id from a connection not bound to it, waiting."""

    ident: bytes
    key: str | None
    body: Any
    since: float
    #: the claimant's latest UPDATE body, applied if the claim is bound
    update: Any = None


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

    def claim(self, ident: bytes, peer_id: str, key: str | None, peer_address: str | None,
              hello: Hello, body: Any, now: float, *, has_link: bool = False) -> Claim:
        """Connection ``ident`` (not bound to ``peer_id``) sent ``hello`` (raw ``body``).

        ``peer_address`` is the connection's source address (charged for a new plaintext id);
        ``has_link`` says whether we have our own link to ``peer_id`` (a held claim's dial may
        be answered there).
        """
        cur = self.node_rid.get(peer_id)
        row = self.presence.get(peer_id)
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
        self.node_rid[peer_id] = ident
        if hello.proof is not None:
            self.proofs[peer_id] = hello.proof
        else:
            self.proofs.pop(peer_id, None)
        self.claims.pop(peer_id, None)
        if cur is not None:
            self.count("id_rebinds")
            return Claim.REBOUND
        return Claim.BOUND

    def same_connection(self, peer_id: str, hello: Hello) -> None:
        """A HELLO on the bound connection: its proof is the one to compare with."""
        if hello.proof is not None:
            self.proofs[peer_id] = hello.proof

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
