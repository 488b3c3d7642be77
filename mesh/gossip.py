"""Gossip decisions (docs/protocol.md, "Gossip"): the digest of a node's view, when a digest
mismatch is answered with a full list, and how often a peer may make this node send one.

Pure: plain values in (node ids, digests, times), decisions out; no sockets, no reactor, no
clock (tests/test_gossip.py). :class:`mesh.channel.ControlChannel` carries them out.

Why digests: a full list to every peer every round is N entries to N peers, O(N^2) bytes per
node. A digest of the view is 8 bytes; in a converged full mesh every node's view (its
verified live peers and itself) is the same set, so every digest is the same and only digests
flow: O(N) small messages per round per node.

Why the digest covers node ids only (not endpoints or keys): gossip only ever makes a
receiver dial an id it does not have live, so the set of ids is exactly what a difference in
gossip could change. A live peer's new endpoints reach its peers in its own ``update``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.metrics import Collect

__all__ = ["DIGEST_BYTES", "GOSSIP_REVISION", "Gossip", "collect", "digest", "speaks_digest"]

#: Control revision since which a node reads ``digest`` (docs/protocol.md, "Frame versions").
GOSSIP_REVISION = (1, 2)
#: Length of a view digest (blake2b).
DIGEST_BYTES = 8
#: A persistent mismatch (the same pair of digests) is answered on its 1st, 2nd, 4th, 8th,
#: 16th and 32nd occurrence, then once per this many.
_BACKOFF_MAX = 32


def digest(node_ids: Iterable[str]) -> bytes:
    """The digest of a view: blake2b-8 over its node ids (32 hex chars each), sorted."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for nid in sorted(set(node_ids)):
        h.update(nid.encode("ascii"))
    return h.digest()


def speaks_digest(rev: tuple[int, int] | None) -> bool:
    """True when a peer announcing control revision ``rev`` in its HELLO reads ``digest``."""
    return rev is not None and rev[0] == GOSSIP_REVISION[0] and rev >= GOSSIP_REVISION


@dataclass
class _Peer:
    theirs: bytes | None = None  # the peer's last digest
    pair: tuple[bytes, bytes] | None = None  # (ours, theirs) of the last mismatch
    seen: int = 0  # how many times in a row that pair was seen
    last_push: float | None = None  # when a full list last went to this peer
    pending: bool = False  # a full list is owed, held back by the rate limit
    pending_pull: bool = False  # ... and with it our request for the peer's list


class Gossip:
    """Per-peer gossip state of one node: mismatch backoff and the full-list rate limit.

    Args:
        min_push_s: at most one full list per peer per this many seconds, whatever the peer
            sends (a flood of digests or pull requests cannot make the node send more).
        per_tick: at most this many full lists in all between two calls of :meth:`due` (the
            node's tick): when many views differ at once (many nodes joining together) the
            node does not send N lists of N entries in one round; the rest is owed, and an
            owed list is dropped when the peer's last digest has become equal to ours.
    """

    def __init__(self, min_push_s: float, per_tick: int = 8) -> None:
        self.min_push_s = min_push_s
        self.per_tick = per_tick
        self._budget = per_tick
        self._peers: dict[str, _Peer] = {}

    def on_mismatch(self, peer: str, ours: bytes, theirs: bytes) -> bool:
        """The peer's digest differs from ours: True when this one is answered (full list
        and a pull request), False while the same pair persists and the answer backs off
        (a partition: we cannot verify a node the peer can, or the other way round)."""
        st = self._peers.setdefault(peer, _Peer())
        st.theirs = theirs
        pair = (ours, theirs)
        if st.pair != pair:
            st.pair, st.seen = pair, 0
        st.seen += 1
        n = st.seen
        if n <= _BACKOFF_MAX:
            return n & (n - 1) == 0  # 1, 2, 4, 8, 16, 32
        return n % _BACKOFF_MAX == 0

    def on_agree(self, peer: str) -> None:
        """The peer's digest equals ours: a later mismatch is answered at once."""
        st = self._peers.get(peer)
        if st is not None:
            st.pair, st.seen = None, 0
            st.theirs = None

    def request_push(self, peer: str, now: float, pull: bool = False,
                     theirs: bytes | None = None, newcomer: bool = False) -> bool:
        """May a full list go to ``peer`` now? True: the caller sends it (recorded as sent).
        False: rate-limited (per peer or per tick); it is owed and :meth:`due` hands it out
        once allowed (one owed list per peer at most, however many requests). ``theirs``:
        the digest the peer showed with the request, if any. ``newcomer``: the list a node
        that just joined through us gets, outside the per-tick budget (one per verified
        join: a peer that never answers on its endpoint never gets one)."""
        st = self._peers.setdefault(peer, _Peer())
        if theirs is not None:
            st.theirs = theirs
        if (newcomer or self._budget > 0) and (
                st.last_push is None or now - st.last_push >= self.min_push_s):
            if not newcomer:
                self._budget -= 1
            st.last_push = now
            st.pending = st.pending_pull = False
            return True
        st.pending = True
        st.pending_pull = st.pending_pull or pull
        return False

    def due(self, now: float, ours: bytes | None = None) -> list[tuple[str, bool]]:
        """At each tick: owed full lists that may go now, (peer, with a pull request),
        recorded as sent, within a fresh per-tick budget. An owed list to a peer whose last
        digest equals ``ours`` (our digest now) is dropped: the views agree already."""
        self._budget = self.per_tick
        out: list[tuple[str, bool]] = []
        for peer, st in self._peers.items():
            if not st.pending:
                continue
            if ours is not None and st.theirs == ours:
                st.pending = st.pending_pull = False
                continue
            if self._budget <= 0:
                break
            if st.last_push is None or now - st.last_push >= self.min_push_s:
                out.append((peer, st.pending_pull))
                self._budget -= 1
                st.last_push = now
                st.pending = st.pending_pull = False
        return out

    def owed(self) -> bool:
        """True when some full list is owed (the caller computes its digest for :meth:`due`
        only then)."""
        return any(st.pending for st in self._peers.values())

    def forget(self, peer: str) -> None:
        """The peer is gone: drop its state."""
        self._peers.pop(peer, None)

    def __len__(self) -> int:
        return len(self._peers)


