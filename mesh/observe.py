"""Stats over the control channel: a node answers a peer's ``node.stats`` request with a
snapshot of its own metrics (what ``/metrics.json`` serves), its name, id, uptime and peers.

Wire format (docs/protocol.md, "Stats requests"): the request is control kind ``node.stats``
with body ``{"v": 1, "rid": <int>}``; the answer is kind ``node.stats_reply`` with
``{"v": 1, "rid", "ok": true, "node_id", "name", "mesh", "uptime_s", "peers", "metrics",
"truncated"}`` or a refusal ``{"v": 1, "rid", "ok": false, "error", "message"}``.

Bounded (docs/protocol.md, "Budgets"): requests are rate-limited per peer and node-wide with
token buckets (:class:`mesh.limits.TokenBuckets`); a request over either rate is
dropped unanswered and counted; one snapshot is collected at most every ``cache_s`` seconds
whoever asks; a reply is at most ``max_message_bytes`` (whole metric families are left out,
and named in ``truncated``, when the snapshot would be larger). Under CURVE only peers
permitted ``observe`` on this node's name get a snapshot; others get a typed refusal
(``error: "forbidden"``), counted. Every log line a peer can trigger goes through a
:class:`~mesh.budget.LogLimiter`.

:class:`StatsClient` is the asking side (``mesh top`` uses it): one outstanding request per
peer, replies matched by request id *and* by the connection they came on.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mesh.budget import LogLimiter
from mesh.errors import ClosedError, PeerUnreachable, ProtocolError
from mesh.limits import RateLimit, TokenBuckets
from mesh.metrics import Collect

__all__ = [
    "STATS_KIND",
    "STATS_REPLY_KIND",
    "STATS_VERSION",
    "StatsClient",
    "StatsReply",
    "StatsResponder",
]

log = logging.getLogger(__name__)

STATS_KIND = "node.stats"
STATS_REPLY_KIND = "node.stats_reply"
#: Major version of both bodies; a receiver drops (and counts) another major.
STATS_VERSION = 1
#: Default per-peer rate: a ``mesh top`` at its default 2 s interval uses a tenth of it.
PER_PEER = RateLimit(rate=5.0, burst=10.0)
#: Default node-wide rate, all peers together.
NODE_WIDE = RateLimit(rate=50.0, burst=100.0)
#: Room for the reply's map and keys outside the metric families.
_REPLY_SLACK = 4096
_MAX_RID = (1 << 63) - 1
_MAX_PEERS_LISTED = 4096
#: Names a request may list in ``families``.
_MAX_FAMILIES = 256


def _packed_len(value: object) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


class StatsResponder:
    """Answers ``node.stats`` on one node (reactor thread). Made by :class:`mesh.node.Node`.

    Args:
        node: the node whose metrics are served.
        per_peer: rate of requests one peer (node id) may make.
        node_wide: rate of requests all peers together may make.
        cache_s: a snapshot younger than this is served again instead of collected anew.
    """

    def __init__(self, node: Any, *, per_peer: RateLimit = PER_PEER,
                 node_wide: RateLimit = NODE_WIDE, cache_s: float = 0.5) -> None:
        self.node = node
        self.started = time.monotonic()
        self._peer_buckets = TokenBuckets(per_peer, max_keys=1024)
        self._node_bucket = TokenBuckets(node_wide, max_keys=1)
        self._cache_s = cache_s
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._full_cut: tuple[dict[str, Any], list[str]] | None = None
        self._log = LogLimiter(log)
        self.counters: dict[str, int] = dict.fromkeys(
            ("requests", "answered", "rate_limited", "forbidden", "malformed",
             "unsupported_version", "truncated", "unreachable", "collections"), 0)

    # --- reactor thread ---------------------------------------------------------------------

    def _bad(self, key: str, msg: str, *args: object) -> None:
        self.counters[key] += 1
        self._log.warning(f"stats_{key}", "node %s: stats request " + msg + " (stats_%s #%d)",
                          self.node.name, *args, key, self.counters[key])

    def on_request(self, peer_id: str, body: Any) -> None:
        """Handle one ``node.stats`` request from ``peer_id`` (a bound, live peer)."""
        self.counters["requests"] += 1
        now = time.monotonic()
        # Charged before anything else (refusals are replies too): a flood costs two dict
        # lookups per request and is answered at most at the budgeted rate.
        if not self._peer_buckets.allow(peer_id, 1, now) or \
                not self._node_bucket.allow("*", 1, now):
            self._bad("rate_limited", "from %s over its rate: dropped", peer_id)
            return
        if not isinstance(body, dict):
            self._bad("malformed", "from %s: body is not a map", peer_id)
            return
        v, rid = body.get("v"), body.get("rid")
        if not isinstance(v, int) or isinstance(v, bool):
            self._bad("malformed", "from %s: no version", peer_id)
            return
        if v != STATS_VERSION:
            self._bad("unsupported_version", "from %s: version %d", peer_id, v)
            return
        if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= _MAX_RID:
            self._bad("malformed", "from %s: bad rid", peer_id)
            return
        families = body.get("families")
        if families is not None and not (
                isinstance(families, list) and len(families) <= _MAX_FAMILIES
                and all(isinstance(f, str) and len(f) <= 200 for f in families)):
            self._bad("malformed", "from %s: bad families", peer_id)
            return
        if not self.node.permits(peer_id, "observe", self.node.name):
            self.counters["forbidden"] += 1
            self._reply(peer_id, {"v": STATS_VERSION, "rid": rid, "ok": False,
                                  "error": "forbidden",
                                  "message": f"observe:{self.node.name} not permitted"})
            return
        self._reply(peer_id, self._answer(rid, now, families))

    def _answer(self, rid: int, now: float, families: list[str] | None) -> dict[str, Any]:
        cached = self._cache
        if cached is None or now - cached[0] > self._cache_s:
            cached = self._cache = (now, self.node.metrics.as_dict())
            self._full_cut = None
            self.counters["collections"] += 1
        t, full = cached
        if families is None:
            if self._full_cut is None:  # every unfiltered answer of this snapshot is the same
                self._full_cut = self._cut(full, t)
            metrics, truncated = self._full_cut
        else:
            metrics, truncated = self._cut({k: full[k] for k in families if k in full}, t)
        if truncated:
            self.counters["truncated"] += 1
        return {"v": STATS_VERSION, "rid": rid, "ok": True, **self._head(t),
                "metrics": metrics, "truncated": truncated}

    def _head(self, t: float) -> dict[str, Any]:
        node = self.node
        peers = [{"id": r.info.node_id, "name": r.info.name, "state": r.state.value}
                 for r in node.peers.records()[:_MAX_PEERS_LISTED]]
        return {"node_id": node.id, "name": node.name, "mesh": node.mesh,
                "uptime_s": t - self.started, "time": time.time(), "peers": peers}

    def _cut(self, families: dict[str, Any], t: float) -> tuple[dict[str, Any], list[str]]:
        """``families``, whole ones left out (and named) past the size cap."""
        limit = self.node.config.max_message_bytes - _REPLY_SLACK
        limit -= _packed_len({"rid": _MAX_RID, **self._head(t)})
        kept: dict[str, Any] = {}
        truncated: list[str] = []
        used = 0
        for name in sorted(families):
            n = _packed_len({name: families[name]})
            if used + n + 64 * (len(truncated) + 1) > limit:
                truncated.append(name)
                continue
            kept[name] = families[name]
            used += n
        return kept, truncated

    def _reply(self, peer_id: str, body: dict[str, Any]) -> None:
        try:
            self.node.send(peer_id, STATS_REPLY_KIND, body)
        except (PeerUnreachable, ClosedError):
            self.counters["unreachable"] += 1
            return
        if body.get("ok"):
            self.counters["answered"] += 1

    # --- any thread -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``stats_<counter>``: requests, answered, rate_limited, forbidden, malformed,
        unsupported_version, truncated, unreachable, collections."""
        return {f"stats_{k}": v for k, v in self.counters.items()}

    def collect(self, out: Collect) -> None:
        """``stats_requests_total{outcome}``: what became of each ``node.stats`` request."""
        c = self.counters
        for outcome in ("answered", "rate_limited", "forbidden", "malformed",
                        "unsupported_version", "unreachable"):
            out.counter("stats_requests_total", c[outcome], "node.stats requests from peers, "
                        "by outcome (rate_limited: over the per-peer or node-wide rate, "
                        "dropped unanswered).", outcome=outcome)
        out.counter("stats_replies_truncated_total", c["truncated"],
                    "node.stats replies that left metric families out (size cap).")


