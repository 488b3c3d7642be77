"""Worker: the consumer side of a pipeline queue.

Threading model: the Worker's DEALER sockets are owned by the thread that first iterates it (or
calls ``get`` / ``run``); any other thread calling ``get`` / ``run`` gets :class:`WrongThread`.
Peer events arrive on the node's reactor thread and are handed over through a lock-protected
list.

Answers (ack, nack, term, in_progress) may be given from any thread. On the owner thread they
are buffered and sent as one frame per producer, at the latest :data:`FLUSH_DELAY_S` after the
first buffered one (checked at every ``get``) and always before the worker blocks for more work,
so the per-task cost is one list append and no ack waits for the local buffer to empty. From
another thread (a handler that hands tasks to a thread pool) an answer goes into a thread-safe
queue and one byte on a wake-up pipe the owner polls beside its sockets: the owner sends it
within milliseconds while it waits in ``get`` / ``run`` (or at its next ``get`` when it is busy
in user code). Ending a task twice raises :class:`ConfigError`; two ends racing on two threads
send exactly one answer (the other is dropped and counted): no answer is lost or sent twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
import traceback as tb_mod
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import zmq

from mesh.errors import ClosedError, ConfigError, MeshError, ProtocolError, WrongThread
from mesh.peers import PeerEvent, PeerInfo
from mesh.tracing import TraceContext, consuming, context_from, new_span_id, parse_traceparent
from patterns._closing import close_with
from patterns._metrics import Processing, attach, worker_collector

from . import frames as fr
from .queue import role_for

log = logging.getLogger(__name__)

_FLUSH_AT = 256  #: answers buffered per producer before a flush even mid-batch
_get_ident = threading.get_ident
_monotonic = time.monotonic
FLUSH_DELAY_S = 0.002  #: most time an answer waits in the owner's buffer while tasks are handed out


class TaskTerminated(Exception):
    """Raise from a handler to end the task with TERM (never retried; straight to the DLQ)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Conn:
    __slots__ = ("acks", "endpoint", "fails", "key", "node_id", "sock", "terms")

    def __init__(self, node_id: str, endpoint: str, sock: zmq.Socket[Any],
                 key: str | None = None) -> None:
        self.node_id = node_id
        self.endpoint = endpoint
        self.key = key  # the producer's CURVE key this connection's handshakes use
        self.sock = sock
        self.acks: list[int] = []
        self.fails: list[fr.Failure] = []
        self.terms: list[fr.Failure] = []


