"""The reactor: one background I/O thread that owns a node's sockets.

pyzmq sockets are not thread-safe, so every socket a node uses lives on exactly one thread, the
reactor's. Other threads talk to it through :meth:`Reactor.call_soon` (a locked deque plus one
wake-up byte on an os pipe), which the loop drains in batches: a burst of calls from user threads
costs one wake-up, not one per call. Timers live in a heap on the same thread, so timer callbacks,
socket callbacks and queued calls never run concurrently and need no locks among themselves.

A callback that raises is logged with its context and counted in :attr:`Reactor.errors`; it
never stops the loop.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import zmq

from mesh.budget import LogLimiter
from mesh.errors import ClosedError, MeshTimeout

__all__ = ["Reactor", "Timer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Readers are either zmq sockets or raw file descriptors.
Readable = Any

#: How many queued calls one loop turn runs before it polls sockets again (fairness).
_CALL_BATCH = 4096


class Timer:
    """A scheduled call; :meth:`cancel` is thread-safe and idempotent."""

    __slots__ = ("_args", "_fn", "cancelled", "interval", "when")

    def __init__(
        self, when: float, interval: float | None, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self.when = when
        self.interval = interval
        self._fn = fn
        self._args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the timer; a run already in progress is not interrupted.

        Setting a flag is atomic in CPython, so this is safe from any thread; the reactor skips
        (and drops) cancelled entries when they come due.
        """
        self.cancelled = True


