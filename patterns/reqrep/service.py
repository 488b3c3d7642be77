"""The responder side: a named service on a node (ROUTER bound under role ``rpc.<name>``).

Threads: one I/O thread per service owns the ROUTER (receives, answers PINGs, consults the
reply cache, sends replies); handlers run on ``concurrency`` worker threads and hand results
back through a deque plus one wake-up byte on a pipe per batch (portable: no eventfd).

The fast path (``inline_budget_s``, on by default): a request that finds the service idle
(nothing queued or running) runs on the I/O thread at once, which sends its reply itself: two
thread wake-ups less per request. A burst (the items of a BATCH, several requests waiting) runs
there too, one after another, while less than ``inline_budget_s`` has passed since the I/O
loop's pass began; the rest of it goes to the workers. While it runs, the I/O thread
leaves the socket alone; a watchdog thread (ticking only while such requests come, asleep
after half a second without one) checks every ``inline_budget_s`` and, when the handler has
run longer than that, puts a "lead" token on the work queue: an idle worker takes it and
becomes the I/O thread (the socket moves between threads under a lock: libzmq allows a
socket to migrate with a full memory barrier), and the old one, when its handler returns,
hands the reply over like a worker does and joins the pool. So a slow handler delays PINGs,
BUSY answers and other requests by at most about two budgets (plus up to two of the GIL's
5 ms switch intervals when it holds the GIL: the watchdog and the new leader each wait for
it), and at most ``concurrency`` handlers run at once (the pool has ``concurrency`` + 1
threads, one of them leading, plus the watchdog).
``inline=True`` runs the handler on the I/O thread instead: one thread hop less per request
(measured: p50 about 60 µs better on ipc), but PINGs and every other request wait while a
handler runs, so use it only for handlers that take microseconds. Callers do not take that
silence for death (they keep waiting; see :mod:`patterns.reqrep.call`), but any handler that
holds the GIL longer than presence ``gone_s`` (10 s by default) stops the node's heartbeats
too, and its peers then count it as gone: its callers get ``OutcomeUnknown``.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from mesh.budget import LogLimiter
from mesh.errors import ClosedError, ConfigError, MeshError, ProtocolError
from mesh.log import FsyncPolicy, Log, LogConfig, LogDirectory, Retention, validate_stream_name
from mesh.tracing import consuming, context_of_request, enter_request, leave
from mesh.transport import recv_bounded
from patterns._closing import close_with
from patterns._metrics import Processing, attach, service_collector
from patterns.reqrep import frames as fr
from patterns.reqrep._zio import MORE_NB as _MORE_NB
from patterns.reqrep._zio import NB as _NB
from patterns.reqrep._zio import readable, recv_frames, send_frames
from patterns.reqrep._zio import zsend as _zsend
from patterns.reqrep.cache import Lookup, ReplyCache

__all__ = [
    "Incoming",
    "RawBody",
    "Service",
    "ServiceConfig",
    "ServiceStats",
    "decode_body",
    "encode_body",
    "routing_id",
    "service_role",
]

log = logging.getLogger(__name__)
_yield = os.sched_yield
_limited = LogLimiter(log)

_RECV_BATCH = 512
_packb = msgpack.Packer(use_bin_type=True).pack
_blake2b = hashlib.blake2b
_PERSON = {f: bytes([int(f)]) for f in fr.Format}
_TICK_S = 0.5  # cache expiry / close checks when idle
_RUNNING, _DONE = 1, 2  # outcome log record kinds
_FLOOR = "running"  # retention floor: the oldest RUNNING record still without its reply
_WATCH_IDLE_S = 0.5  # the fast path's watchdog stops ticking after this long without a run
_perf = time.perf_counter
_tnew = tuple.__new__  # a NamedTuple built without its Python-level __new__ (about 0.3 µs)
_OK, _BYTES = fr.Status.OK, fr.Format.BYTES


class _Lead:
    """The work-queue token that makes a worker the thread that owns the socket."""


_LEAD = _Lead()


class _SteppedDown(Exception):
    """Raised on the leading thread when its fast-path run was taken over."""


def service_role(name: str) -> str:
    """The endpoint role a service named ``name`` binds under."""
    return f"rpc.{name}"


def routing_id(node_id: str, name: str) -> bytes:
    """The ROUTER routing id of a service socket: unique per node and service name."""
    return f"{node_id}/{name}".encode()


@dataclass(frozen=True)
class RawBody:
    """A body already encoded (format and bytes), sent as is (used by durable requests)."""

    format: fr.Format
    body: bytes


def encode_body(value: Any) -> tuple[fr.Format, bytes]:
    """Bytes travel untouched; a :class:`RawBody` as it is; anything else as msgpack.

    Raises:
        ConfigError: the value cannot be packed with msgpack.
    """
    if type(value) is bytes:  # the common case: no isinstance over three types, no copy
        return _BYTES, value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return fr.Format.BYTES, bytes(value)
    if isinstance(value, RawBody):
        return value.format, value.body
    try:
        return fr.Format.MSGPACK, msgpack.packb(value, use_bin_type=True)
    except Exception as exc:
        raise ConfigError(f"payload is neither bytes nor msgpack-serialisable: {exc}") from exc


def decode_body(fmt: fr.Format, body: bytes) -> Any:
    """Inverse of :func:`encode_body`.

    Raises:
        ProtocolError: a MSGPACK body that does not decode.
    """
    if fmt == fr.Format.BYTES:
        return body
    try:
        return msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise ProtocolError(f"body is not valid msgpack: {exc}") from exc


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of a :class:`Service`.

    Attributes:
        concurrency: handlers running at once (worker threads).
        inline: run the handler on the I/O thread (handlers of microseconds only: PINGs and
            other requests wait while it runs; see the module doc).
        cache_window_s: how long a reply is kept for retries of the same request id.
        cache_max: most replies kept.
        cache_max_bytes: most bytes of encoded replies kept (oldest dropped first).
        cache_entry_max_bytes: a reply larger than this is sent but not kept: a retry of its
            id gets :class:`~patterns.reqrep.errors.ReplyNotCached`, never a second run.
        max_queue: requests waiting for a free handler beyond which new ones get BUSY.
        inline_budget_s: the default service's fast path (0 turns it off): a request that
            arrives while no other is queued or running runs on the I/O thread itself (no
            hand-off to a worker and back), also in a burst (a BATCH, several requests
            waiting) while less than this has passed since the I/O loop's pass began. If it
            is still running after about this long, a worker thread takes over the socket
            (PINGs, BUSY, other requests go on being answered) and the handler finishes
            where it is; a handler whose last run took longer than this goes to a worker
            directly. At most ``concurrency`` handlers still run at once. Ignored with
            ``inline=True`` and in the iterator style.
        spin_us: latency mode (off by default): before each blocking wait, the I/O thread
            polls without blocking for up to this many microseconds, so a request arriving
            then is taken without a wake-up from sleep, at the cost of a busy core while it
            spins. It spins only while no handler runs on a worker thread (a spinning thread
            would hold back the worker's GIL); best with ``inline=True``.
        outcome_log: keep a durable outcome log in the node's data directory
            (``<data_dir>/reqrep/streams/<name>.outcomes``): RUNNING is written (``write()``,
            so it survives kill -9 of this process) before the handler runs and the reply
            before it is sent; a restarted service answers a retry with the stored reply,
            or with :class:`~patterns.reqrep.errors.OutcomeUnknown` if it was running when
            the process died, never by running it again. Bounded like the cache (window,
            ``cache_max_bytes``). False: replies are kept in memory only, and a retry after
            a restart runs the request again.
    """

    concurrency: int = 4
    inline: bool = False
    cache_window_s: float = 60.0
    cache_max: int = 100_000
    cache_max_bytes: int = 64 << 20
    cache_entry_max_bytes: int = 1 << 20
    max_queue: int = 1000
    outcome_log: bool = True
    spin_us: int = 0
    inline_budget_s: float = 0.002

    def __post_init__(self) -> None:
        b = self.inline_budget_s
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 10.0:
            raise ConfigError(f"inline_budget_s must be a number in [0, 10], got {b!r}")
        if not isinstance(self.spin_us, int) or not 0 <= self.spin_us <= 1_000_000:
            raise ConfigError(f"spin_us must be an int in [0, 1000000], got {self.spin_us!r}")
        if self.concurrency < 1 or self.max_queue < 0:
            raise ConfigError("concurrency must be >= 1 and max_queue >= 0")
        if self.cache_max_bytes < 1 or self.cache_entry_max_bytes < 0:
            raise ConfigError("cache_max_bytes must be >= 1 and cache_entry_max_bytes >= 0")