def collect(counters: Mapping[str, int], out: Collect) -> None:
    """The node's gossip counters (``node.stats()``: ``gossip_*``) as metric families.

    ``gossip_digests_sent_total`` (a digest of the view to each peer every gossip round),
    ``gossip_digests_received_total`` (every digest read, pull requests included),
    ``gossip_lists_sent_total{kind}`` (``full``: the whole view, to a newcomer, on a
    mismatch, or to a peer too old for digests; ``delta``: the entries verified since the
    last look), ``gossip_lists_received_total``, ``gossip_pulls_sent_total`` and
    ``gossip_pulls_received_total`` (requests for the other side's full list),
    ``gossip_mismatches_total`` (a peer's digest differed from ours),
    ``gossip_mismatches_backed_off_total`` (of those, left unanswered: the same pair of
    digests again, see :meth:`Gossip.on_mismatch`), ``gossip_lists_held_total`` (full lists
    the per-peer or per-tick cap held back, see :meth:`Gossip.request_push`) and
    ``gossip_dials_total`` (dials to node ids a peer's gossip named).
    """
    c = counters.get
    out.counter("gossip_digests_sent_total", c("gossip_digests_sent", 0),
                "View digests sent in gossip rounds.")
    out.counter("gossip_digests_received_total", c("gossip_digests_in", 0),
                "Gossip digests received (pull requests included).")
    for kind, key in (("full", "gossip_full_sent"), ("delta", "gossip_deltas_sent")):
        out.counter("gossip_lists_sent_total", c(key, 0),
                    "Gossip lists sent: the whole view (full) or the entries verified since "
                    "the last look (delta).", kind=kind)
    out.counter("gossip_lists_received_total", c("gossip_in", 0), "Gossip lists received.")
    out.counter("gossip_pulls_sent_total", c("gossip_pulls_sent", 0),
                "Requests for a peer's full list sent (after a digest mismatch).")
    out.counter("gossip_pulls_received_total", c("gossip_pulls_in", 0),
                "Requests for this node's full list received.")
    out.counter("gossip_mismatches_total", c("gossip_mismatches", 0),
                "Peer digests that differed from this node's.")
    out.counter("gossip_mismatches_backed_off_total", c("gossip_backoff", 0),
                "Digest mismatches left unanswered while the same pair of digests persists.")
    out.counter("gossip_lists_held_total", c("gossip_push_limited", 0),
                "Full lists held back by the per-peer or per-tick cap.")
    out.counter("gossip_dials_total", c("gossip_dials", 0),
                "Dials to node ids named by a peer's gossip.")
