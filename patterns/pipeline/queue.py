"""WorkQueue: the producer side of a pipeline queue.

Threading model: ``push()`` runs on the caller's thread; it appends to ``<queue>.tasks``
(thread-safe log) and hands the new ids to the queue's I/O thread through a lock-protected list
plus one byte on a pipe per *batch* (the wake-up is skipped while one is pending). The I/O thread
owns the ROUTER socket, the dispatcher state machine and the journal: nothing else touches them.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from types import TracebackType
from typing import Any

import zmq

from mesh.budget import LogLimiter
from mesh.errors import ClosedError, ConfigError, LogError, LogFull, MeshTimeout, ProtocolError
from mesh.log import FsyncPolicy, Log
from mesh.peers import PeerEvent, PeerEventKind
from mesh.tracing import current
from mesh.transport import recv_bounded
from patterns._closing import close_with
from patterns._metrics import attach, queue_collector

from . import frames as fr
from .dispatch import DispatchConfig, Dispatcher
from .dlq import DLQ_THREAD, DeadLetters, encode_dead_letter, open_dlq_log
from .store import COMPACT_BYTES, QueueStore, encode_task, journal_dispatch, journal_records

log = logging.getLogger(__name__)


def _nothing() -> None:
    pass


_limited = LogLimiter(log)  # lines a remote peer can trigger

_RECV_BATCH = 2000
#: Backoff of journal / DLQ writes retried while the disk is full (seconds, doubling).
_FULL_RETRY_MIN = 0.05
_FULL_RETRY_MAX = 2.0
#: An empty TASK batch: a liveness probe (a worker ignores it; a send to a routing id whose
#: connection ended fails with EHOSTUNREACH under ROUTER_MANDATORY).
_PROBE = fr.encode_tasks([])
PROBE_INTERVAL_S = 0.5  #: how often registered workers are probed when no disconnect is seen


def role_for(queue: str) -> str:
    """The endpoint role under which a queue's producer binds its ROUTER."""
    return f"pipe.{queue}"