@dataclass
class ServiceStats:
    """Counters of a service (a snapshot)."""

    received: int = 0
    executed: int = 0
    errors: int = 0
    replied: int = 0
    cache_hits: int = 0
    attached: int = 0
    busy: int = 0
    expired: int = 0
    id_reused: int = 0
    not_cached: int = 0
    cache_bytes: int = 0
    pings: int = 0
    restored: int = 0
    outcome_unknown: int = 0
    outcome_log_errors: int = 0
    garbage: int = 0
    unroutable: int = 0
    dropped_by_hook: int = 0
    running: int = 0
    forbidden: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    batches_received: int = 0
    batches_sent: int = 0
    fast_path: int = 0
    takeovers: int = 0


@dataclass
class Incoming:
    """One request as a handler (or an iterator consumer) sees it.

    Attributes:
        id: request id (the same across the client's retries).
        service: service name.
        payload: the decoded body (bytes, or the msgpack value the client sent).
        headers: string headers (``correlationid``, ``traceparent``...).
        attempt: 0 for the first send, more for retries.
        deadline: ``time.monotonic()`` value after which the client no longer waits (from the
            request's ``ttl_ms`` when it arrived); a request still queued then is not run.
    """

    id: str
    service: str
    payload: Any
    headers: dict[str, str]
    attempt: int
    deadline: float
    _finish: Callable[[Incoming, fr.Reply], None] = field(repr=False, default=lambda i, r: None)
    _answered: bool = field(default=False, repr=False)
    _key: Any = field(default=None, repr=False)  # (caller, id): the reply cache's key
    _digest: bytes = field(default=b"", repr=False)  # of the payload (for the outcome log)

    def _expire_if_late(self) -> bool:
        """Answer EXPIRED (without running) if the deadline passed; True if it did."""
        if time.monotonic() < self.deadline:
            return False
        self._answer(fr.Reply(self.id, fr.Status.EXPIRED, 0, fr.Format.BYTES))
        return True

    def reply(self, value: Any) -> None:
        """Send ``value`` (bytes or a msgpack value) as the result (iterator style).

        Raises:
            ClosedError: already answered.
        """
        try:
            fmt, body = encode_body(value)
        except ConfigError as exc:
            self.fail(exc)
            return
        self._answer(fr.Reply(self.id, fr.Status.OK, 0, fmt, body=body))

    def fail(self, exc: BaseException) -> None:
        """Send ``exc`` as a remote error (type name and message).

        Raises:
            ClosedError: already answered.
        """
        self._answer(fr.Reply(self.id, fr.Status.ERROR, 0, fr.Format.BYTES,
                              type(exc).__name__, str(exc)[:4096]))

    def _answer(self, rep: fr.Reply) -> None:
        if self._answered:
            raise ClosedError(f"request {self.id} was already answered")
        self._answered = True
        self._finish(self, rep)


