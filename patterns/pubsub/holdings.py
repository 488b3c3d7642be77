"""Which stores hold which origin streams: one board per node, fed by ``pubsub.holdings``.

Stores (patterns/pubsub/store.py) offer the service :data:`frames.STORE_SERVICE`; anyone on the
node (a Subscriber choosing where to replay from, a Publisher that lost its log looking for
where its stream ended) asks them ``pubsub.holdings_req`` and reads the answers here. Answers
arrive on the reactor thread; readers on other threads see single dict operations (atomic
under the GIL) and copies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from mesh.budget import LogLimiter
from mesh.errors import CodecError, DecryptionFailed, LogError, LogLocked, MeshError, ProtocolError
from mesh.log import Log, LogConfig, LogDirectory
from mesh.log.format import parse_segment_name
from patterns.pubsub import _registry, frames

__all__ = ["HOLDINGS_S", "HoldingsBoard", "board_for", "head_from_stores", "open_own_log"]

_log = logging.getLogger("zeromesh.pubsub")

#: How often one prefix's holdings are asked again of every store.
HOLDINGS_S = 1.0
#: Rows (origin stream x store) the board keeps at most; beyond that it starts again.
MAX_ROWS = 100_000
#: Pages of one answer followed at most (``next`` cursors asked for): MAX_ROWS worth.
MAX_PAGES = MAX_ROWS // frames.MAX_HOLDINGS

Key = tuple[str, str]  # (origin node id, stream)
Row = tuple[int, int, int]  # (oldest, head, epoch)


class HoldingsBoard:
    """Per node: (origin, stream) -> {store node id: (oldest, head, epoch)}."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.rows: dict[Key, dict[str, Row]] = {}
        self.bad = 0
        #: answers that were not to a request of ours (dropped)
        self.unasked = 0
        #: pages received (every page of an answer counts)
        self.answers = 0
        #: store node id -> monotonic time of its latest answer (bounded by the stores seen)
        self.answered: dict[str, float] = {}
        self._req = 0
        self._asked: dict[str, float] = {}  # prefix -> monotonic time of the last ask
        #: (store, req) -> (prefix, pages so far): the asks whose further pages we follow
        #: (only answers to our own requests are followed; bounded like ``_asked``)
        self._paging: dict[tuple[str, int], tuple[str, int]] = {}
        self._cond = threading.Condition()
        self._logs = LogLimiter(_log)
        node.handle(frames.CTRL_HOLDINGS, self._on_holdings)

    def stores(self) -> list[str]:
        """The live peers offering the store service now."""
        return [p.node_id for p in self.node.who_offers("service", name=frames.STORE_SERVICE)]

    def ask(self, prefix: str, *, every: float = HOLDINGS_S, force: bool = False) -> int:
        """Ask every live store which streams starting with ``prefix`` it holds, unless that
        was asked less than ``every`` seconds ago; returns the number of stores asked."""
        now = time.monotonic()
        if not force and now - self._asked.get(prefix, -1e9) < every:
            return 0
        if len(self._asked) > 4096:
            self._asked.clear()
        self._asked[prefix] = now
        self._req += 1
        body = frames.encode_holdings_req(prefix, self._req)
        n = 0
        if len(self._paging) > 4096:
            self._paging.clear()
        for store in self.stores():
            try:
                self._paging[(store, self._req)] = (prefix, 1)
                self.node.send(store, frames.CTRL_HOLDINGS_REQ, body)
                n += 1
            except MeshError:
                pass  # gone meanwhile: asked again at the next round
        return n

    def holders(self, key: Key, live: set[str] | None = None) -> dict[str, Row]:
        """The stores that said they hold ``key`` (only those in ``live`` when given)."""
        got = self.rows.get(key)
        if not got:
            return {}
        items = list(got.items())
        return {s: r for s, r in items if live is None or s in live}

    def keys(self) -> list[Key]:
        """Every (origin, stream) some store said it holds."""
        return list(self.rows)

    def wait(self, pred: Any, timeout: float) -> bool:
        """Wait until ``pred()`` is true (re-checked at every answer) or ``timeout`` passed."""
        with self._cond:
            return bool(self._cond.wait_for(pred, timeout))

    def _on_holdings(self, peer_id: str, body: object) -> None:
        # Reactor thread.
        try:
            req, items, more, nxt = frames.decode_holdings(body)
        except (ProtocolError, CodecError) as exc:
            self.bad += 1
            self._logs.warning(f"bad:{peer_id}", "pubsub: bad holdings from %s: %s", peer_id, exc)
            return
        asked = self._paging.pop((peer_id, req), None)
        if asked is None:
            self.unasked += 1  # not an answer to a request of ours (or a page too many)
            return
        if more and nxt is not None:
            prefix, pages = asked
            if pages < MAX_PAGES:  # the next page, at once; the store answered this one
                self._paging[(peer_id, req)] = (prefix, pages + 1)
                try:
                    self.node.send(peer_id, frames.CTRL_HOLDINGS_REQ,
                                   frames.encode_holdings_req(prefix, req, nxt))
                except MeshError:
                    self._paging.pop((peer_id, req), None)
        if len(self.rows) + len(items) > MAX_ROWS:
            self.rows = {}
        for h in items:
            per = self.rows.get((h.origin, h.stream))
            if per is None:
                per = self.rows[(h.origin, h.stream)] = {}
            per[peer_id] = (h.oldest, h.head, h.epoch)
        self.answers += 1
        if (peer_id, req) in self._paging:
            with self._cond:
                self._cond.notify_all()
            return  # "answered" once its last page is in
        if len(self.answered) > 4096:
            self.answered.clear()
        self.answered[peer_id] = time.monotonic()
        with self._cond:
            self._cond.notify_all()