class WorkQueue:
    """Producer side of the work queue ``name`` on ``node``.

    ``push()`` returns once the task is in the queue's log (per the fsync policy); the task is
    then dispatched to workers (found by discovery) against their credit, redelivered on nack,
    deadline or worker loss, and dead-lettered after ``max_deliveries`` (or on term).

    Args:
        node: the node to run on (its data directory holds the queue's logs).
        name: the queue name (1-200 of ``A-Z a-z 0-9 . _ -``).
        config: dispatch rules (ack wait, max deliveries, backoff, retry budget, ordering).
        fsync: fsync policy of the queue's logs (default every 10 ms).
        seed: seed of the backoff jitter (tests).
        accept_loss: open even when the task log or the journal is missing (deleted) while
            the other has records; the loss is logged and counted in :meth:`stats`
            (``tasks_missing`` / ``journal_missing``). Default: refuse with
            :class:`~mesh.errors.QueueStateMissing`.

    A full disk under the journal or the DLQ is back-pressure, not death: dispatching pauses,
    the pending writes are retried with backoff (50 ms doubling to 2 s), and the queue resumes
    by itself once they succeed (``disk_full`` / ``disk_full_events`` in :meth:`stats`, a
    warning and a "resumed" line in the log). Pushes meanwhile raise
    :class:`~mesh.errors.LogFull` only if ``.tasks`` itself cannot take them.

    Raises:
        ConfigError: invalid name or configuration.
        LogLocked: another process is already the producer of this queue in this data dir.
        QueueStateMissing: the task log or the journal was deleted (see ``accept_loss``).
    """

    def __init__(
        self,
        node: Any,
        name: str,
        *,
        config: DispatchConfig | None = None,
        fsync: FsyncPolicy | None = None,
        seed: int | None = None,
        accept_loss: bool = False,
    ) -> None:
        self.node = node
        self.name = name
        self.config = config or DispatchConfig()
        self._store = QueueStore(node.data_dir, name, fsync, accept_loss=accept_loss)
        self._epoch = self._store.tasks.epoch  # tags every journal fact (see store.py)
        # Writes the full disk refused, in order, retried by the I/O thread (back-pressure).
        self._unwritten: list[tuple[Log, list[bytes]]] = []
        self._held_sends: list[tuple[bytes, list[tuple[int, int, int, Any, Any]]]] = []
        self._full_retry_at = 0.0
        self._full_backoff = _FULL_RETRY_MIN
        self._full_events = 0
        try:
            self._dlq_log = open_dlq_log(self._store.root, name)
        except BaseException:
            self._store.close()
            raise
        #: The queue's dead letters. Its index, redrive requests from other processes and
        #: compaction run on the process's DLQ thread (one for all queues), never on the
        #: queue's I/O thread.
        self.dlq = DeadLetters(node.data_dir, name, push=self._push_traced, actor="producer",
                               log=self._dlq_log, durable=self._store.tasks.flush)
        self._lock = threading.Lock()
        # batches (ids, key, datas) pushed since the I/O thread last looked
        self._new: list[tuple[Sequence[int], Hashable | None, Sequence[Any]]] = []
        self._woken = False
        self._closed = False
        # Set by the I/O thread itself before it touches anything: close() joins the thread
        # only then, and a thread that starts after close() returns at once (a signal can
        # land inside Thread.start(), when the thread exists but its ident is not set yet).
        self._running = False
        self._failed: BaseException | None = None  # set if the I/O thread died
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self._peer_events: list[PeerEvent] = []
        self._stats_snapshot: dict[str, Any] = {}
        self._stats_lock = threading.Lock()
        self._bad_frames = 0
        # workers send READY/ACK/NACK: one message at most this big in all its frames
        self._max_in = node.config.max_message_bytes + (64 << 10)
        self._bytes_in = self._bytes_out = 0  # data-socket bytes (written by the I/O thread)
        # Security on: each message's sender is named by its CURVE key (User-Id), never by
        # the routing id it chose; READY needs "work" on this queue (see _sender_ok).
        self._secure = getattr(node, "security", None) is not None
        self._ident_keys: dict[bytes, str] = {}
        self._forbidden = 0
        self._dispatcher = Dispatcher(
            self.config, time.monotonic(), rng=random.Random(seed)
        )
        rec = self._store.recover()
        self._recovery: dict[str, Any] = {
            "lost_tasks": rec.lost_tasks, "lost_ranges": [list(r) for r in rec.lost_ranges],
            "stale_journal_facts": rec.stale_facts,
            "journal_corrupt_records": rec.journal_corrupt_records,
            "tasks_corrupt_records": rec.tasks_corrupt_records,
            "journal_missing": rec.journal_missing, "tasks_missing": rec.tasks_missing,
        }
        self._dispatcher.mark_high(rec.next_id)
        # Set once any task carries a trace: only then does a dispatch pass unpack
        # (payload, trace) data (see _dispatch), so untraced queues pay nothing.
        self._traced = any(type(t[2]) is tuple for t in rec.tasks)
        for tid, key, payload, deliveries, history in rec.tasks:
            # The payload rides along in the dispatcher (opaque data) until ack / dead letter.
            self._dispatcher.restore(tid, key, deliveries, history, data=payload)
        self.recovered = len(rec.tasks)
        self._pushed = self.recovered  # tasks handed to the dispatcher, for wait_idle
        self._router = node.socket(zmq.ROUTER, role_for(name))
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A worker reconnecting with the same identity (after a network blip) takes over.
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.endpoints = node.bind(self._router, role_for(name))
        # The connection's end removes a worker at once (a SIGKILLed worker's socket closes
        # long before presence calls its node gone): a socket monitor's DISCONNECTED event
        # makes the I/O thread probe every worker. Under security the node may monitor this
        # socket already (one monitor per socket); the periodic probe then does the job.
        self._mon: zmq.Socket[Any] | None = None
        sec = getattr(node, "security", None)
        if sec is None or not sec.config.monitor:
            self._mon = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._probe_due: list[float] = []
        self._conn_lost = 0
        self._unsub = node.on_peer(self._on_peer)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pipe-q:{name}", daemon=True)
        self._unmetrics: Callable[[], None] = _nothing
        # node.close() closes the queue first, and from before its thread starts: an
        # exception anywhere below (a KeyboardInterrupt from SIGTERM lands wherever the main
        # thread is) cannot leave the thread polling a socket the node then closes under it.
        self._unclose = close_with(node, self.close)
        self._thread.start()
        DLQ_THREAD.add(self.dlq)
        node.offer("queue", name)
        self._unmetrics = attach(node, queue_collector(self))

    # ------------------------------------------------------------------ user API
    def push(self, payload: bytes, key: Hashable | None = None) -> int:
        """Append a task to the queue's log and schedule its dispatch; returns its id.

        Raises:
            ClosedError: the queue is closed.
            ConfigError: ``payload`` is not bytes or ``key`` not str / bytes / None.
            LogError: the log could not take it (LogFull, RecordTooLarge...): nothing was queued.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ConfigError(f"payload must be bytes, got {type(payload).__name__}")
        if key is not None and not isinstance(key, (str, bytes)):
            raise ConfigError(f"key must be str, bytes or None, got {type(key).__name__}")
        return self._push_traced(bytes(payload), key, _trace_here())

    def _push_traced(self, payload: bytes, key: Hashable | None,
                     trace: tuple[str | None, str | None, str | None] | None) -> int:
        # push() with an explicit trace context (a redrive keeps the original task's).
        rec = encode_task(key, payload, trace)
        # A traced task travels through the dispatcher as (payload, trace) (its data is opaque).
        data: Any = payload if trace is None else (payload, trace)
        with self._lock:
            if self._closed:
                raise ClosedError(f"work queue {self.name} is closed")
            self._check_alive()
            tid = self._store.tasks.append(rec)
            if trace is not None:
                self._traced = True
            self._new.append(((tid,), key, (data,)))
            self._pushed += 1
            self._wake_locked()
        return tid

    def push_many(self, payloads: Sequence[bytes], key: Hashable | None = None) -> range:
        """Push several tasks in one log batch (same key); returns their ids.

        Raises:
            ClosedError: the queue is closed.
            ConfigError: ``key`` is not str / bytes / None.
            LogError: the log could not take them: none was queued.
        """
        if key is not None and not isinstance(key, (str, bytes)):
            raise ConfigError(f"key must be str, bytes or None, got {type(key).__name__}")
        payloads = [p if type(p) is bytes else bytes(p) for p in payloads]
        trace = _trace_here()
        datas: list[Any] = payloads
        if trace is not None:
            recs = [encode_task(key, p, trace) for p in payloads]
            datas = [(p, trace) for p in payloads]
        elif key is None:
            recs = [b"\x00" + p for p in payloads]  # encode_task inlined: per-push hot path
        else:
            recs = [encode_task(key, p) for p in payloads]
        with self._lock:
            if self._closed:
                raise ClosedError(f"work queue {self.name} is closed")
            self._check_alive()
            ids = self._store.tasks.append_many(recs)
            self._pushed += len(ids)
            if trace is not None:
                self._traced = True
            self._new.append((ids, key, datas))
            self._wake_locked()
        return ids

    def _check_alive(self) -> None:
        # A push the dead I/O thread would never dispatch must fail loudly, not queue silently.
        if self._failed is not None:
            raise ClosedError(
                f"work queue {self.name}: its I/O thread failed: {self._failed!r}"
            ) from self._failed

    def _wake_locked(self) -> None:
        if not self._woken:
            self._woken = True
            os.write(self._wfd, b"x")

    def stats(self) -> dict[str, Any]:
        """Dispatcher counters and gauges (a snapshot refreshed by the I/O thread), plus:

        * ``disk_full`` (journal or DLQ writes waiting for space: dispatch paused) and
          ``disk_full_events`` (times it began);
        * from the last recovery: ``lost_tasks`` / ``lost_ranges`` (ids the journal knew that
          ``.tasks`` no longer holds: a lost unsynced tail or a deleted log),
          ``stale_journal_facts`` (facts about those ids, dropped), ``journal_corrupt_records``
          and ``tasks_corrupt_records`` (damaged records skipped), ``journal_missing`` and
          ``tasks_missing`` (opened with ``accept_loss=True`` over a deleted log).
        """
        with self._stats_lock:
            out = dict(self._stats_snapshot)
        out["malformed_frames"] = self._bad_frames
        out["forbidden"] = self._forbidden
        out["disconnects"] = self._conn_lost  # workers removed because their connection ended
        out["bytes_in"] = self._bytes_in
        out["bytes_out"] = self._bytes_out
        out["disk_full"] = bool(self._unwritten)
        out["disk_full_events"] = self._full_events
        out.update(self._recovery)
        return out

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every pushed task is acked or dead-lettered.

        Raises:
            MeshTimeout: tasks are still owed after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pushed = self._pushed
            s = self.stats()
            # "added" proves the snapshot is newer than every push made before this call.
            if s.get("added", -1) >= pushed and s.get("unacked", 1) == 0:
                return
            if time.monotonic() >= deadline:
                raise MeshTimeout(f"queue {self.name}: {s.get('unacked')} tasks still owed")
            time.sleep(0.01)  # a poll interval on another thread's snapshot

    def close(self) -> None:
        """Stop dispatching, flush the logs and close the socket (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.write(self._wfd, b"q")
        self._unmetrics()
        self._unclose()
        try:
            self.node.withdraw("queue", self.name)
            # What is closed is no longer announced: a reopened queue's endpoints are then
            # the only ones a worker can pick.
            self.node.unbind(role_for(self.name), self.endpoints)
        except Exception:
            pass  # the node may already be closed
        self._unsub()
        with self._lock:
            running = self._running  # else it never touches the fds and sockets closed below
        if running:
            self._thread.join(10.0)
        else:
            self._close_sockets()  # it will not (or never did) touch them: they are ours
        DLQ_THREAD.remove(self.dlq)
        os.close(self._rfd)
        os.close(self._wfd)
        try:
            self._dlq_log.close()
        finally:
            self._store.close()

    def __enter__(self) -> WorkQueue:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ reactor thread
    def _on_peer(self, ev: PeerEvent) -> None:
        if ev.kind is PeerEventKind.LEFT:
            with self._lock:
                self._peer_events.append(ev)
                if not self._closed:
                    self._wake_locked()

    # ------------------------------------------------------------------ I/O thread
    def _run(self) -> None:
        with self._lock:
            if self._closed:
                return  # closed before this thread got going: close() did not wait for it
            self._running = True
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._rfd, zmq.POLLIN)
        if self._mon is not None:
            poller.register(self._mon, zmq.POLLIN)
        last_probe = 0.0
        last_snap = 0.0
        last_trim = 0.0
        dirty = False
        try:
            while True:
                d = self._dispatcher
                nd = d.next_deadline()
                now = time.monotonic()
                timeout = 5.0 if dirty else 100.0
                if nd is not None:
                    timeout = max(0.0, min(timeout, (nd - now) * 1000.0))
                if self._unwritten:
                    timeout = max(0.0, min(timeout, (self._full_retry_at - now) * 1000.0))
                if self._probe_due:
                    timeout = max(0.0, min(timeout, (self._probe_due[0] - now) * 1000.0))
                ready = dict(poller.poll(int(timeout)))
                now = time.monotonic()
                self._drain_router(now)
                if self._drain_wake(now):
                    break
                if self._mon is not None and self._mon in ready:
                    self._drain_monitor(now)
                due = self._probe_due and self._probe_due[0] <= now
                if due or now - last_probe >= PROBE_INTERVAL_S:
                    while self._probe_due and self._probe_due[0] <= now:
                        self._probe_due.pop(0)
                    last_probe = now
                    self._probe_workers(now)
                d.tick(now)
                if self._unwritten and now >= self._full_retry_at:
                    self._retry_unwritten(now)
                if not self._unwritten:  # a full disk pauses dispatch (back-pressure)
                    self._dispatch(now)
                self._persist_effects()
                st = self._store
                if (st.journal_bytes > COMPACT_BYTES
                        and st.journal_bytes > 64 * d.owed_count() and not self._unwritten):
                    self._compact_online()
                if now - last_snap >= 0.005:  # stats() / wait_idle() stay within 5 ms
                    last_snap = now
                    self._snapshot()
                    dirty = False
                else:
                    dirty = True
                if now - last_trim >= 1.0:
                    last_trim = now
                    if not self._unwritten:
                        # .tasks: drop what nothing owes (never while a dead letter or fact
                        # waits for disk space: its task record must outlive it).
                        self._store.trim(d.lowest_owed())
        except Exception as exc:
            log.exception("queue %s: I/O thread crashed", self.name)
            self._failed = exc
        finally:
            try:
                self._persist_effects()
                if self._unwritten:
                    self._retry_unwritten(time.monotonic())
                if self._unwritten:
                    n = sum(len(r) for _, r in self._unwritten)
                    log.error("queue %s: closing with %d journal/DLQ record(s) unwritten (disk "
                              "full): those facts are lost; the tasks stay owed and run again",
                              self.name, n)
            except Exception:
                log.exception("queue %s: final journal write failed", self.name)
            self._snapshot()
            self._close_sockets()

    def _close_sockets(self) -> None:
        # The I/O thread's sockets: closed by it as it ends, or by close() when it never ran.
        if self._mon is not None:
            try:
                self._router.disable_monitor()
            except zmq.ZMQError:
                pass
            self._mon.close(linger=0)
        self._router.close(linger=0)

    def _drain_monitor(self, now: float) -> None:
        from zmq.utils.monitor import recv_monitor_message

        assert self._mon is not None
        seen = False
        while True:
            try:
                ev = recv_monitor_message(self._mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                break
            if int(ev["event"]) == zmq.EVENT_DISCONNECTED:
                seen = True
        if seen:
            # The routing id of the ended connection is not in the event: probe every worker
            # now, and again shortly (the ROUTER drops the pipe asynchronously).
            self._probe_due = sorted({*self._probe_due, now, now + 0.05, now + 0.3})

    def _probe_workers(self, now: float) -> None:
        """Send each registered worker an empty TASK; one whose connection ended is gone."""
        d = self._dispatcher
        for ident in d.worker_idents():
            try:
                self._router.send_multipart([ident, *_PROBE], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self._conn_lost += 1
                    log.info("queue %s: worker %s disconnected: its tasks go back",
                             self.name, ident.hex())
                    d.worker_gone(ident, now)
                # EAGAIN: at its HWM, alive but slow: not a loss

    def _snapshot(self) -> None:
        s = self._dispatcher.stats()
        with self._stats_lock:
            self._stats_snapshot = s

    def _drain_wake(self, now: float) -> bool:
        try:
            data = os.read(self._rfd, 4096)
        except BlockingIOError:
            data = b""
        with self._lock:
            new = self._new
            self._new = []
            events = self._peer_events
            self._peer_events = []
            self._woken = False
            closing = self._closed
        for ids, key, datas in new:
            self._dispatcher.add_batch(ids, key, datas)
        for ev in events:
            for ident in self._dispatcher.workers_of_node(ev.peer.node_id):
                self._dispatcher.worker_gone(ident, now)
        return closing or b"q" in data

    def _drain_router(self, now: float) -> None:
        sock = self._router
        d = self._dispatcher
        limit = self._max_in
        for _ in range(_RECV_BATCH):
            try:
                if self._secure:
                    zmsg = recv_bounded(sock, limit, zmq.NOBLOCK, copy=False)
                    msg = [] if zmsg is None else [f.bytes for f in zmsg]
                else:
                    msg = recv_bounded(sock, limit, zmq.NOBLOCK) or []
            except zmq.Again:
                return
            self._bytes_in += sum(map(len, msg))
            if len(msg) < 2:
                self._bad_frames += 1
                continue
            ident = msg[0]
            try:
                cmd, value = fr.decode(msg[1:])
            except ProtocolError:
                self._bad_frames += 1
                continue
            if self._secure and zmsg and not self._sender_ok(zmsg[0], ident, cmd, value):
                continue
            if cmd == fr.ACK:
                d.on_ack(ident, value, now)
            elif cmd == fr.READY:
                if value.queue != self.name:
                    self._bad_frames += 1
                    continue
                d.worker_ready(ident, value.credit, value.node_id, value.worker)
            elif cmd == fr.NACK:
                for f in value:
                    d.on_nack(ident, f.task_id, now, delay=f.delay, error_type=f.error_type,
                              error_message=f.error_message, traceback=f.traceback)
            elif cmd == fr.IN_PROGRESS:
                d.on_in_progress(ident, value, now)
            elif cmd == fr.TERM:
                for f in value:
                    d.on_term(ident, f.task_id, now, reason=f.reason, error_type=f.error_type,
                              error_message=f.error_message, traceback=f.traceback)
            elif cmd == fr.BYE:
                d.worker_gone(ident, now)
            else:  # TASK from a worker: not valid in this direction
                self._bad_frames += 1

    def _sender_ok(self, frame: zmq.Frame, ident: bytes, cmd: Any, value: Any) -> bool:
        try:
            uid = frame.get("User-Id")
        except zmq.ZMQError:
            uid = None
        key = uid if isinstance(uid, str) else None
        if cmd == fr.READY:
            peer = self.node.peer_by_key(key)
            if (key is None or peer is None or peer != value.node_id
                    or not self.node.permits(peer, "work", self.name)):
                self._forbidden += 1
                _limited.warning("ready-refused", "queue %s: READY from %s (key %s) refused",
                                 self.name, peer, key)
                return False
            self._ident_keys[ident] = key
            return True
        # Acks and the rest: only from the connection (key) that registered this routing id
        # with READY, so a peer that takes over a routing id (ROUTER_HANDOVER) gains nothing.
        if key is None or self._ident_keys.get(ident) != key:
            self._forbidden += 1
            return False
        return True

    def _dispatch(self, now: float) -> None:
        d = self._dispatcher
        sends = d.dispatch(now)
        if not sends:
            return
        # Persist the delivery numbers before any frame leaves (poison detection). On a full
        # disk the frames wait (held) until the record is written: like a slow network.
        if not self._write(self._store.journal, [journal_dispatch(sends, self._epoch)], now):
            self._held_sends.extend(sends)
            return
        self._send(sends, now)

    def _send(self, sends: list[tuple[bytes, list[tuple[int, int, int, Any, Any]]]],
              now: float) -> None:
        d = self._dispatcher
        for ident, items in sends:
            if self._traced:
                # (payload, trace) data becomes the TASK item's payload + trace elements.
                items = [(*i[:4], *i[4]) if type(i[4]) is tuple else i for i in items]
            out = [ident, *fr.encode_tasks(items)]
            try:
                self._router.send_multipart(out, zmq.NOBLOCK)
                self._bytes_out += sum(map(len, out))
            except zmq.ZMQError as exc:
                # EHOSTUNREACH (worker disconnected) or EAGAIN (HWM): treat it as gone; its
                # tasks return to the queue now, and a live worker re-registers with READY.
                log.debug("queue %s: worker %s unreachable: %s", self.name, ident.hex(), exc)
                d.worker_gone(ident, now)

    def _persist_effects(self) -> None:
        d = self._dispatcher
        if not d.has_effects():
            return
        eff = d.take_effects()
        dead_ids = []
        if eff.dead:
            recs = []
            now = time.time()
            for dl in eff.dead:
                payload, trace = dl.data if type(dl.data) is tuple else (dl.data, None)
                recs.append(encode_dead_letter(self.name, self.node.id, dl, payload, now, trace))
                dead_ids.append(dl.task_id)
            # The DLQ record first: a crash before the journal's X record keeps the task owed
            # (redelivered, maybe dead-lettered twice), never lost.
            self._write(self._dlq_log, recs, time.monotonic())
        self._write(self._store.journal,
                    journal_records([], eff.acked, eff.failed, dead_ids, self._epoch),
                    time.monotonic())

    def _write(self, lg: Log, recs: list[bytes], now: float) -> bool:
        """Append ``recs`` to ``lg`` after the writes a full disk refused (kept in order);
        False when the disk is full (then they wait in ``_unwritten`` for a retry)."""
        if not recs:
            return True
        if self._unwritten:
            self._unwritten.append((lg, recs))
            return False
        try:
            self._append(lg, recs)
            if lg is self._store.journal:
                self._store.journal_bytes += sum(map(len, recs))
            return True
        except LogFull as exc:
            self._unwritten.append((lg, recs))
            self._full_events += 1
            self._full_backoff = _FULL_RETRY_MIN
            self._full_retry_at = now + self._full_backoff
            log.warning("queue %s: disk full (%s): dispatch paused, retrying the journal write "
                        "with backoff", self.name, exc)
            return False

    def _compact_online(self) -> None:
        # Every fact and dead letter is written (the caller checked): the snapshot may call
        # every id below the dispatcher's high mark that it does not list done.
        d = self._dispatcher
        try:
            self._store.compact_online(d.high, d.owed())
        except LogFull:
            self._store.journal_bytes = 0  # try again after as many bytes more
            log.warning("queue %s: disk full: journal compaction postponed", self.name)

    def _append(self, lg: Log, recs: list[bytes]) -> None:
        lg.append_many(recs)
        if lg is self._dlq_log:
            # A dead letter is fsynced before the journal's X says its task ended: the two
            # logs are fsynced apart, and a power cut that kept the X but not the DLQ record
            # would lose the task without a trace. Dead letters are rare: one fsync each batch.
            try:
                lg.flush(sync=True)
            except LogError as exc:  # written, only not yet known durable: keep serving
                log.warning("queue %s: fsync of the DLQ failed: %s", self.name, exc)

    def _retry_unwritten(self, now: float) -> None:
        while self._unwritten:
            lg, recs = self._unwritten[0]
            try:
                self._append(lg, recs)
            except LogFull:
                self._full_backoff = min(self._full_backoff * 2, _FULL_RETRY_MAX)
                self._full_retry_at = now + self._full_backoff
                return
            self._unwritten.pop(0)
        log.warning("queue %s: disk space is back: journal written, dispatch resumed",
                    self.name)
        held, self._held_sends = self._held_sends, []
        if held:
            self._send(held, now)


def _trace_here() -> tuple[str | None, str | None, str | None] | None:
    """The trace fields to record with a task pushed now: the current handler's traceparent
    (its trace id and span), correlation id and causation id; None outside a handler."""
    c = current()
    if c is None:
        return None
    return (c.traceparent, c.correlationid, c.causationid)