Handler = Callable[[Incoming], Any]


class Service:
    """A named request/reply responder on ``node``.

    ``Service(node, "thumbs", handler, concurrency=4)``, or the decorator style::

        svc = Service(node, "thumbs")
        @svc.handler
        def thumbs(req): return make_thumb(req.payload)

    or the iterator style (no handler; ``concurrency`` calls may be outstanding)::

        for req in svc.requests(): req.reply(work(req.payload))

    Args:
        node: the mesh node.
        name: the service name clients call.
        handler: the function (may be given later with :meth:`handler`).
        config: settings; keyword arguments override its fields.

    Raises:
        ConfigError: bad name or settings.
        PeerError: the socket could not be bound.
        LogLocked: another process has this service's outcome log open (same data directory).
        LogError: the outcome log cannot be opened.
    """

    def __init__(self, node: Any, name: str, handler: Handler | None = None, *,
                 config: ServiceConfig | None = None, **overrides: Any) -> None:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigError(f"service name must be a non-empty string, got {name!r}")
        cfg = config or ServiceConfig()
        if overrides:
            cfg = ServiceConfig(**{**cfg.__dict__, **overrides})
        self.node = node
        self.name = name
        self.config = cfg
        self._handler = handler
        self._iter_q: queue.SimpleQueue[Incoming | None] | None = None
        self._work_q: queue.SimpleQueue[Incoming | _Lead | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[Incoming, fr.Reply]] = collections.deque()
        # wake-up of the I/O thread: a non-blocking pipe (portable; a full pipe = already awake)
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._cache: ReplyCache[list[bytes], bytes] = ReplyCache(
            cfg.cache_window_s, cfg.cache_max, time.monotonic, max_bytes=cfg.cache_max_bytes)
        self._stats = ServiceStats()
        self._olog: Log | None = None
        # running key -> (offset, bytes appended up to it, digest) of its RUNNING record, in
        # append order (the first is the oldest)
        self._run_off: dict[tuple[Any, str], tuple[int, int, bytes]] = {}
        self._obytes = 0  # bytes appended to the outcome log by this process
        self._floor_due = 0
        if cfg.outcome_log and getattr(node, "data_dir", None) is not None:
            try:
                self._open_outcomes(Path(node.data_dir))
            except BaseException:
                os.close(self._rfd)
                os.close(self._wfd)
                raise
        self._busy = 0  # dispatched and not finished (I/O thread only)
        #: routing ids whose last message used the split form: answered in it (1.0 callers)
        self._split_callers: set[bytes] = set()
        #: routing ids whose latest message showed rev >= BATCH_REVISION: they read BATCHes
        self._batch_callers: set[bytes] = set()
        #: compact replies to batch callers, sent at the end of the loop pass (or earlier, at
        #: BATCH_MAX_ITEMS in all): routing id -> frames, in order
        self._outbox: dict[bytes, list[bytes]] = {}
        self._outbox_n = 0
        self._closed = False
        self._sent = False  # a send since the I/O loop last read ZMQ_EVENTS
        #: test hook: drop this many replies after caching them (simulates a lost reply).
        self.drop_replies = 0
        self._secure = getattr(node, "security", None) is not None
        self._sock = node.socket(zmq.ROUTER, service_role(name))
        self._sock.setsockopt(zmq.ROUTING_ID, routing_id(node.id, name))
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoints = node.bind(self._sock, service_role(name))
        self._workers: list[threading.Thread] = []
        self._io = threading.Thread(target=self._run, name=f"rpc-{name}", daemon=True)
        # fast path (see the module doc); the fields below are guarded by _lead_mu
        self._fast = False
        self._budget = float(cfg.inline_budget_s)
        self._last_s = 0.0  # how long the last handler call took (any thread writes it)
        self._lead_mu = threading.Lock()
        self._inline_on = False  # the leading thread is running a handler
        self._inline_t0 = 0.0
        self._inline_n = 0  # fast-path runs begun
        self._taken = False  # the watchdog gave the socket to a worker during this run
        self._pass_t0 = 0.0  # when the leader's current loop pass began (burst budget)
        #: the items of the BATCH being handled (routing id, request, caller, arrival time);
        #: a leader taken over mid-BATCH leaves the rest here for the next one
        self._inbound: collections.deque[tuple[bytes, fr.Request, Any, float]] = \
            collections.deque()
        self._watching = False  # the watchdog thread is ticking
        self._watch_seen = 0
        self._watch_idle = 0
        self._watch_wake = threading.Event()  # set: tick; clear: the watchdog sleeps
        self._watchdog: threading.Thread | None = None
        self._started = False
        self._start_lock = threading.Lock()
        self._processing = Processing(node, "reqrep", name)
        self._unmetrics = attach(node, service_collector(self))
        self._unclose = close_with(node, self.close)  # node.close() closes it first
        if handler is not None:
            self._start()

    # --- public API ---------------------------------------------------------------------------

    def handler(self, fn: Handler) -> Handler:
        """Decorator: set the handler and start serving.

        Raises:
            ConfigError: a handler was already set, or the iterator style is in use.
        """
        if self._handler is not None or self._iter_q is not None:
            raise ConfigError(f"service {self.name!r} already has a handler or iterator")
        self._handler = fn
        self._start()
        return fn

    def requests(self, timeout: float | None = None) -> Iterator[Incoming]:
        """Iterator style: yield requests; answer each with ``reply()`` or ``fail()``.

        Ends after ``timeout`` seconds without a request (None: never) or at :meth:`close`.

        Raises:
            ConfigError: a handler is set.
        """
        if self._handler is not None:
            raise ConfigError(f"service {self.name!r} has a handler; no iterator")
        if self._iter_q is None:
            self._iter_q = queue.SimpleQueue()
            self._start()
        q = self._iter_q
        while not self._closed:
            try:
                item = q.get(timeout=timeout)
            except queue.Empty:
                return
            if item is None:
                return
            if item._expire_if_late():
                continue
            yield item

    def stats(self) -> ServiceStats:
        """A snapshot of the counters."""
        s = ServiceStats(**self._stats.__dict__)
        s.cache_hits = self._cache.hits
        s.attached = self._cache.attached
        s.running = self._busy
        s.id_reused = self._cache.conflicts
        s.cache_bytes = self._cache.bytes
        return s

    def close(self) -> None:
        """Withdraw the offer, stop the threads, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._unmetrics()
        self._unclose()
        try:
            self.node.withdraw("service", self.name)
            self.node.unbind(service_role(self.name), self.endpoints)
        except MeshError:
            pass
        for _ in range(len(self._workers) + 1):  # the first I/O thread may be a worker now
            self._work_q.put(None)
        if self._iter_q is not None:
            self._iter_q.put(None)
        self._wake()
        self._watch_wake.set()  # the watchdog sees _closed and ends
        threads = [self._io, *self._workers] if self._io.is_alive() else self._workers
        for t in threads:
            if t is not threading.current_thread():
                t.join(5)
        if not any(t.is_alive() for t in threads):
            self._sock.close(0)  # no thread leads any more (idempotent if one closed it)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(min(5.0, self._budget + 1.0))  # ends at its next tick
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._olog is not None:
            try:
                self._olog.close()
            except MeshError:
                pass

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------

    def _open_outcomes(self, data_dir: Path) -> None:
        """Open the outcome log and rebuild the reply cache from it (before the I/O thread)."""
        cfg = self.config
        stream = f"{self.name}.outcomes"
        try:
            validate_stream_name(stream)
        except ConfigError:  # a name that is no file name: a digest of it
            stream = "svc-" + _blake2b(self.name.encode(), digest_size=16).hexdigest() + \
                ".outcomes"
        seg = max(64 << 10, min(cfg.cache_max_bytes // 4, 16 << 20))
        lg = LogDirectory(data_dir / "reqrep").open(stream, LogConfig(
            fsync=FsyncPolicy.interval(100.0), segment_bytes=seg,
            retention=Retention(max_age_s=cfg.cache_window_s, max_bytes=cfg.cache_max_bytes),
            corruption="skip", keep_past_floors=True, floor_ttl_s=None,
            floor_max_bytes=cfg.cache_max_bytes,
            max_record_bytes=max(16 << 20, cfg.cache_entry_max_bytes + (64 << 10))))
        self._olog = lg
        lg.enforce_retention()
        running: dict[tuple[Any, str], bytes] = {}
        done: dict[tuple[Any, str], tuple[bytes, list[bytes], int]] = {}
        for rec in lg.iter(lg.first_offset or 0):
            try:
                kind, caller, rid, digest, frames = msgpack.unpackb(rec.payload, raw=False)
                key = (caller, rid)
                if kind == _RUNNING:
                    running[key] = digest
                    done.pop(key, None)
                else:
                    running.pop(key, None)
                    done[key] = (digest, list(frames), rec.timestamp_ns)
            except Exception:  # a record that is not ours (the log skips damaged ones): count
                self._stats.outcome_log_errors += 1
                continue
        now_ns, now = time.time_ns(), time.monotonic()
        window = cfg.cache_window_s
        # a stamp from the future (the clock went back) counts as now: kept one window
        restore = [(min(window, max(0.0, (now_ns - ts) / 1e9)), key, d, frames)
                   for key, (d, frames, ts) in done.items()]
        restore.sort(key=lambda t: -t[0])
        for age, key, d, frames in restore:
            if age < window:
                self._cache.restore(key, d, frames, now - age, _size(frames))
                self._stats.restored += 1
        for key, d in running.items():
            rid = key[1]
            frames = fr.encode_reply(fr.Reply(
                rid, fr.Status.ERROR, 0, fr.Format.BYTES, fr.ERR_OUTCOME_UNKNOWN,
                f"outcome unknown: request {rid} was running when this responder died"))
            self._cache.restore(key, d, frames, now, _size(frames))
            self._log_outcome(_DONE, key, d, frames)
            self._stats.outcome_unknown += 1
        lg.set_retention_floor(_FLOOR, lg.next_offset)

    def _log_outcome(self, kind: int, key: tuple[Any, str], digest: bytes,
                     frames: list[bytes] | None) -> int:
        """Append one outcome record (I/O thread, or __init__); -1 when it failed."""
        assert self._olog is not None
        try:
            data = _packb([kind, key[0], key[1], digest, frames])
            off = self._olog.append(data)
            self._obytes += len(data)
            return off
        except MeshError as exc:  # disk full, closed: counted, logged at a bounded rate
            self._stats.outcome_log_errors += 1
            _limited.warning("outcome-append", "service %s: outcome log append failed: %s",
                             self.name, exc)
            return -1

    def _move_floor(self) -> None:
        # lazily: a floor lower than the oldest RUNNING record is only more kept, never less
        assert self._olog is not None
        self._floor_due = 0
        first = next(iter(self._run_off.values()), None)
        self._olog.set_retention_floor(_FLOOR, self._olog.next_offset if first is None
                                       else first[0])

    def _renew_running(self) -> None:
        # A request running while half of cache_max_bytes was appended after its RUNNING
        # record gets it written again at the end, so the retention floor never holds more
        # than about that much (at most concurrency + max_queue small records per renewal).
        lim = self.config.cache_max_bytes // 2
        moved = False
        while self._run_off:
            key, (_off, cum, digest) = next(iter(self._run_off.items()))
            if self._obytes - cum <= lim:
                break
            off = self._log_outcome(_RUNNING, key, digest, None)
            if off < 0:
                break
            del self._run_off[key]
            self._run_off[key] = (off, self._obytes, digest)
            moved = True
        if moved:
            self._move_floor()

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
        if self._handler is not None and not self.config.inline:
            self._fast = self._budget > 0
            if self._fast:
                self._watchdog = threading.Thread(target=self._watch_loop,
                                                  name=f"rpc-{self.name}-watch", daemon=True)
                self._watchdog.start()
            for i in range(self.config.concurrency):
                t = threading.Thread(target=self._work, name=f"rpc-{self.name}-{i}", daemon=True)
                t.start()
                self._workers.append(t)
        self._io.start()
        self.node.offer("service", self.name)

    def _free(self) -> int:
        return self.config.concurrency - self._busy

    def _work(self) -> None:
        while True:
            inc = self._work_q.get()
            if inc is None:
                return
            if isinstance(inc, _Lead):  # the watchdog hands this thread the socket
                if not self._lead():
                    return  # closed
                continue
            if inc._expire_if_late():  # the caller stopped waiting while it was queued
                continue
            self._finish(inc, self._execute(inc))

    def _run_fast(self, inc: Incoming, alone: bytes | None) -> bool:
        """Run ``inc`` on the leading thread (the fast path); True once it is answered, False
        when it is not taken (this loop pass already ran handlers for the budget: the request
        goes to a worker).

        ``alone``: the routing id of a request that came in a message of its own: its reply
        leaves at once (before the reply cache is updated, when there is no outcome log to
        write first). None: an item of a BATCH, whose reply joins the outbox, so the replies
        of a BATCH leave batched at the end of the pass.

        Raises:
            _SteppedDown: the watchdog gave the socket to a worker while the handler ran:
                the reply went to the new leader, this thread no longer touches the socket.
        """
        if _perf() - self._pass_t0 >= self._budget:
            return False
        if alone is not None:
            if self._outbox:
                self._flush()  # replies made earlier in this pass do not wait for the handler
        elif time.monotonic() >= inc.deadline:  # as a worker does: not run after its deadline
            self._complete(inc, fr.Reply(inc.id, fr.Status.EXPIRED, 0, fr.Format.BYTES))
            return True
        mu = self._lead_mu
        with mu:
            if not self._watching:
                self._watching = True
                self._watch_wake.set()  # one wake-up after each idle half second
            self._inline_on = True
            self._inline_t0 = _perf()
            self._inline_n += 1
        self._stats.fast_path += 1
        rep, failed = self._call(inc)
        with mu:
            self._inline_on = False
            taken, self._taken = self._taken, False
        if taken:
            self._processing.observe(_perf() - self._last_s, failed)
            self._finish(inc, rep)  # as a worker would: the new leader sends it
            raise _SteppedDown
        self._complete(inc, rep, alone is not None, alone)
        self._processing.observe(_perf() - self._last_s, failed)  # after the reply left
        return True

    def _watch_loop(self) -> None:
        # the watchdog thread: sleeps on an Event while the service is idle; ticks every
        # budget while fast-path requests come (a sleep, a lock, a few fields: a few µs)
        wake = self._watch_wake
        while not self._closed:
            wake.wait()
            while not self._closed:
                time.sleep(self._budget)
                if not self._watch():
                    break

    def _watch(self) -> bool:
        """One tick: take the socket from a fast-path run older than the budget; False when
        no run began for half a second (the watchdog then sleeps until the next one)."""
        take = False
        with self._lead_mu:
            if self._inline_on:
                self._watch_idle = 0
                if (not self._taken and not self._closed
                        and _perf() - self._inline_t0 >= self._budget):
                    self._taken = take = True
            elif self._inline_n != self._watch_seen:
                self._watch_idle = 0
            else:
                self._watch_idle += 1
                if self._watch_idle * self._budget >= _WATCH_IDLE_S:
                    self._watching = False  # the next fast-path run wakes it again
                    self._watch_wake.clear()
            self._watch_seen = self._inline_n
            ticking = self._watching
        if take:
            self._stats.takeovers += 1
            self._work_q.put(_LEAD)  # an idle worker becomes the leader
        return ticking

    def _execute(self, inc: Incoming) -> fr.Reply:
        started = _perf()
        rep, failed = self._call(inc)
        self._processing.observe(started, failed)
        return rep

    def _call(self, inc: Incoming) -> tuple[fr.Reply, bool]:
        """(the reply, whether the handler raised); sets ``_last_s`` to how long it took."""
        assert self._handler is not None
        started = _perf()
        try:
            # The request's traceparent / correlationid headers become the handler's context:
            # built only if the handler (or a request or event it makes) reads it; with
            # OpenTelemetry spans recording, under a "serve" span.
            token = enter_request(inc.id, inc.headers, self.name)
            if token is None:
                with consuming(ctx=context_of_request(inc.id, inc.headers, self.name),
                               kind="serve"):
                    value = self._handler(inc)
            else:
                try:
                    value = self._handler(inc)
                finally:
                    leave(token)
            if type(value) is bytes:
                return _tnew(fr.Reply, (inc.id, _OK, 0, _BYTES, "", "", value)), False
            fmt, body = encode_body(value)
            return fr.Reply(inc.id, fr.Status.OK, 0, fmt, body=body), False
        except Exception as exc:  # the handler's failure is the caller's answer, typed
            return fr.Reply(inc.id, fr.Status.ERROR, 0, fr.Format.BYTES,
                            type(exc).__name__, str(exc)[:4096]), True
        finally:
            self._last_s = _perf() - started

    def _finish(self, inc: Incoming, rep: fr.Reply) -> None:
        # called on worker / user threads: hand over to the I/O thread. Always signal: an
        # "only when the deque was empty" check races with the I/O thread draining it. The
        # I/O thread drains the pipe and the deque at once, so a burst costs one wake-up.
        self._done.append((inc, rep))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wfd, b"\x01")
        except OSError:
            pass  # full (already awake) or closed: the reply is lost with the service

    def _send(self, rid: bytes, frames: list[bytes], direct: bool = False) -> None:
        # A compact REPLY to a caller that reads BATCHes waits in the outbox for the end of
        # this loop pass, so replies that are ready together leave in one message (not on
        # the fast path: the reply of the only request in flight leaves at once).
        if (not direct and len(frames) == 1 and frames[0][4] == 2
                and rid in self._batch_callers):
            box = self._outbox.get(rid)
            if box is None:
                self._outbox[rid] = [frames[0]]
            else:
                box.append(frames[0])
            self._outbox_n += 1
            if self._outbox_n >= fr.BATCH_MAX_ITEMS:
                self._flush()
            return
        if self._outbox and rid in self._outbox:  # what waits for it goes first: in order
            self._flush_one(rid, self._outbox.pop(rid))
        self._send_now(rid, frames)

    def _flush(self) -> None:
        """Send every reply waiting in the outbox (one BATCH per caller where several)."""
        box, self._outbox, self._outbox_n = self._outbox, {}, 0
        for rid, fs in box.items():
            self._flush_one(rid, fs)

    def _flush_one(self, rid: bytes, fs: list[bytes]) -> None:
        if len(fs) == 1:
            self._send_now(rid, fs)
            return
        chunk: list[bytes] = []
        size = 0
        for f in fs:
            if chunk and (len(chunk) >= fr.BATCH_MAX_ITEMS or size + len(f) > fr.BATCH_MAX_BYTES):
                self._emit(rid, chunk)
                chunk, size = [], 0
            chunk.append(f)
            size += len(f)
        self._emit(rid, chunk)

    def _emit(self, rid: bytes, chunk: list[bytes]) -> None:
        if len(chunk) == 1:
            self._send_now(rid, chunk)
            return
        frame = fr.batch_frame(fr.Command.REPLY, chunk)
        st = self._stats
        st.batches_sent += 1  # counted first: a reader that got it sees it counted
        self._sent = True
        try:
            send_frames(self._sock, [rid, frame])
            st.bytes_out += len(rid) + len(frame)
        except zmq.ZMQError as exc:
            st.batches_sent -= 1
            st.unroutable += len(chunk)
            log.debug("service %s: batch to %r not sent: %s", self.name, rid, exc)

    def _send_now(self, rid: bytes, frames: list[bytes]) -> None:
        if rid in self._split_callers:
            frames = fr.to_split(frames)  # a 1.0 caller reads only the split form
        self._sent = True
        try:
            send_frames(self._sock, [rid, *frames])
            # len() of frames held anyway: a few additions, no call beyond them
            st = self._stats
            st.bytes_out += len(rid)
            for f in frames:
                st.bytes_out += len(f)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client is gone; EAGAIN: its queue is full. Either way the client
            # retries (and gets the cached reply), so counting is all there is to do.
            self._stats.unroutable += 1
            log.debug("service %s: reply to %r not sent: %s", self.name, rid, exc)

    def _on_request(self, rid: bytes, req: fr.Request, caller: Any, alone: bool = False,
                    arrived: float | None = None) -> None:
        st = self._stats
        st.received += 1
        if req.service != self.name:
            self._send(rid, fr.encode_reply(fr.Reply(req.id, fr.Status.UNKNOWN_SERVICE,
                                                     self._free(), fr.Format.BYTES)))
            return
        key = (caller, req.id)
        # 16-byte blake2b of (format, body): about 0.5 µs for 100 B, 0.8 ms for 1 MiB
        digest = _blake2b(req.body, digest_size=16, person=_PERSON[req.format]).digest()
        lookup, cached = self._cache.begin(key, rid, digest)
        if lookup is Lookup.CACHED:
            assert cached is not None
            self._send(rid, cached)
            return
        if lookup is Lookup.ATTACHED:
            return
        if lookup is Lookup.CONFLICT:
            self._send(rid, fr.encode_reply(fr.Reply(
                req.id, fr.Status.ERROR, self._free(), fr.Format.BYTES, fr.ERR_ID_REUSED,
                f"request id {req.id} was already used by this caller with another payload")))
            return
        if req.ttl_ms <= 0:
            st.expired += 1
            frames = fr.encode_reply(fr.Reply(req.id, fr.Status.EXPIRED, self._free(),
                                              fr.Format.BYTES))
            self._cache.finish(key, frames, size=_size(frames))
            self._send(rid, frames)
            return
        if self._busy >= self.config.concurrency + self.config.max_queue:
            self._cache.finish(key, [], keep=False)
            st.busy += 1
            self._send(rid, fr.encode_reply(fr.Reply(req.id, fr.Status.BUSY, self._free(),
                                                     fr.Format.BYTES)))
            return
        try:
            payload = req.body if req.format is _BYTES else decode_body(req.format, req.body)
        except ProtocolError as exc:
            st.garbage += 1
            self._cache.finish(key, [], keep=False)
            self._send(rid, fr.encode_reply(fr.Reply(req.id, fr.Status.ERROR, self._free(),
                                                     fr.Format.BYTES, "ProtocolError", str(exc))))
            return
        inc = Incoming(req.id, req.service, payload, req.headers, req.attempt,
                       (time.monotonic() if arrived is None else arrived) + req.ttl_ms / 1000.0,
                       self._finish, _key=key)
        if self._olog is not None:  # RUNNING is written before the handler can start
            inc._digest = digest
            off = self._log_outcome(_RUNNING, key, digest, None)
            if off < 0:
                # Not recorded (disk full): running it anyway could run it again after a
                # restart. Refuse it unrun, as BUSY, so the caller tries another responder.
                self._cache.finish(key, [], keep=False)
                st.busy += 1
                self._send(rid, fr.encode_reply(fr.Reply(req.id, fr.Status.BUSY, self._free(),
                                                         fr.Format.BYTES)))
                return
            self._run_off[key] = (off, self._obytes, digest)
        self._busy += 1
        if self._iter_q is not None:
            self._iter_q.put(inc)
        elif self.config.inline:
            self._complete(inc, self._execute(inc))
        elif not (self._busy == 1 and self._fast and self._last_s < self._budget
                  and self._run_fast(inc, rid if alone else None)):
            self._work_q.put(inc)

    def _complete(self, inc: Incoming, rep: fr.Reply, direct: bool = False,
                  first: bytes | None = None) -> None:
        """Cache (and log) the reply of ``inc`` and send it to every waiter.

        ``first``: the routing id of the only waiter of a fast-path run (nothing was received
        while its handler ran): with no outcome log to write first, it is sent the reply
        before the cache is updated (the same thread updates it before it reads anything
        else, so no copy can miss it), which takes that work out of the round trip.
        """
        self._busy -= 1
        st = self._stats
        if rep.status == fr.Status.EXPIRED:
            st.expired += 1  # dropped before it ran: the caller's deadline had passed
        else:
            st.executed += 1
        if rep.status == fr.Status.ERROR:
            st.errors += 1
        frames = fr.reply_frames(rep, self._free())
        size = len(frames[0]) if len(frames) == 1 else _size(frames)
        if (first is not None and self._olog is None and not self.drop_replies
                and size <= self.config.cache_entry_max_bytes):
            st.replied += 1
            if (len(frames) == 1 and not self._outbox
                    and (not self._split_callers or first not in self._split_callers)):
                # what _send -> _send_now do for it, without their two calls: the outbox
                # is empty (flushed before the handler ran) and the caller reads the
                # compact form
                self._sent = True
                f = frames[0]
                try:
                    _zsend(self._sock, first, _MORE_NB)
                    _zsend(self._sock, f, _NB)
                    st.bytes_out += len(first) + size
                except zmq.ZMQError as exc:
                    st.unroutable += 1
                    log.debug("service %s: reply to %r not sent: %s", self.name, first, exc)
            else:
                self._send(first, frames, True)
            for rid in self._cache.finish(inc._key, frames, size=size):
                if rid != first:
                    st.replied += 1
                    self._send(rid, frames, direct)
            return
        if size > self.config.cache_entry_max_bytes:
            # keep a status, not the body: a retry is told it ran, and it never runs again
            st.not_cached += 1
            kept = fr.encode_reply(fr.Reply(
                inc.id, fr.Status.ERROR, 0, fr.Format.BYTES, fr.ERR_NOT_CACHED,
                f"reply too large to cache ({size} bytes): the request ran once"))
            waiters = self._cache.finish(inc._key, kept, size=_size(kept))
        else:
            kept = frames
            waiters = self._cache.finish(inc._key, frames, size=size)
        if self._olog is not None:  # the reply is written before it is sent
            self._run_off.pop(inc._key, None)
            self._log_outcome(_DONE, inc._key, inc._digest, kept)
            self._floor_due += 1
            if self._run_off:
                self._renew_running()
            if self._floor_due >= 256:
                self._move_floor()
        if self.drop_replies > 0:
            self.drop_replies -= 1
            st.dropped_by_hook += 1
            return
        for rid in waiters:
            st.replied += 1
            self._send(rid, frames, direct)

    def _caller(self, frame: zmq.Frame) -> str | None:
        # Security on: the caller is the node its CURVE key (User-Id) maps to, never the
        # routing id it chose; it needs "call" on this service. A refused caller gets nothing.
        try:
            uid = frame.get("User-Id")
        except zmq.ZMQError:
            uid = None
        peer = self.node.peer_by_key(uid if isinstance(uid, str) else None)
        if peer is not None and self.node.permits(peer, "call", self.name):
            return str(peer)
        self._stats.forbidden += 1
        return None

    def _on_received(self, msg: list[bytes], caller: Any = None) -> None:
        nb = 0
        for f in msg:
            nb += len(f)
        self._stats.bytes_in += nb
        # With security the caller is the node id CURVE proved: each node has its own id space.
        # Without it nothing proves who called (a routing id is per socket and chosen by the
        # sender), so all callers share one id space: the payload digest still refuses a reused
        # id with another payload, and retries from any socket or restarted client dedupe.
        self._on_frames(msg, caller)

    def _on_frames(self, msg: list[bytes], caller: Any) -> None:
        try:
            m, rev = fr.decode_after_id(msg)
        except ProtocolError:
            self._stats.garbage += 1
            return
        # Negotiation (docs/protocol.md, "Versions and negotiation"): answer in the form the
        # caller last used, so a 1.0 caller (split form only) is served too; batch replies
        # only to a caller whose latest message showed a rev that reads them.
        rid = msg[0]
        if len(msg) > 2:
            if len(self._split_callers) < 65536:
                self._split_callers.add(rid)
            self._batch_callers.discard(rid)
        else:
            if self._split_callers:
                self._split_callers.discard(rid)
            if rev >= fr.BATCH_REVISION:
                if rid not in self._batch_callers and len(self._batch_callers) < 65536:
                    self._batch_callers.add(rid)
            elif self._batch_callers:
                self._batch_callers.discard(rid)
        if type(m) is fr.Request:
            self._on_request(rid, m, caller, True)
        elif isinstance(m, fr.Batch):
            # Each item is a request of its own (cache, ttl, budgets, at-most-once); a
            # malformed item is counted and dropped alone.
            st = self._stats
            st.batches_received += 1
            st.garbage += m.malformed
            if m.command is fr.Command.REQUEST:
                # The items wait in _inbound while one runs here: if the watchdog hands the
                # socket to another thread during a fast-path run, that thread finds the rest
                # of the BATCH there and handles it first (this one, stuck in the handler,
                # never takes another).
                now = time.monotonic()  # each item's deadline counts from the BATCH's arrival
                self._inbound.extend((rid, x, caller, now) for x in m.items
                                     if isinstance(x, fr.Request))
                self._drain_inbound()
            else:
                st.garbage += len(m.items)  # REPLYs sent to a responder
        elif isinstance(m, fr.Ping):
            self._stats.pings += 1
            state = fr.TaskState.UNKNOWN
            if m.request_id:
                found = self._cache.state((caller, m.request_id))
                if found is Lookup.ATTACHED:
                    state = fr.TaskState.RUNNING
                elif found is Lookup.CACHED:
                    state = fr.TaskState.DONE
            self._send(msg[0], fr.encode_pong(fr.Pong(m.nonce, self._free(), m.request_id,
                                                      state)))
        else:  # a REPLY or PONG sent to a responder makes no sense: count, ignore
            self._stats.garbage += 1

    def _drain_inbound(self) -> None:
        """Handle the BATCH items waiting in ``_inbound``, in order (leading thread only).

        Raises:
            _SteppedDown: this thread was taken over while one of them ran (see
                :meth:`_run_fast`); the rest stay for the new leader.
        """
        inbound = self._inbound
        while inbound:
            rid, req, caller, arrived = inbound.popleft()
            self._on_request(rid, req, caller, False, arrived)

    def _run(self) -> None:
        # the first leader; after a takeover (fast path) it serves as a worker
        if self._lead():
            self._work()

    def _lead(self) -> bool:
        """Own the socket until the service closes (False) or the watchdog hands it to
        another thread during a fast-path run (True: this thread then serves as a worker)."""
        sock = self._sock
        rfd = self._rfd
        # One poll(2) on the socket's ZMQ_FD and the pipe: zmq_poll would make two passes
        # (a non-blocking one first) and read ZMQ_EVENTS after each. ZMQ_FD only says that
        # something may have changed, so ZMQ_EVENTS (readable) is read after it fires and is
        # the last socket operation before each blocking poll (a send may take the signal).
        poller = select.poll()
        poller.register(sock.getsockopt(zmq.FD), select.POLLIN)
        poller.register(rfd, select.POLLIN)
        wait = poller.poll
        tick_ms = int(_TICK_S * 1000)
        # one request at most this big in all its frames (MAXMSGSIZE bounds each frame only)
        limit = self.node.config.max_message_bytes + (64 << 10)
        spin = self.config.spin_us / 1e6
        inline = self.config.inline
        clock = time.perf_counter
        done = self._done
        checked = False  # readable() was False and no send came after it
        try:
            while not self._closed:
                ready = False if checked and not self._sent else readable(sock)
                checked = False
                idle = False
                if not ready and not done and not self._inbound:
                    if spin and (inline or self._busy == 0):
                        end = clock() + spin
                        while True:  # latency mode: a bounded busy-poll before sleeping
                            if readable(sock):
                                ready = True
                                break
                            if done or self._closed or clock() >= end:
                                break
                            _yield()  # let this core's other threads (libzmq's I/O) run
                    if not ready and not done and not self._inbound:
                        self._sent = False
                        got = wait(tick_ms)
                        idle = not got
                        for fd, _ev in got:
                            if fd == rfd:
                                try:
                                    os.read(rfd, 4096)
                                except OSError:  # BlockingIOError: drained already
                                    pass
                        ready = bool(got)  # a receive finds out (NOBLOCK: None if nothing)
                self._pass_t0 = _perf()
                if self._inbound:  # left by a leader taken over in the middle of a BATCH
                    try:
                        self._drain_inbound()
                    except _SteppedDown:
                        return True
                if ready:
                    # After each message, ZMQ_EVENTS says whether another is waiting:
                    # cheaper than the EAGAIN exception that would end the batch otherwise.
                    for _ in range(_RECV_BATCH):
                        try:
                            if self._secure:
                                zmsg = recv_bounded(sock, limit, zmq.NOBLOCK, copy=False)
                                if zmsg is None:
                                    self._stats.garbage += 1  # over the message bound
                                    continue
                                caller = self._caller(zmsg[0])
                                if caller is not None:
                                    self._on_received([f.bytes for f in zmsg], caller)
                            else:
                                got_msg = recv_frames(sock, limit)
                                if got_msg is None:
                                    break
                                if not got_msg:
                                    self._stats.garbage += 1  # over the message bound
                                    continue
                                nb = 0
                                for f in got_msg:
                                    nb += len(f)
                                self._stats.bytes_in += nb
                                self._on_frames(got_msg, None)
                        except zmq.Again:
                            break
                        except _SteppedDown:
                            return True
                        self._sent = False
                        if not readable(sock):
                            checked = True
                            break
                while done:
                    inc, rep = done.popleft()
                    self._complete(inc, rep)
                if self._outbox:
                    self._flush()
                if idle:
                    self._cache.expire()
                    if self._olog is not None and self._floor_due:
                        self._move_floor()
        except Exception:
            log.exception("service %s: I/O thread failed", self.name)
        if self._outbox:  # replies made in the last pass still leave (the socket lingers 0)
            try:
                self._flush()
            except Exception:
                pass
        sock.close(0)
        return False


def _size(frames: list[bytes]) -> int:
    n = 0
    for f in frames:
        n += len(f)
    return n