class Task:
    """One delivery of a task. End it exactly once with :meth:`ack`, :meth:`nack` or
    :meth:`term`; :meth:`in_progress` may be called any number of times before.

    Thread-safe: any thread may end the task (e.g. a thread pool the handler hands it to); the
    answer is sent by the worker's owner thread, which a wake-up pipe rouses at once. Ending
    it a second time raises :class:`ConfigError`; when the owner and another thread end it at
    the same instant, exactly one answer is sent and the other is dropped and counted
    (``duplicate_answers`` in :meth:`Worker.stats`). After the worker closed, an answer is
    dropped (the producer redelivers the task)."""

    __slots__ = ("_conn", "_done", "_worker", "delivery", "id", "key", "payload", "trace")

    def __init__(self, worker: Worker, conn: _Conn, d: fr.Delivery) -> None:
        self._worker = worker
        self._conn = conn
        self.id = d.task_id
        self.delivery = d.delivery
        self.key = d.key
        self.payload = d.payload
        #: ``(traceparent, correlationid, causationid)`` where the task was pushed, or None.
        self.trace = d.trace
        # 0: not ended; 1: ended on the owner thread (answered inline); 2: ended on another
        # thread (handed to the owner). Only the owner writes 1, others write 2 under a lock:
        # if both race, the owner's 1 wins and the handed answer is dropped when drained, so
        # exactly one answer is sent, with no lock and no allocation on the owner's hot path.
        self._done = 0

    def __repr__(self) -> str:
        return f"Task(id={self.id}, delivery={self.delivery}, {len(self.payload)} bytes)"

    def _end(self) -> bool:
        """Mark ended; True on the owner thread (answer inline), False elsewhere (hand over)."""
        w = self._worker
        if _get_ident() == w._owner:
            if self._done:
                raise ConfigError(f"task {self.id} was already ended")
            self._done = 1
            w._inflight -= 1
            return True
        with w._answers_lock:
            if self._done:
                raise ConfigError(f"task {self.id} was already ended")
            self._done = 2
        return False

    def ack(self) -> None:
        """Done: the producer forgets the task.

        Raises:
            ConfigError: the task was already ended.
        """
        w = self._worker
        if _get_ident() != w._owner:
            if not self._end():
                w._hand_over(self, fr.ACK, None)
            return
        # (the owner's _end inlined: this is the per-task hot path)
        if self._done:
            raise ConfigError(f"task {self.id} was already ended")
        self._done = 1
        w._inflight -= 1
        c = self._conn
        acks = c.acks
        acks.append(self.id)
        if len(acks) >= _FLUSH_AT:
            w._flush_conn(c)

    def nack(self, delay: float | None = None, *, error: BaseException | None = None) -> None:
        """Failed: retry after ``delay`` seconds (None: the producer's backoff).

        Args:
            delay: seconds before the retry, or None for exponential backoff with jitter.
            error: the exception, kept (type, message, traceback) in the retry history.

        Raises:
            ConfigError: the task was already ended, or ``delay`` is negative.
        """
        if delay is not None and not delay >= 0:
            raise ConfigError(f"delay must be >= 0, got {delay}")
        f = fr.Failure(self.id, delay, "", *_error_facts(error))
        if not self._end():
            self._worker._hand_over(self, fr.NACK, f)
            return
        self._conn.fails.append(f)
        self._worker._buffered(self._conn, len(self._conn.fails))

    def term(self, reason: str = "", *, error: BaseException | None = None) -> None:
        """Never retry: the task goes straight to the DLQ with ``reason``.

        Raises:
            ConfigError: the task was already ended.
        """
        f = fr.Failure(self.id, None, reason, *_error_facts(error))
        if not self._end():
            self._worker._hand_over(self, fr.TERM, f)
            return
        self._conn.terms.append(f)
        self._worker._buffered(self._conn, len(self._conn.terms))

    def in_progress(self) -> None:
        """Still working: push the ack deadline forward by one ack wait (sent at once from
        the owner thread; from another thread, as soon as the owner wakes)."""
        if self._done:
            raise ConfigError(f"task {self.id} was already ended")
        w = self._worker
        if threading.get_ident() != w._owner:
            w._hand_over(self, fr.IN_PROGRESS, None)
            return
        w._send(self._conn, fr.encode_ids(fr.IN_PROGRESS, [self.id]))


def _end_from_future(task: Task, fut: concurrent.futures.Future[Any]) -> None:
    # Runs on the pool's thread (or the owner's, if already done): a cross-thread answer.
    if task._done:
        return
    exc = None if fut.cancelled() else fut.exception()
    try:
        if fut.cancelled():
            task.nack()
        elif exc is None:
            task.ack()
        elif isinstance(exc, TaskTerminated):
            task.term(exc.reason, error=exc)
        else:
            task.nack(error=exc)
    except ConfigError:
        pass  # the work ended it meanwhile


def _error_facts(error: BaseException | None) -> tuple[str | None, str | None, str | None]:
    if error is None:
        return None, None, None
    tb = "".join(tb_mod.format_exception(type(error), error, error.__traceback__))
    return type(error).__name__, str(error), tb