@dataclass
class StatsReply:
    """One peer's answer to a ``node.stats`` request.

    Attributes:
        peer_id: the node that answered (the connection it came on, not what it claims).
        ok: False for a refusal (``error`` says why: ``forbidden``).
        received: ``time.monotonic()`` here when it arrived.
        body: the reply body as sent (see docs/protocol.md, "Stats requests").
    """

    peer_id: str
    ok: bool
    received: float
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        """The refusal's ``error`` (``"forbidden"``), None for a snapshot."""
        e = self.body.get("error")
        return None if self.ok else (e if isinstance(e, str) else "refused")


class StatsClient:
    """Ask peers for their stats (``node.stats``) and keep the latest answer of each.

    Registers the ``node.stats_reply`` handler on ``node``. One request per peer is
    outstanding at a time (a new one replaces it), so what is held is bounded by the peer
    table. Replies that answer no outstanding request of *that* peer are dropped and counted.
    Thread-safe.
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._rids = itertools.count(int.from_bytes(os.urandom(4), "big"))
        self._pending: dict[str, tuple[int, float]] = {}
        self.latest: dict[str, StatsReply] = {}
        self.unexpected = 0
        self.malformed = 0
        node.handle(STATS_REPLY_KIND, self._on_reply)

    def request(self, peer_id: str, families: list[str] | None = None) -> bool:
        """Send a ``node.stats`` request to ``peer_id`` (only ``families`` when given: a
        smaller reply, less held here); False when the peer is not reachable."""
        with self._lock:
            rid = next(self._rids) & _MAX_RID
            self._pending[peer_id] = (rid, time.monotonic())
        body: dict[str, Any] = {"v": STATS_VERSION, "rid": rid}
        if families is not None:
            body["families"] = list(families)
        try:
            self.node.send(peer_id, STATS_KIND, body)
        except (PeerUnreachable, ClosedError, ProtocolError):
            with self._lock:
                self._pending.pop(peer_id, None)
            return False
        return True

    def pending(self, peer_id: str) -> bool:
        """True while a request to ``peer_id`` is unanswered."""
        with self._lock:
            return peer_id in self._pending

    def forget(self, keep: set[str]) -> None:
        """Drop what is held about peers not in ``keep`` (gone and pruned ones)."""
        with self._lock:
            for d in (self._pending, self.latest):
                for k in [k for k in d if k not in keep]:
                    del d[k]

    def snapshot(self) -> dict[str, StatsReply]:
        """The latest reply of each peer (a copy)."""
        with self._lock:
            return dict(self.latest)

    def _on_reply(self, peer_id: str, body: Any) -> None:
        if not isinstance(body, dict) or body.get("v") != STATS_VERSION or \
                not isinstance(body.get("ok"), bool):
            with self._lock:
                self.malformed += 1
            return
        with self._lock:
            want = self._pending.get(peer_id)
            if want is None or body.get("rid") != want[0]:
                self.unexpected += 1
                return
            del self._pending[peer_id]
            ok = body["ok"]
            if ok and not _snapshot_ok(body):
                self.malformed += 1
                return
            self.latest[peer_id] = StatsReply(peer_id, ok, time.monotonic(), body)


def _num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v and \
        abs(v) != float("inf")


def _snapshot_ok(body: dict[str, Any]) -> bool:
    """The shape an asker relies on (docs/protocol.md, "Stats requests"): anything else in a
    reply is the answering node's word and is read defensively by whoever shows it."""
    peers, truncated = body.get("peers"), body.get("truncated", [])
    return (isinstance(body.get("metrics"), dict) and _num(body.get("uptime_s"))
            and isinstance(peers, list) and all(isinstance(p, dict) for p in peers)
            and isinstance(truncated, list) and all(isinstance(t, str) for t in truncated))
