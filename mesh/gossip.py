"""Gossip decisions (docs/protocol.md, "Gossip"): the digest of a node's view, its bucket
hashes, what a digest mismatch is answered with, and how often a peer may make this node send
a list.

Pure: plain values in (node ids, digests, times), decisions out; no sockets, no reactor, no
clock (tests/test_gossip.py). :class:`mesh.channel.ControlChannel` carries them out.

Why digests: a full list to every peer every round is N entries to N peers, O(N^2) bytes per
node. A digest of the view is 8 bytes; in a converged full mesh every node's view (its
verified live peers and itself) is the same set, so every digest is the same and only digests
flow: O(N) small messages per round per node.

Why buckets (control 1.3): a mismatch answered with a full list costs N entries whatever the
difference, so on a loaded host where views differ now and then the bytes grow with N per
mismatch, N^2 per node. Since 1.3 the node that sees a mismatch sends its *bucket hashes*
instead (:func:`buckets`: the ids hashed into k buckets under a random salt, 4 bytes per bucket,
k about N/2); the other side compares them with its own and sends only the entries of the
buckets that differ, with a request (a *want*) for the same buckets of the first side. A
difference of d ids costs about 4k bytes and 2d buckets' entries (1-2 entries each), not N
entries. A node draws a new salt every heartbeat (one for all its hashes of that heartbeat), so
a 4-byte collision is not the same twice; equal buckets under differing digests (a collision)
fall back to the full list.

Why the digest covers node ids only (not endpoints or keys): gossip only ever makes a
receiver dial an id it does not have live, so the set of ids is exactly what a difference in
gossip could change. A live peer's new endpoints reach its peers in its own ``update``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.metrics import Collect

__all__ = [
    "BUCKET_HASH_BYTES",
    "BUCKET_REVISION",
    "DIGEST_BYTES",
    "GOSSIP_REVISION",
    "MAX_BUCKETS",
    "SALT_BYTES",
    "Compare",
    "Gossip",
    "Owed",
    "Want",
    "assign",
    "bucket_count",
    "bucket_of",
    "buckets",
    "collect",
    "differing",
    "digest",
    "hashes",
    "in_buckets",
    "speaks_buckets",
    "speaks_digest",
]

#: Control revision since which a node reads ``digest`` (docs/protocol.md, "Frame versions").
GOSSIP_REVISION = (1, 2)
#: Control revision since which a node reads the bucket fields of ``digest`` (``s``, ``b``,
#: ``k``, ``w``) and answers a mismatch with bucket hashes instead of a full list.
BUCKET_REVISION = (1, 3)
#: Length of a view digest (blake2b).
DIGEST_BYTES = 8
#: Length of one bucket hash (blake2b, keyed with the exchange's salt).
BUCKET_HASH_BYTES = 4
#: Length of the salt of one bucket exchange.
SALT_BYTES = 8
#: Most buckets one exchange may use (a receiver refuses more: ``malformed``).
MAX_BUCKETS = 1024
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


def speaks_buckets(rev: tuple[int, int] | None) -> bool:
    """True when a peer announcing ``rev`` reads the bucket fields of ``digest`` (1.3+)."""
    return rev is not None and rev[0] == BUCKET_REVISION[0] and rev >= BUCKET_REVISION


def bucket_count(n: int) -> int:
    """How many buckets an exchange over a view of ``n`` ids uses: the smallest power of two
    at least n/2 (1-2 ids per bucket), 1 .. 256."""
    k = 1
    while 2 * k < n and k < 256:
        k *= 2
    return k


def _keyed(nid: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(nid.encode("ascii"), digest_size=4, key=salt).digest(),
                          "big")


def bucket_of(nid: str, salt: bytes, k: int) -> int:
    """The bucket of node id ``nid`` in an exchange of ``k`` buckets under ``salt``: the
    blake2b-4 of the id keyed with the salt, as a big-endian integer, modulo k."""
    return _keyed(nid, salt) % k


def assign(node_ids: Iterable[str], salt: bytes, k: int) -> list[list[str]]:
    """The ids of each of the k buckets under ``salt`` (see :func:`bucket_of`)."""
    parts: list[list[str]] = [[] for _ in range(k)]
    for nid in set(node_ids):
        parts[bucket_of(nid, salt, k)].append(nid)
    return parts


def hashes(parts: list[list[str]], salt: bytes) -> bytes:
    """The bucket hashes of buckets ``parts`` (:func:`assign`): see :func:`buckets`."""
    out = bytearray()
    for ids in parts:
        if not ids:
            out += bytes(BUCKET_HASH_BYTES)
            continue
        h = hashlib.blake2b(digest_size=BUCKET_HASH_BYTES, key=salt)
        for nid in sorted(ids):
            h.update(nid.encode("ascii"))
        out += h.digest()
    return bytes(out)


def buckets(node_ids: Iterable[str], salt: bytes, k: int) -> bytes:
    """The bucket hashes of a view (its ids and the owner's): k hashes of 4 bytes, bucket i's
    the blake2b-4 keyed with ``salt`` over the sorted ids of bucket i concatenated (32 ASCII
    hex characters each), 4 zero bytes for an empty bucket."""
    return hashes(assign(node_ids, salt, k), salt)


def differing(ours: bytes, theirs: bytes) -> list[int]:
    """Indices of the buckets whose hashes differ (both of one salt and bucket count)."""
    w = BUCKET_HASH_BYTES
    return [i for i in range(len(ours) // w) if ours[i * w:(i + 1) * w] != theirs[i * w:(i + 1) * w]]


def in_buckets(node_ids: Iterable[str], salt: bytes, k: int, wanted: Iterable[int]) -> list[str]:
    """The ids of ``node_ids`` that fall in the buckets ``wanted`` (of k, under ``salt``)."""
    want = set(wanted)
    return [nid for nid in node_ids if bucket_of(nid, salt, k) in want]


@dataclass(frozen=True)
class Compare:
    """The peer's bucket hashes (it asked): answered with our entries of the buckets that
    differ and a want of them. ``d``: the peer's digest then (equal buckets under a
    differing digest are a collision, answered with the full list)."""

    salt: bytes
    theirs: bytes
    d: bytes | None = None

    @property
    def k(self) -> int:
        return len(self.theirs) // BUCKET_HASH_BYTES


@dataclass(frozen=True)
class Want:
    """The buckets (of ``k``, under ``salt``) the peer wants our entries of: the last step of
    an exchange, nothing follows."""

    salt: bytes
    k: int
    buckets: frozenset[int]


@dataclass(frozen=True)
class Owed:
    """What one list to a peer holds (sent now, or owed while the rate limit holds it): the
    full list (with a pull request for the peer's), or a bucket answer (control 1.3): to the
    peer's hashes (``compare``), to its want (``want``), or both (two exchanges crossed: each
    side asked the other)."""

    full: bool = False
    pull: bool = False
    compare: Compare | None = None
    want: Want | None = None
    #: our bucket hashes, owed to the peer (a mismatch held back by the per-tick budget)
    ask: bool = False

    def merge(self, other: Owed) -> Owed:
        """One owed list that covers both: the full list when either is (with a pull when
        either asked for the peer's entries: a pull or a compare); else the later compare,
        and the union of two wants of one exchange (the later want otherwise: the peer's
        newer exchange finds what the older one would have)."""
        if self.full or other.full:
            return Owed(full=True, pull=self.pull or other.pull or self.compare is not None
                        or other.compare is not None)
        want = other.want or self.want
        if (self.want is not None and other.want is not None
                and (self.want.salt, self.want.k) == (other.want.salt, other.want.k)):
            want = Want(self.want.salt, self.want.k, self.want.buckets | other.want.buckets)
        return Owed(compare=other.compare or self.compare, want=want)


@dataclass
class _Peer:
    theirs: bytes | None = None  # the peer's last digest
    pair: tuple[bytes, bytes] | None = None  # (ours, theirs) of the last mismatch
    seen: int = 0  # how many times in a row that pair was seen
    last_push: float | None = None  # when a list last went to this peer
    last_ask: float | None = None  # when our bucket hashes last went to this peer
    owed: Owed | None = None  # a list is owed, held back by the rate limit
    ask_owed: bool = False  # our bucket hashes are owed, held back by the per-tick budget


class Gossip:
    """Per-peer gossip state of one node: mismatch backoff and the lists' rate limits.

    Args:
        min_push_s: at most one list (full, or a bucket answer) per peer per this many
            seconds, and at most one bucket request (our bucket hashes) per peer per this
            many seconds, whatever the peer sends (a flood of digests or pull requests cannot
            make the node send more).
        per_tick: at most this many lists in all between two calls of :meth:`due` (the
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
        and a pull request, or our bucket hashes), False while the same pair persists and
        the answer backs off (a partition: we cannot verify a node the peer can, or the other
        way round)."""
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

    def on_agree(self, peer: str, theirs: bytes | None = None) -> None:
        """The peer's digest (``theirs``) equals ours: a later mismatch is answered at once,
        and whatever is owed to the peer is dropped (the views agree: a list or bucket
        hashes held back by the rate limit would carry nothing the peer lacks; sent later,
        an exchange owed since a join storm is answered against views long gone, and a full
        list owed then asks for the peer's full list in turn)."""
        st = self._peers.get(peer)
        if st is not None:
            st.pair, st.seen = None, 0
            st.theirs = theirs
            st.owed, st.ask_owed = None, False

    def may_ask(self, peer: str, now: float) -> str:
        """May our bucket hashes go to ``peer`` now? ``"send"``: the caller sends them
        (recorded, and spent from the per-tick budget lists share: an ask starts an exchange
        as a full list and a pull did in 1.2). ``"limited"``: one went to this peer less than
        ``min_push_s`` ago; dropped, not owed (the next round's digest finds the difference
        again). ``"owed"``: over the per-tick budget; :meth:`due` hands it out later
        (``Owed(ask=True)``), or drops it once the peer's digest equals ours."""
        st = self._peers.setdefault(peer, _Peer())
        if st.last_ask is not None and now - st.last_ask < self.min_push_s:
            return "limited"
        if self._budget <= 0:
            st.ask_owed = True
            return "owed"
        self._budget -= 1
        st.last_ask = now
        return "send"

    def request_push(self, peer: str, now: float, pull: bool = False,
                     theirs: bytes | None = None, newcomer: bool = False,
                     what: Owed | None = None) -> bool:
        """May a list go to ``peer`` now? True: the caller sends it (recorded as sent).
        False: rate-limited (per peer or per tick); it is owed and :meth:`due` hands it out
        once allowed (one owed list per peer at most, however many requests: they merge,
        see :meth:`Owed.merge`). ``what``: what the list holds (default the full list, with
        a pull request when ``pull``). ``theirs``: the digest the peer showed with the
        request, if any. ``newcomer``: the list a node that just joined through us gets,
        outside the per-tick budget (one per verified join: a peer that never answers on
        its endpoint never gets one)."""
        st = self._peers.setdefault(peer, _Peer())
        if theirs is not None:
            st.theirs = theirs
        if what is None:
            what = Owed(full=True, pull=pull)
        if (newcomer or self._budget > 0) and (
                st.last_push is None or now - st.last_push >= self.min_push_s):
            if not newcomer:
                self._budget -= 1
            st.last_push = now
            st.owed = None
            return True
        st.owed = what if st.owed is None else st.owed.merge(what)
        return False

    def due(self, now: float, ours: bytes | None = None) -> list[tuple[str, Owed]]:
        """At each tick: owed lists that may go now, (peer, what it holds), recorded as
        sent, within a fresh per-tick budget. An owed list to a peer whose last digest equals
        ``ours`` (our digest now) is dropped: the views agree already."""
        self._budget = self.per_tick
        out: list[tuple[str, Owed]] = []
        for peer, st in self._peers.items():
            if st.owed is None and not st.ask_owed:
                continue
            if ours is not None and st.theirs == ours:
                st.owed, st.ask_owed = None, False
                continue
            if self._budget <= 0:
                break
            item: Owed | None = None
            if st.owed is not None and (
                    st.last_push is None or now - st.last_push >= self.min_push_s):
                item, st.owed = st.owed, None
                st.last_push = now
            if st.ask_owed and (st.last_ask is None or now - st.last_ask >= self.min_push_s):
                item = dataclasses.replace(item or Owed(), ask=True)
                st.ask_owed = False
                st.last_ask = now
            if item is not None:
                out.append((peer, item))
                self._budget -= 1
        return out

    def owed(self) -> bool:
        """True when some list or ask is owed (the caller computes its digest for
        :meth:`due` only then)."""
        return any(st.owed is not None or st.ask_owed for st in self._peers.values())

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
    mismatch with a 1.2 peer, or to a peer too old for digests; ``delta``: the entries
    verified since the last look; ``bucket``: the entries of differing buckets, 1.3),
    ``gossip_lists_received_total``, ``gossip_newcomer_lists_sent_total`` (of the full
    lists, those to a node that joined through this one), ``gossip_buckets_sent_total`` and
    ``gossip_buckets_received_total`` (bucket hashes answering a mismatch, 1.3),
    ``gossip_wants_sent_total`` and ``gossip_wants_received_total`` (requests for the entries
    of differing buckets), ``gossip_bucket_entries_sent_total`` (entries in bucket lists),
    ``gossip_bucket_fallbacks_total`` (equal buckets under differing digests: a full list),
    ``gossip_asks_limited_total`` (bucket hashes not sent: one per peer per 3 heartbeats), ``gossip_pulls_sent_total`` and
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
    for kind, key in (("full", "gossip_full_sent"), ("delta", "gossip_deltas_sent"),
                      ("bucket", "gossip_bucket_lists_sent")):
        out.counter("gossip_lists_sent_total", c(key, 0),
                    "Gossip lists sent: the whole view (full), the entries verified since "
                    "the last look (delta), or the entries of differing buckets (bucket).",
                    kind=kind)
    out.counter("gossip_newcomer_lists_sent_total", c("gossip_newcomer_sent", 0),
                "Full lists sent to a node that joined through this one.")
    out.counter("gossip_buckets_sent_total", c("gossip_buckets_sent", 0),
                "Bucket hashes sent answering a digest mismatch (control 1.3).")
    out.counter("gossip_buckets_received_total", c("gossip_buckets_in", 0),
                "Bucket hashes received.")
    out.counter("gossip_wants_sent_total", c("gossip_wants_sent", 0),
                "Requests for the entries of differing buckets sent.")
    out.counter("gossip_wants_received_total", c("gossip_wants_in", 0),
                "Requests for the entries of differing buckets received.")
    out.counter("gossip_bucket_entries_sent_total", c("gossip_bucket_entries_sent", 0),
                "Entries sent in bucket lists.")
    out.counter("gossip_bucket_fallbacks_total", c("gossip_bucket_fallbacks", 0),
                "Equal buckets under differing digests, answered with the full list.")
    out.counter("gossip_asks_limited_total", c("gossip_asks_limited", 0),
                "Bucket hashes not sent: the per-peer cap.")
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