class Worker:
    """Takes tasks of queue ``queue`` from every producer that offers it.

    ``for task in worker:`` yields :class:`Task` objects (blocking); or :meth:`run` a handler
    (an exception is a NACK with the error kept; :class:`TaskTerminated` is a TERM).

    Threads: the first thread to ``get`` / iterate / ``run`` owns the worker (others get
    :class:`WrongThread` there); tasks may be ended from any thread. Answers leave within
    :data:`FLUSH_DELAY_S` of the previous send (at the next ``get``) or before the worker
    waits; answers from other threads wake the owner through a pipe (see the module notes).

    Args:
        node: the node to run on.
        queue: the queue name.
        credit: most un-acked tasks this worker holds (split across producers).
        ready_interval: how often READY is re-sent (lets a restarted producer learn the
            worker without waiting for a reconnect).

    Raises:
        ConfigError: credit < 1.
    """

    def __init__(self, node: Any, queue: str, *, credit: int = 10,
                 ready_interval: float = 0.5) -> None:
        if credit < 1:
            raise ConfigError(f"credit must be >= 1, got {credit}")
        self.node = node
        self.queue = queue
        self.credit = credit
        self.ready_interval = ready_interval
        self.ident = uuid.uuid4().bytes
        self.label = f"{node.name}/{os.getpid()}/{self.ident.hex()[:8]}"
        self._conns: dict[str, _Conn] = {}
        self._local: collections.deque[Task] = collections.deque()
        self._inflight = 0
        self._owner: int | None = None
        self._closed = False
        self._events_lock = threading.Lock()
        self._events: list[PeerEvent] = []
        self._last_ready = 0.0
        self._poller = zmq.Poller()
        # Answers given on other threads: (task, command, failure) handed to the owner, which
        # polls the read end of the pipe beside its sockets (one byte per batch).
        self._answers_lock = threading.Lock()
        self._xq: collections.deque[tuple[Task, int, fr.Failure | None]] = collections.deque()
        self._woken = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._pipe_open = True
        self._poller.register(self._rfd, zmq.POLLIN)
        self._last_flush = 0.0
        self.bad_frames = 0
        self.duplicate_answers = 0  # a racing second end of a task, dropped (one answer sent)
        self.bytes_in = self.bytes_out = 0  # data-socket bytes
        self._handler: Callable[[Task], object] | None = None
        self._unsub = node.on_peer(self._on_peer)
        self._unmetrics = attach(node, worker_collector(self))
        self._unclose = close_with(node, self.close)  # node.close() closes it first
        self._processing = Processing(node, "pipeline", queue, consumer=node.name)

    # -------------------------------------------------------------- reactor thread
    def _on_peer(self, ev: PeerEvent) -> None:
        with self._events_lock:
            self._events.append(ev)

    # -------------------------------------------------------------- owner thread
    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise WrongThread(f"worker of {self.queue!r} is owned by another thread")
        if self._closed:
            self._close_pipe()
            raise ClosedError(f"worker of {self.queue!r} is closed")

    def _buffered(self, c: _Conn, n: int) -> None:
        if n >= _FLUSH_AT:
            self._flush_conn(c)

    def _hand_over(self, task: Task, cmd: int, failure: fr.Failure | None) -> None:
        # Any thread but the owner: queue the answer and wake the owner (one byte per batch).
        self._xq.append((task, cmd, failure))
        with self._answers_lock:
            if self._woken or not self._pipe_open:
                return
            self._woken = True
            try:
                os.write(self._wfd, b"x")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: the owner is being woken already

    def _drain_answers(self) -> None:
        """Owner thread: take the answers other threads gave into the send buffers."""
        with self._answers_lock:
            self._woken = False
            try:
                os.read(self._rfd, 4096)
            except (BlockingIOError, OSError):
                pass
        xq = self._xq
        while xq:
            task, cmd, f = xq.popleft()
            if cmd != fr.IN_PROGRESS:
                if task._done != 2:
                    # The owner ended it too, at the same moment: its answer already counts.
                    self.duplicate_answers += 1
                    continue
                self._inflight -= 1
            c = task._conn
            if self._conns.get(c.node_id) is not c:
                continue  # that producer is gone: it redelivers the task anyway
            if cmd == fr.ACK:
                c.acks.append(task.id)
            elif cmd == fr.NACK:
                assert f is not None
                c.fails.append(f)
            elif cmd == fr.TERM:
                assert f is not None
                c.terms.append(f)
            else:
                self._send(c, fr.encode_ids(fr.IN_PROGRESS, [task.id]))

    def _candidates(self) -> list[PeerInfo]:
        peers = list(self.node.who_offers("queue", self.queue))
        me = self.node.info()
        if self.queue in me.offers.get("queue", ()):
            peers.append(me)  # a producer in this very node
        # Security: take tasks (connect, give credit) only from producers allowed to "push"
        # here; the CURVE server key of the connection binds it to that node.
        return [p for p in peers if self.node.permits(p.node_id, "push", self.queue)]

    def _sync_peers(self, full: bool) -> None:
        with self._events_lock:
            events = self._events
            self._events = []
        if not events and not full:
            return
        # Reconcile with the peer table itself (events only say *when* to look): a burst of
        # JOINED / CHANGED / LEFT around a producer restart then cannot leave us disconnected.
        wanted = {p.node_id: p for p in self._candidates()}
        changed = False
        for node_id in list(self._conns):
            if node_id not in wanted:
                changed |= self._disconnect(node_id)
        for p in wanted.values():
            changed |= self._connect(p)
        if changed:
            self._send_ready_all()

    def _connect(self, p: PeerInfo) -> bool:
        ep = self.node.connect_endpoint(p, role_for(self.queue))
        if ep is None:
            return False
        old = self._conns.get(p.node_id)
        if old is not None:
            if old.endpoint == ep and old.key == p.public_key:
                return False
            # The producer restarted on a new endpoint, or on the same one with another key
            # (a rotation; data ports come from a range): libzmq would retry the old
            # handshake forever.
            self._disconnect(p.node_id)
        sock = self.node.socket(zmq.DEALER, role_for(self.queue))
        sock.setsockopt(zmq.IDENTITY, self.ident)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(ep)
        except zmq.ZMQError as exc:
            sock.close(0)
            log.warning("worker %s: cannot connect to %s: %s", self.label, ep, exc)
            return False
        self._conns[p.node_id] = _Conn(p.node_id, ep, sock, p.public_key)
        self._poller.register(sock, zmq.POLLIN)
        return True

    def _disconnect(self, node_id: str) -> bool:
        c = self._conns.pop(node_id, None)
        if c is None:
            return False
        self._poller.unregister(c.sock)
        c.sock.close(0)
        # Tasks of that producer still buffered here are dropped: it redelivers them.
        keep = collections.deque(t for t in self._local if t._conn is not c)
        self._inflight -= len(self._local) - len(keep)
        self._local = keep
        return True

    def _credit_for(self) -> int:
        n = max(1, len(self._conns))
        return max(1, self.credit // n)

    def _send_ready_all(self) -> None:
        body = fr.encode_ready(fr.Ready(self.queue, self._credit_for(), self.node.id, self.label))
        for c in self._conns.values():
            self._send(c, body)
        self._last_ready = time.monotonic()

    def _send(self, c: _Conn, frames: list[bytes]) -> None:
        try:
            c.sock.send_multipart(frames, zmq.NOBLOCK)
            self.bytes_out += sum(map(len, frames))
        except zmq.Again:
            pass  # HWM towards a stalled producer: it redelivers on its own deadline
        except zmq.ZMQError as exc:
            raise ClosedError(f"worker socket failed: {exc}") from exc

    def _flush_conn(self, c: _Conn) -> None:
        if c.acks:
            self._send(c, fr.encode_ids(fr.ACK, c.acks))
            c.acks = []
        if c.fails:
            self._send(c, fr.encode_failures(fr.NACK, c.fails))
            c.fails = []
        if c.terms:
            self._send(c, fr.encode_failures(fr.TERM, c.terms))
            c.terms = []

    def flush(self) -> None:
        """Send buffered answers now (done automatically: before waiting for work, and at a
        ``get`` once :data:`FLUSH_DELAY_S` passed since the last flush). Owner thread only."""
        if self._xq:
            self._drain_answers()
        for c in self._conns.values():
            self._flush_conn(c)
        self._last_flush = _monotonic()

    def _receive(self, timeout: float) -> None:
        events = dict(self._poller.poll(int(timeout * 1000)))
        if self._rfd in events:
            self.flush()  # answers from other threads: out at once
        by_sock = {id(c.sock): c for c in self._conns.values()}
        for sock in events:
            if type(sock) is int:
                continue
            c = by_sock.get(id(sock))
            if c is None:
                continue
            for _ in range(1000):
                try:
                    msg = c.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.bytes_in += sum(map(len, msg))
                try:
                    cmd, value = fr.decode(msg)
                except ProtocolError:
                    self.bad_frames += 1
                    continue
                if cmd != fr.TASK:
                    self.bad_frames += 1
                    continue
                for d in value:
                    self._local.append(Task(self, c, d))
                self._inflight += len(value)

    def get(self, timeout: float | None = None) -> Task | None:
        """The next task, waiting up to ``timeout`` seconds (None: forever).

        Raises:
            ClosedError: the worker is closed.
            WrongThread: called from another thread than the owner.
        """
        self._check_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._local:
                # Bounded delay: an answer never waits for the local buffer to empty (a
                # flush with nothing buffered costs next to nothing, once per FLUSH_DELAY_S).
                if _monotonic() - self._last_flush >= FLUSH_DELAY_S:
                    self.flush()
                return self._local.popleft()
            self.flush()
            now = time.monotonic()
            due = now - self._last_ready >= self.ready_interval
            self._sync_peers(full=due or not self._conns)
            if due:
                self._send_ready_all()
            wait = self.ready_interval
            if deadline is not None:
                if now >= deadline:
                    # One last non-blocking drain, so get(timeout=0) works as "poll".
                    if self._conns:
                        self._receive(0)
                    return self._local.popleft() if self._local else None
                wait = min(wait, deadline - now)
            if not self._conns:
                wait = min(wait, 0.05)  # nothing to poll yet: re-check discovery soon
                time.sleep(wait)  # waiting for discovery, not for an outcome
                continue
            self._receive(wait)
            if self._closed:
                self._close_pipe()
                raise ClosedError(f"worker of {self.queue!r} is closed")

    def __iter__(self) -> Iterator[Task]:
        while not self._closed:
            task = self.get()
            if task is not None:
                yield task

    def handle(self, task: Task, handler: Callable[[Task], object]) -> None:
        """Run ``handler`` on ``task``: return = ACK, :class:`TaskTerminated` = TERM, any
        other exception = NACK with the error kept (type, message, traceback).

        A handler that hands the task to a thread pool returns the pool's
        :class:`concurrent.futures.Future`: the task then ends when the future does (its
        result = ACK, its exception = TERM or NACK as above), unless the work ended it first.

        The handler runs in the trace context of the code that pushed the task (same trace
        id, correlation id and causation id), or in a new trace when the push was made outside
        any handler, so what it publishes or requests is correlated to the pusher's work."""
        started = time.perf_counter()
        failed = False
        try:
            with consuming(ctx=self._context_of(task), kind="process"):
                result = handler(task)
        except TaskTerminated as exc:
            failed = True
            if not task._done:
                task.term(exc.reason, error=exc)
            return
        except Exception as exc:
            failed = True
            if not task._done:
                task.nack(error=exc)
            return
        finally:
            self._processing.observe(started, failed)
        if isinstance(result, concurrent.futures.Future):
            result.add_done_callback(lambda fut: _end_from_future(task, fut))
            return
        if not task._done:
            try:
                task.ack()
            except ConfigError:
                pass  # ended meanwhile on another thread the handler gave it to

    def _context_of(self, task: Task) -> TraceContext:
        tr = task.trace
        if tr is None:
            return context_from(stream=self.queue)
        tp, correlationid, causationid = tr
        parsed = parse_traceparent(tp)
        if parsed is None:  # a bad traceparent starts a new trace, keeping the ids (W3C)
            c = context_from(stream=self.queue)
            return c._replace(correlationid=correlationid or c.correlationid,
                              causationid=causationid)
        tid, parent, flags = parsed
        # A task is not an event with an id of its own: the worker's children keep the
        # pusher's causation (the event whose handler pushed the task).
        return TraceContext(tid, new_span_id(), parent, flags, correlationid, causationid,
                            None, self.queue)

    def handler(self, fn: Callable[[Task], object]) -> Callable[[Task], object]:
        """Decorator: make ``fn`` the handler :meth:`run` uses when given none."""
        self._handler = fn
        return fn

    def run(self, handler: Callable[[Task], object] | None = None, *,
            stop: threading.Event | None = None, max_tasks: int | None = None) -> int:
        """Process tasks with ``handler`` (or the one set with :meth:`handler`) until ``stop``
        is set, ``max_tasks`` are done, or the worker closes. Returns the number handled.

        Raises:
            ConfigError: no handler given nor registered.
        """
        handler = handler or self._handler
        if handler is None:
            raise ConfigError("no handler: pass one to run() or decorate it with @worker.handler")
        n = 0
        while not self._closed and not (stop is not None and stop.is_set()):
            task = self.get(timeout=0.1)
            if task is None:
                continue
            self.handle(task, handler)
            n += 1
            if max_tasks is not None and n >= max_tasks:
                break
        if not self._closed:
            self.flush()
        else:
            self._close_pipe()
        return n

    def stats(self) -> dict[str, int]:
        """Local buffer, un-ended tasks held, producers connected, malformed frames, and
        answers dropped because another thread ended the same task at the same moment."""
        return {
            "buffered": len(self._local),
            "held": self._inflight,
            "producers": len(self._conns),
            "malformed_frames": self.bad_frames,
            "duplicate_answers": self.duplicate_answers,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    def close(self) -> None:
        """Flush answers, say BYE (tasks not ended go to other workers now) and close."""
        if self._closed:
            return
        self._unsub()
        self._unmetrics()
        self._unclose()
        me = threading.get_ident()
        if self._owner in (None, me):
            if self._xq:
                self._drain_answers()
            for c in self._conns.values():
                try:
                    self._flush_conn(c)
                    self._send(c, fr.encode_ids(fr.BYE, []))
                except MeshError:
                    pass
                c.sock.close(linger=200)  # let the BYE and last answers leave
        self._closed = True
        self._conns.clear()
        self._local.clear()
        if self._owner in (None, me):
            self._close_pipe()
        else:
            # The owner may be polling the pipe: wake it (it raises ClosedError at once) and
            # let it close the pipe, never close an fd under another thread's poll.
            with self._answers_lock:
                if self._pipe_open:
                    try:
                        os.write(self._wfd, b"q")
                    except OSError:
                        pass

    def _close_pipe(self) -> None:
        with self._answers_lock:
            if self._pipe_open:
                self._pipe_open = False
                os.close(self._rfd)
                os.close(self._wfd)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