class Reactor:
    """An I/O loop on its own thread: sockets, timers and calls from other threads.

    Args:
        context: the ZeroMQ context of the sockets that will be registered.
        name: the thread name (shows in ``threading.enumerate()`` and in logs).
    """

    def __init__(self, context: zmq.Context[Any], name: str = "zeromesh-reactor") -> None:
        self.context = context
        self.name = name
        self._lock = threading.Lock()
        self._calls: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._readers: dict[Readable, Callable[[Any], object]] = {}
        self._owned: list[zmq.Socket[Any]] = []
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False  # no more calls accepted
        #: callbacks that raised (logged through a limiter, per callback, and survived: a
        #: reader raising on every message a peer sends must not flood the log)
        self.errors = 0
        self._log = LogLimiter(log)
        #: loop turns, calls and timer runs (for stats and tests)
        self.turns = 0
        self.calls_run = 0

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread.

        Raises:
            ClosedError: the reactor was already stopped.
        """
        if self._closed:
            raise ClosedError(f"reactor {self.name} is stopped")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop: run the calls already queued, close owned sockets, join the thread.

        Idempotent. Calls queued after ``stop`` raise :class:`ClosedError`.

        Raises:
            MeshTimeout: the thread did not finish within ``timeout`` seconds.
        """
        with self._lock:
            already = self._closed
            self._closed = True
            self._stopping = True
            if not already and self._thread is not None:
                self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise MeshTimeout(f"reactor {self.name} did not stop within {timeout}s")
        if thread is None and not already:
            # Never started: still honour the contract (run queued calls, close sockets).
            self._finish()
            self._close_pipe()

    def _close_pipe(self) -> None:
        # Called exactly once, by the loop thread on exit (or by stop() if never started), so
        # no fd is closed twice (a reused fd number must never get our wake-up byte).
        with self._lock:
            os.close(self._wake_r)
            os.close(self._wake_w)

    @property
    def running(self) -> bool:
        """True while the loop thread is alive and not stopping."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def in_reactor_thread(self) -> bool:
        """True when called from the reactor's own thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    # --- calls from any thread ----------------------------------------------------------------

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the reactor thread, in call order. Thread-safe.

        Raises:
            ClosedError: the reactor is stopped.
        """
        with self._lock:
            if self._closed:
                raise ClosedError(f"reactor {self.name} is stopped")
            self._calls.append((fn, args))
            if self._wake_pending or self.in_reactor_thread():
                return
            self._wake_pending = True
            # Written under the lock so the loop cannot close the pipe in between.
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\x00")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake-up is already pending) or closed during stop

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: Any) -> Timer:
        """Run ``fn(*args)`` once on the reactor thread after ``delay_s`` seconds. Thread-safe."""
        timer = Timer(time.monotonic() + max(0.0, delay_s), None, fn, args)
        self._schedule(timer)
        return timer

    def call_every(self, interval_s: float, fn: Callable[..., object], *args: Any) -> Timer:
        """Run ``fn(*args)`` every ``interval_s`` seconds (first run after one interval).

        Raises:
            ConfigError: ``interval_s`` is not positive.
        """
        if interval_s <= 0:
            from mesh.errors import ConfigError

            raise ConfigError(f"interval must be positive, got {interval_s}")
        timer = Timer(time.monotonic() + interval_s, interval_s, fn, args)
        self._schedule(timer)
        return timer

    def _schedule(self, timer: Timer) -> None:
        if self.in_reactor_thread():
            heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        else:
            self.call_soon(self._push_timer, timer)

    def _push_timer(self, timer: Timer) -> None:
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))

    def run_sync(self, fn: Callable[..., T], *args: Any, timeout: float = 5.0) -> T:
        """Run ``fn(*args)`` on the reactor thread and return its result.

        Called from the reactor thread itself, ``fn`` runs inline.

        Raises:
            ClosedError: the reactor is stopped.
            MeshTimeout: no result within ``timeout`` seconds.
            Exception: whatever ``fn`` raised.
        """
        if self.in_reactor_thread():
            return fn(*args)
        fut: Future[T] = Future()

        def runner() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self.call_soon(runner)
        if self._thread is None:
            raise ClosedError(f"reactor {self.name} is not started")
        try:
            return fut.result(timeout)
        except FutureTimeout as exc:
            fut.cancel()
            raise MeshTimeout(f"{getattr(fn, '__name__', fn)!s} took over {timeout}s") from exc

    # --- readers (reactor thread only) --------------------------------------------------------

    def _check_thread(self, what: str) -> None:
        if not self.in_reactor_thread():
            raise RuntimeError(
                f"Reactor.{what} must run on the reactor thread {self.name!r}; "
                "use call_soon/run_sync to get there"
            )

    def add_reader(
        self, sock: Readable, callback: Callable[[Any], object], *, own: bool = False
    ) -> None:
        """Call ``callback(sock)`` whenever ``sock`` (a zmq socket or an fd) is readable.

        The callback should drain the socket with ``NOBLOCK`` (bounded per call). With
        ``own=True`` the reactor closes the socket when it stops.

        Raises:
            RuntimeError: called from another thread than the reactor's.
        """
        self._check_thread("add_reader")
        self._readers[sock] = callback
        self._poller.register(sock, zmq.POLLIN)
        if own and isinstance(sock, zmq.Socket):
            self._owned.append(sock)

    def remove_reader(self, sock: Readable) -> None:
        """Stop watching ``sock`` (no-op when not watched).

        Raises:
            RuntimeError: called from another thread than the reactor's.
        """
        self._check_thread("remove_reader")
        if self._readers.pop(sock, None) is not None:
            self._poller.unregister(sock)
        if isinstance(sock, zmq.Socket) and sock in self._owned:
            self._owned.remove(sock)

    # --- the loop -----------------------------------------------------------------------------

    def _invoke(self, fn: Callable[..., object], args: tuple[Any, ...], what: str) -> None:
        try:
            fn(*args)
        except Exception:
            self.errors += 1
            self._log.log(logging.ERROR, getattr(fn, "__qualname__", what),
                          "reactor %s: %s %r raised", self.name, what, fn, exc_info=True)

    def _run_calls(self) -> None:
        for _ in range(_CALL_BATCH):
            with self._lock:
                if not self._calls:
                    self._wake_pending = False
                    return
                # Swap the whole batch out under one lock acquisition.
                batch = self._calls
                self._calls = collections.deque()
            for fn, args in batch:
                self.calls_run += 1
                self._invoke(fn, args, "call")

    def _run_timers(self) -> float:
        """Run due timers; return the poll timeout in ms until the next one (-1: none)."""
        now = time.monotonic()
        timers = self._timers
        while timers:
            when, _, timer = timers[0]
            if timer.cancelled:
                heapq.heappop(timers)
                continue
            if when > now:
                return max(0.0, (when - now) * 1000.0)
            heapq.heappop(timers)
            if timer.interval is not None:
                # Re-arm from the scheduled time (no drift), but never in the past (no burst).
                timer.when = max(when + timer.interval, now)
                heapq.heappush(timers, (timer.when, next(self._seq), timer))
            self._invoke(timer._fn, timer._args, "timer")
            now = time.monotonic()
        return -1

    def _stop_requested(self) -> bool:
        # A method, not an inline attribute test: the flag changes under callbacks' feet.
        return self._stopping

    def _run(self) -> None:
        log.debug("reactor %s started", self.name)
        try:
            while not self._stopping:
                self.turns += 1
                self._run_calls()
                timeout = self._run_timers()
                with self._lock:
                    if self._calls:
                        timeout = 0
                if self._stop_requested():
                    break
                try:
                    events = self._poller.poll(None if timeout < 0 else int(timeout + 0.999))
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                for sock, _ in events:
                    if sock == self._wake_r:
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    callback = self._readers.get(sock)
                    if callback is not None:
                        self._invoke(callback, (sock,), "reader")
        finally:
            self._finish()
            self._close_pipe()
            log.debug("reactor %s stopped", self.name)

    def _finish(self) -> None:
        # Calls queued before stop() still run (e.g. a node's final BYE), then owned sockets close.
        self._closed = True
        with self._lock:
            batch, self._calls = self._calls, collections.deque()
        for fn, args in batch:
            self._invoke(fn, args, "call")
        for sock in self._owned:
            if not sock.closed:
                sock.close()
        self._owned.clear()
        for sock in list(self._readers):
            try:
                self._poller.unregister(sock)
            except KeyError:
                pass
        self._readers.clear()
        self._timers.clear()
