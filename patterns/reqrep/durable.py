"""Durable requests (the zguide's Titanic pattern), on the client node's own log.

``submit()`` appends the request to a log in the client node's data directory, fsynced, and
only then returns its id; a background thread sends it (same id every time) until a reply or a
remote error comes back, and stores the outcome in a crash-safe state store. After a crash or
restart, opening the same data directory finds every request without a stored outcome and
sends it again. Responders deduplicate by request id within their cache window, so a request
answered just before the crash is not executed again when its retry arrives in that window.

Records in the log (msgpack map): ``id``, ``service``, ``format``, ``body``, ``headers``,
``time_ns``. Outcomes (state namespace ``reqrep.titanic``): ``[true, format, body, done_ns,
offset]`` or ``[false, error type, error message, done_ns, offset]`` (outcomes written before
pruning existed have only the first three).

Pruning: the *floor* is the log offset of the oldest pending request (or the log's end when
none is pending), stored in namespace ``reqrep.titanic.meta`` before anything is deleted.
Opening reads the log from the floor only. Outcomes older than ``outcome_ttl`` whose record is
below the floor are deleted (``result()`` of such an id raises ConfigError), and log segments
wholly below the floor are deleted. A request stuck pending holds the floor, so outcomes and
log above it wait until it is answered.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from mesh.errors import ClosedError, ConfigError, MeshError
from mesh.log import FsyncPolicy, Log, LogConfig, Retention
from mesh.state import StateStore
from mesh.uuid7 import uuid7
from patterns.reqrep import frames as fr
from patterns.reqrep.call import Call
from patterns.reqrep.client import Client, prepare_call
from patterns.reqrep.errors import RemoteError, RequestTimeout
from patterns.reqrep.retry import Backoff
from patterns.reqrep.service import RawBody, decode_body, encode_body

__all__ = ["DurableClient"]

log = logging.getLogger(__name__)
_NS = "reqrep.titanic"
_META = "reqrep.titanic.meta"
_FLOOR = "titanic"
_SEGMENT_BYTES = 256 << 10  # opening scans at most about this much beyond the floor


class DurableClient:
    """Requests that survive restarts of the caller.

    Args:
        node: the mesh node; its data directory holds ``reqrep/titanic`` (log + state).
        attempt_timeout: deadline of each sending round, in seconds.
        backoff: wait between rounds that found no responder (full jitter).
        outcome_ttl: seconds an answered request's outcome stays readable with
            :meth:`result` (default one day); after that it is deleted, together with log
            segments below the oldest pending request, so the log and state stay bounded.

    Raises:
        LogLocked: another process has this node's request log open.
        ConfigError: ``outcome_ttl`` is not a positive number.
    """

    def __init__(self, node: Any, *, attempt_timeout: float = 2.0,
                 backoff: Backoff | None = None, outcome_ttl: float = 86400.0) -> None:
        if not isinstance(outcome_ttl, (int, float)) or not outcome_ttl > 0:
            raise ConfigError(f"outcome_ttl must be a positive number, got {outcome_ttl!r}")
        root = Path(node.data_dir) / "reqrep"
        root.mkdir(parents=True, exist_ok=True)
        self._log = Log.open(root / "titanic", config=LogConfig(
            fsync=FsyncPolicy.always(), segment_bytes=_SEGMENT_BYTES,
            retention=Retention(max_records=1), keep_past_floors=True, floor_ttl_s=None,
            floor_max_bytes=None))
        self._state = StateStore(root / "titanic.state")
        self._ttl = float(outcome_ttl)
        self._prune_every = max(0.05, min(self._ttl / 2, 60.0))
        self._next_prune = 0.0
        self._opened_ns = time.time_ns()
        self._offsets: dict[str, int] = {}  # pending id -> its log offset
        self._client = Client(node)
        self._timeout = attempt_timeout
        self._backoff = backoff or Backoff(0.05, 2.0)
        self._cond = threading.Condition()
        self._pending: dict[str, dict[str, Any]] = {}
        # One call per request across rounds, so a responder that said RUNNING keeps it.
        self._calls: dict[str, tuple[Call, fr.Request]] = {}
        self._closed = False
        self._recover()
        self._thread = threading.Thread(target=self._run, name="rpc-titanic", daemon=True)
        self._thread.start()

    def _recover(self) -> None:
        floor = int(self._state.get(_META, "floor", 0))
        offset = max(self._log.first_offset or 0, floor)
        # before any append: retention (at a segment roll) must never pass a pending request
        self._log.set_retention_floor(_FLOOR, offset)
        while offset < self._log.next_offset:
            records = self._log.read(offset, 1000)
            if not records:
                break
            for rec in records:
                try:
                    item = msgpack.unpackb(rec.payload, raw=False)
                    rid = item["id"]
                except Exception:  # a record we cannot read is skipped, not fatal
                    log.warning("titanic: unreadable record at offset %d", rec.offset)
                    continue
                if self._state.get(_NS, rid) is None:
                    self._pending[rid] = item
                    self._offsets[rid] = rec.offset
            offset = records[-1].offset + 1

    def submit(self, service: str, payload: Any, *, headers: dict[str, str] | None = None
               ) -> str:
        """Store the request durably, then send it in the background; return its id.

        Raises:
            ConfigError: bad service name, headers or payload.
            LogFull: the disk is full (nothing was stored).
            ClosedError: the client is closed.
        """
        if self._closed:
            raise ClosedError("durable client is closed")
        if not isinstance(service, str) or not service:
            raise ConfigError(f"service must be a non-empty string, got {service!r}")
        fmt, body = encode_body(payload)
        rid = uuid7()
        item = {"id": rid, "service": service, "format": int(fmt), "body": body,
                "headers": dict(headers or {}), "time_ns": time.time_ns()}
        with self._cond:  # append and register together: pruning computes the floor under it
            off = self._log.append(msgpack.packb(item, use_bin_type=True))  # fsync: "always"
            self._pending[rid] = item
            self._offsets[rid] = off
            self._cond.notify()
        return rid

    def pending(self) -> list[str]:
        """Ids stored and not answered yet."""
        with self._cond:
            return list(self._pending)

    def result(self, request_id: str, timeout: float = 0.0) -> Any:
        """The reply of a submitted request, waiting up to ``timeout`` seconds for it.

        Raises:
            RemoteError: the handler raised.
            RequestTimeout: not answered yet.
            ConfigError: unknown request id (or its outcome was pruned after
                ``outcome_ttl``).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                outcome = self._state.get(_NS, request_id)
                if outcome is not None:
                    break
                if request_id not in self._pending:
                    raise ConfigError(f"unknown durable request {request_id}")
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise RequestTimeout("(durable)", request_id, timeout, 0)
                self._cond.wait(left)
        if outcome[0]:
            return decode_body(fr.Format(outcome[1]), outcome[2])
        raise RemoteError(outcome[1], outcome[2])

    def _run(self) -> None:
        round_ = 0
        while True:
            self._maybe_prune()
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait(self._prune_every)
                    if not self._pending:
                        self._cond.release()
                        try:
                            self._maybe_prune()
                        finally:
                            self._cond.acquire()
                if self._closed:
                    return
                batch = list(self._pending.values())
            progress = False
            for item in batch:
                if self._is_closed():
                    return
                try:
                    value = self._attempt(item)
                    outcome: list[Any] = [True, *encode_body(value)]
                    outcome[1] = int(outcome[1])
                except RemoteError as exc:
                    outcome = [False, exc.type, exc.message]
                except MeshError as exc:  # no responder / timeout / closed: retry later
                    log.debug("titanic: %s not answered yet: %s", item["id"], exc)
                    continue
                self._calls.pop(item["id"], None)
                outcome += [time.time_ns(), self._offsets.get(item["id"], -1)]
                self._state.put(_NS, item["id"], outcome)
                progress = True
                with self._cond:
                    self._pending.pop(item["id"], None)
                    self._offsets.pop(item["id"], None)
                    self._cond.notify_all()
            round_ = 0 if progress else round_ + 1
            with self._cond:
                if self._pending and not self._closed:
                    self._cond.wait(self._backoff.delay(round_))

    def _attempt(self, item: dict[str, Any]) -> Any:
        """One round of ``attempt_timeout`` seconds for ``item``. The first round builds its
        call; later rounds reopen the same call (:meth:`Call.extend`), which stays with the
        responder holding the request while that responder is present and not silent, so a
        handler longer than a round runs once."""
        c = self._client
        rid = item["id"]
        entry = self._calls.get(rid)
        if entry is None:
            entry = prepare_call(item["service"], RawBody(fr.Format(item["format"]), item["body"]),
                                 self._timeout, item["headers"], None, None, rid,
                                 config=c.config, call_config=c._call_cfg, now=c._clock(),
                                 stats=c._stats)
            self._calls[rid] = entry
        else:
            bal = c.responders.track(entry[0].service)
            with c.responders.lock:
                entry[0].extend(c._clock(), self._timeout, bal)
        if c._closed:
            raise ClosedError("durable client is closed")
        return c._call(*entry)

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now < self._next_prune or self._closed:
            return
        self._next_prune = now + self._prune_every
        try:
            self.prune()
        except MeshError as exc:  # a failed prune is retried at the next interval
            log.warning("titanic: pruning failed: %s", exc)

    def prune(self) -> int:
        """Delete outcomes older than ``outcome_ttl`` below the oldest pending request, and
        the log segments below it; returns how many outcomes were deleted. Runs on its own
        every ``min(outcome_ttl / 2, 60)`` seconds.

        Raises:
            StateError: the state store failed.
            ClosedError: the client is closed.
        """
        with self._cond:
            floor = min(self._offsets.values(), default=self._log.next_offset)
            none_pending = not self._offsets
        # the floor is stored (fsynced) before anything below it is deleted, so a crash in
        # between never makes an answered request look pending at the next open
        self._state.put(_META, "floor", floor)
        cut = time.time_ns() - int(self._ttl * 1e9)
        doomed = []
        for rid, v in self._state.items(_NS):
            done_ns = v[3] if len(v) > 4 else self._opened_ns
            # an outcome from before pruning existed has no offset: its record is below the
            # floor only when nothing is pending (the floor is then the log's end)
            below = v[4] < floor if len(v) > 4 else none_pending
            if done_ns < cut and below:
                doomed.append(rid)
        for rid in doomed:
            self._state.delete(_NS, rid)
        self._log.set_retention_floor(_FLOOR, floor)
        self._log.enforce_retention()
        return len(doomed)

    def _is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop sending (pending requests stay stored for the next open) and close files."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._client.close()
        self._thread.join(self._timeout + 1)
        self._log.close()
        with contextlib.suppress(MeshError):
            self._state.close()

    def __enter__(self) -> DurableClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