def head_from_stores(node: Any, stream: str, wait_s: float) -> int:
    """Where the live stores hold this node's own ``stream`` up to (one past the last seq
    any of them holds; 0 when none does), waiting up to ``wait_s`` for a store to be found
    and for every store found to answer."""
    board = board_for(node)
    key = (node.id, stream)
    deadline = time.monotonic() + wait_s
    asked_at = -1.0
    while True:
        now = time.monotonic()
        stores = board.stores()
        if stores and (asked_at < 0 or now - asked_at >= 0.5):
            asked_at = now
            board.ask(stream, force=True)
        if stores and all(board.answered.get(s, -1.0) >= asked_at for s in stores):
            break
        left = deadline - now
        if left <= 0:
            break
        board.wait(lambda: False, min(left, 0.05))
    held = board.holders(key)
    # Only a store allowed to replicate the stream is believed (under security).
    return max((r[1] for s, r in held.items() if node.permits(s, "replicate", stream)),
               default=0)


def board_for(node: Any) -> HoldingsBoard:
    """The node's holdings board (made, and its handler registered, on first use)."""
    return _registry.get_or_create(node, "pubsub.holdings", lambda: HoldingsBoard(node))


def _holds_records(path: str) -> bool:
    """Whether the log directory ``path`` has a segment file with any byte in it."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return False
    for name in names:
        if parse_segment_name(name) is not None:
            try:
                if os.path.getsize(os.path.join(path, name)) > 0:
                    return True
            except OSError:
                return True  # there, unreadable: not "empty"
    return False


def _put_aside(path: str, root: str, why: str) -> str:
    """Move a stream's log directory out of ``streams/`` to ``<root>/aside/`` (never deleted:
    the operator's to inspect, repair or remove); returns the new path."""
    aside = os.path.join(root, "aside")
    os.makedirs(aside, exist_ok=True)
    base = os.path.join(aside, f"{os.path.basename(path)}.{why}.{time.strftime('%Y%m%dT%H%M%S')}")
    dest, n = base, 1
    while os.path.exists(dest):
        n += 1
        dest = f"{base}.{n}"
    os.replace(path, dest)
    return dest


def open_own_log(node: Any, stream: str, config: LogConfig, wait_s: float) -> Log:
    """Open the log of this node's own ``stream`` for its publisher.

    With ``wait_s > 0`` (``Publisher(resume_from_stores=...)`` or ``replicas``), a log that
    holds nothing is a lost one (a new disk, a wiped or emptied stream directory): it is
    opened at the head the live stores hold of this node's stream (:func:`head_from_stores`),
    so no seq a store holds is given to another event. A log that cannot be opened (damaged
    beyond the log's own recovery, unreadable), or that ends below what the stores hold (it
    lost its tail: a power cut, a restored backup), is moved to ``<data_dir>/aside/`` and a
    new one started the same way (a warning names both). So every start with ``wait_s``
    asks the stores (at most ``wait_s`` when none answers). Another writer's lock and a
    wrong at-rest key are raised as they are (not damage). Every open is a new writer
    epoch.

    Raises:
        LogError: the log cannot be opened (``wait_s`` 0, or the new one cannot either).
    """
    logs = LogDirectory(node.data_dir)
    path = logs.path_for(stream)
    if wait_s <= 0:
        return logs.open(stream, config)
    if not _holds_records(path):
        if os.path.isdir(path) and os.listdir(path):
            # Empty segments, or only the epoch history / floors of a log whose records are
            # gone: their seq 0 would be the stores' seq 0 again.
            where = _put_aside(path, logs.root, "empty")
            _log.warning("pubsub: the log of %r holds no record: moved to %s; asking the "
                         "stores where it ended", stream, where)
        return logs.open(stream, config, start_offset=head_from_stores(node, stream, wait_s))
    try:
        log = logs.open(stream, config)
    except (LogLocked, DecryptionFailed):
        raise
    except LogError as exc:
        where = _put_aside(path, logs.root, "damaged")
        _log.warning("pubsub: the log of %r cannot be opened (%s): moved to %s; starting a new "
                     "one where the stores hold it up to", stream, exc, where)
        return logs.open(stream, config, start_offset=head_from_stores(node, stream, wait_s))
    stores = head_from_stores(node, stream, wait_s)
    if stores <= log.next_offset:
        return log
    # The stores hold more of this stream than the log does: the log lost its tail (a power
    # cut took what was not fsynced, a restored backup). Continuing here would give seqs the
    # stores hold to other events: set this log aside and continue after the stores' head.
    had = log.next_offset
    log.close()
    where = _put_aside(path, logs.root, "behind")
    _log.warning("pubsub: the log of %r ends at seq %d but the stores hold it up to %d: "
                 "moved to %s; continuing at %d (the stores serve what is before)", stream,
                 had, stores, where, stores)
    return logs.open(stream, config, start_offset=stores)
