"""NATS JetStream broker client of the bridge, on nats-py (the ``zeromesh[nats]`` extra).

nats-py is asyncio-only, so the client runs its own event loop in a dedicated thread; the
bridge hands it one batch at a time (one thread hop per batch, never per message).

Outbound: every message goes out with ``Nats-Msg-Id`` = the event id, so JetStream's duplicate
window drops the re-sends of a retried batch; a batch's publishes are in flight together and
their PubAcks are awaited before the bridge commits. Inbound: one durable pull consumer per
inbound subject filter, explicit acks sent only after the handler appended the event to the
mesh log; what is not acked within ``ack_wait`` is redelivered by the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from mesh.errors import ConfigError
from patterns.bridge.base import InboundHandler
from patterns.bridge.config import NatsConfig
from patterns.bridge.mapping import Message

__all__ = ["NatsClient", "import_nats"]

_log = logging.getLogger("zeromesh.bridge.nats")


def import_nats() -> Any:
    """Import nats-py or raise a ConfigError naming the extra.

    Raises:
        ConfigError: nats-py is missing.
    """
    try:
        import nats
        import nats.js.api
        import nats.js.errors
    except ImportError as exc:
        raise ConfigError("the NATS bridge needs nats-py: pip install 'zeromesh[nats]'"
                          ) from exc
    return nats


class NatsClient:
    """The bridge's NATS JetStream connection (see the module docstring).

    Args:
        config: servers, credentials, TLS, stream and consumer settings.
        consumer: the durable consumer name prefix.
        stream_subjects: subjects of the stream to create when it is missing.
        fetch_batch: messages per pull request.

    Raises:
        ConfigError: nats-py missing, or bad TLS / creds files.
    """

    def __init__(self, config: NatsConfig, consumer: str, stream_subjects: Sequence[str],
                 *, fetch_batch: int = 256) -> None:
        self._nats = import_nats()
        self.config = config
        self.consumer = config.consumer or consumer
        self.stream_subjects = list(stream_subjects)
        self.fetch_batch = fetch_batch
        self._ssl = config.tls.ssl_context() if config.tls is not None else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="zeromesh-bridge-nats",
                                        daemon=True)
        self._nc: Any = None
        self._js: Any = None
        self._ready = threading.Event()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._connector: concurrent.futures.Future[None] | None = None

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # -- loop thread ------------------------------------------------------------------------

    async def _connect_forever(self, inbound: Sequence[str], handler: InboundHandler | None
                               ) -> None:
        nats = self._nats
        c = self.config
        kw: dict[str, Any] = {
            "servers": list(c.servers), "allow_reconnect": True,
            "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "connect_timeout": 2,
            "disconnected_cb": self._on_disconnected, "reconnected_cb": self._on_reconnected,
            "error_cb": self._on_error,
        }
        if c.user is not None:
            kw["user"], kw["password"] = c.user, c.password
        if c.token is not None:
            kw["token"] = c.token
        if c.creds_file is not None:
            kw["user_credentials"] = c.creds_file
        if self._ssl is not None:
            kw["tls"] = self._ssl
        while not self._closed:
            try:
                self._nc = await nats.connect(**kw)
                break
            except Exception as exc:  # the first connect is not retried by nats-py itself
                _log.info("nats: not reachable yet (%s); retrying", exc)
                await asyncio.sleep(0.5)
        if self._closed:
            return
        self._js = self._nc.jetstream()
        await self._ensure_stream()
        self._ready.set()
        for i, subject in enumerate(inbound):
            if handler is not None:
                self._tasks.append(asyncio.ensure_future(
                    self._pull(f"{self.consumer}-{i}", subject, handler)))

    async def _ensure_stream(self) -> None:
        from nats.js.api import StreamConfig
        from nats.js.errors import NotFoundError

        c = self.config
        while not self._closed:
            try:
                try:
                    await self._js.stream_info(c.stream)
                except NotFoundError:
                    if not c.create_stream:
                        raise ConfigError(f"JetStream stream {c.stream!r} does not exist"
                                          ) from None
                    await self._js.add_stream(StreamConfig(
                        name=c.stream, subjects=self.stream_subjects,
                        duplicate_window=c.duplicate_window_s))
                return
            except ConfigError:
                raise
            except Exception as exc:
                _log.info("nats: stream check failed (%s); retrying", exc)
                await asyncio.sleep(0.5)

    async def _on_disconnected(self) -> None:
        self._ready.clear()

    async def _on_reconnected(self) -> None:
        self._ready.set()

    async def _on_error(self, exc: Exception) -> None:
        _log.debug("nats: %s", exc)

    async def _pull(self, durable: str, subject: str, handler: InboundHandler) -> None:
        from nats.js.api import ConsumerConfig

        psub: Any = None
        while not self._closed:
            try:
                if psub is None:
                    psub = await self._js.pull_subscribe(
                        subject, durable=durable, stream=self.config.stream,
                        config=ConsumerConfig(ack_wait=self.config.ack_wait_s,
                                              max_deliver=-1))
                try:
                    msgs = await psub.fetch(self.fetch_batch, timeout=1.0)
                except TimeoutError:
                    continue
                for msg in msgs:
                    await self._deliver(msg, handler)
                await self._nc.flush(timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.closed:
                    return
                _log.info("nats: pull on %s failed (%s); retrying", subject, exc)
                await asyncio.sleep(0.5)

    async def _deliver(self, msg: Any, handler: InboundHandler) -> None:
        headers = dict(msg.headers or {})
        ctype = None
        for k, v in headers.items():
            if k.lower() == "content-type":
                ctype = v
        m = Message(msg.subject, bytes(msg.data), tuple(headers.items()), ctype)
        acked: list[bool] = []
        handler(m, lambda: acked.append(True))
        if acked:
            await msg.ack()

    async def _publish(self, msgs: Sequence[Message], timeout: float) -> int:
        js = self._js
        futs = [js.publish(m.topic, m.payload, timeout=timeout, headers=dict(m.attrs))
                for m in msgs]
        results = await asyncio.gather(*futs, return_exceptions=True)
        done = 0
        for r in results:
            if isinstance(r, BaseException):
                _log.info("nats: publish not acknowledged: %r", r)
                break
            done += 1
        return done

    async def _shutdown(self) -> None:
        if self._connector is not None:
            self._connector.cancel()  # still retrying an unreachable server
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self._nc is not None:
            try:
                await self._nc.close()
            except Exception as exc:
                _log.debug("nats: close: %s", exc)

    # -- owner thread -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def start(self, inbound: Sequence[str], handler: InboundHandler | None) -> None:
        """Start the loop thread; connect (retrying) and start the inbound consumers."""
        self._thread.start()
        self._connector = asyncio.run_coroutine_threadsafe(
            self._connect_forever(inbound, handler), self._loop)

    def connected(self) -> bool:
        """True while connected (and the stream is known to exist)."""
        return self._ready.is_set() and self._nc is not None and self._nc.is_connected

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the connection."""
        return self._ready.wait(timeout) and self.connected()

    def publish_batch(self, msgs: Sequence[Message], timeout: float) -> int:
        """Publish to JetStream and wait for the PubAcks; returns the acked prefix length."""
        if not self._ready.wait(min(timeout, 1.0)) or not self.connected():
            return 0
        fut = asyncio.run_coroutine_threadsafe(self._publish(msgs, timeout), self._loop)
        try:
            return fut.result(timeout + 5)
        except Exception as exc:
            _log.info("nats: batch failed: %r", exc)
            return 0

    def run(self, fn: Callable[[Any], Any], timeout: float = 10.0) -> Any:
        """Run ``await fn(js)`` on the loop thread (tests, tools); returns its result."""
        async def call() -> Any:
            return await fn(self._js)
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def close(self) -> None:
        """Stop the consumers, close the connection and the loop thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            except Exception as exc:
                _log.debug("nats: shutdown: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
