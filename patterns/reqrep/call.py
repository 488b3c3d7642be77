"""One request's life as a pure state machine (events and a clock in, actions out).

The sync client, the asyncio client and the durable client all drive the same machine, so
retries, failover and heartbeats behave identically and are unit-tested without sockets.

Life of a call: pick a responder (:class:`~patterns.reqrep.balancer.Balancer`), SEND; while
waiting, PING that responder every ``heartbeat_s`` with the request id; its PONG says whether
the request is RUNNING (keep waiting: a slow handler is never run twice), DONE (the reply was
lost: resend, the responder answers from its reply cache) or UNKNOWN (the request was lost:
resend).

Silence is not death. A responder that does not answer for ``heartbeat_s * liveness`` is marked
silent, so *new* calls prefer others, but the call it holds stays with it and keeps asking: a
handler holding the GIL, a SIGSTOPped process or a short partition delays the reply, it does not
run the request a second time elsewhere. Once sent, a request goes to no other responder unless
this one refused it (BUSY, no such service) or the send itself failed. If the responder dies
holding it (the node left the mesh: ``gone_s`` without a word from it; or its connection is
gone: a PING that cannot be routed because the process died and the kernel closed its sockets),
the request may have run there: the call fails with :class:`OutcomeUnknown`, never a silent
second run, unless ``retry_on_death`` is set for an idempotent handler, which fails over to
another responder (Paranoid Pirate + Freelance). BUSY replies and send failures back off
with full jitter (Lazy Pirate). At the deadline the call fails with :class:`NoResponders` if it
never reached a responder, else :class:`RequestTimeout`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from mesh.errors import ConfigError, MeshError
from patterns.reqrep.balancer import Balancer, ResponderView
from patterns.reqrep.errors import NoResponders, RemoteError, RequestTimeout, ServiceBusy
from patterns.reqrep.frames import ERR_OUTCOME_UNKNOWN, Pong, Reply, Status, TaskState
from patterns.reqrep.retry import Backoff

__all__ = ["Call", "CallConfig", "Ping", "Send"]


@dataclass(frozen=True)
class CallConfig:
    """Timing of calls.

    Attributes:
        heartbeat_s: interval of PINGs to the responder holding a request.
        liveness: missed heartbeats after which that responder is marked silent (new calls
            avoid it; the calls it holds stay with it).
        backoff: waits after BUSY replies and failed sends.
        poll_s: how often to look again for a responder when none is known.
        retry_on_death: when the responder holding a request dies, send it to another one
            (for idempotent handlers) instead of failing with OutcomeUnknown.
    """

    heartbeat_s: float = 0.2
    liveness: int = 3
    backoff: Backoff = field(default_factory=Backoff)
    poll_s: float = 0.05
    retry_on_death: bool = False

    def __post_init__(self) -> None:
        if not self.heartbeat_s > 0 or self.liveness < 1 or not self.poll_s > 0:
            raise ConfigError("heartbeat_s and poll_s must be > 0 and liveness >= 1")


# NamedTuples, not frozen dataclasses: one is built per send, and a frozen dataclass sets
# each field through object.__setattr__.
class Send(NamedTuple):
    """Action: send (or resend) the request to ``responder``."""

    responder: str
    attempt: int


class Ping(NamedTuple):
    """Action: ask ``responder`` about the request."""

    responder: str


class Call:
    """State of one request.

    Args:
        request_id: the id (kept across every retry: that is what makes dedup work).
        service: the service name.
        timeout: total seconds the caller allows.
        now: the current clock value.
        config: timing.
        rand: random source for jitter.
    """

    # one Call per request: slots make it cheaper to build and its fields faster to read
    __slots__ = ("_busy_from", "_held", "_last_heard", "_marked_silent", "_next_ping",
                 "_next_send", "_rand", "_retries", "attempts", "config", "counted",
                 "deadline", "done", "error", "ever_sent", "failovers", "id", "prefer",
                 "reply", "responder", "running_on", "service", "started", "timeout", "tried")

    def __init__(self, request_id: str, service: str, timeout: float, now: float,
                 config: CallConfig, rand: Callable[[], float] = random.random) -> None:
        self.id = request_id
        self.service = service
        self.timeout = timeout
        self.started = now
        self.deadline = now + timeout
        self.config = config
        self._rand = rand
        self.responder: str | None = None
        self.attempts = 0
        self.failovers = 0
        self.tried: set[str] = set()
        self.ever_sent = False
        self.running_on: str | None = None  # the responder that said RUNNING for this send
        self.prefer: str | None = None  # send first to this one (it held this id before)
        self._marked_silent = False
        self.counted = (0, 0)  # (retries, failovers) already added to the client's counters
        self._busy_from: set[str] = set()
        self._next_send = now
        self._next_ping = 0.0
        self._last_heard = now
        self._retries = 0
        self.done = False
        self.reply: Reply | None = None
        self.error: MeshError | None = None
        # the responder (and its balancer view) whose in-flight count this call holds
        self._held: tuple[str, ResponderView | None] | None = None

    # --- balancer accounting ------------------------------------------------------------------

    def release(self, balancer: Balancer) -> None:
        """Give back the in-flight slot this call holds on its responder, if any (idempotent).

        Called on every end of a call: reply, timeout, error, failover, cancel, close. The
        clients call it in a ``finally`` so a cancelled or closed call never leaks a slot.
        """
        held, self._held = self._held, None
        if held is not None:
            balancer.finished(*held)

    def extend(self, now: float, timeout: float, balancer: Balancer) -> None:
        """Reopen a call that timed out for another round of ``timeout`` seconds (durable
        requests), keeping its id, its attempts and the responder holding it while that
        responder is still present (silent or not): a request it holds is not sent to another
        responder just because a round ended."""
        self.done = False
        self.error = None
        self.reply = None
        self.timeout = timeout
        self.deadline = now + timeout
        self._busy_from.clear()
        r = self.responder
        if r is not None and r not in balancer.responders:
            if self._lost(r, now, balancer):  # it left the mesh while we were away
                return
            r = None
        if r is not None:
            self._last_heard = now
            self._next_ping = now  # ask it at once whether it still holds the request
            self._held = (r, balancer.started(r))
        else:
            self._next_send = now

    # --- events -------------------------------------------------------------------------------

    def on_reply(self, responder: str, reply: Reply, now: float, balancer: Balancer) -> None:
        """A REPLY for this id arrived from ``responder``."""
        balancer.heard(responder, reply.free)
        if self.done:
            return
        if reply.status in (Status.OK, Status.ERROR):
            self.release(balancer)  # (whichever responder answered: the call is over)
            self.done = True
            self.reply = reply
            if reply.status == Status.ERROR:
                self.error = RemoteError(reply.error_type, reply.error_message,
                                         service=self.service, responder=responder)
            return
        if responder != self.responder:
            return  # a refusal from a responder we already left: ignore
        self.release(balancer)
        self.responder = None
        if reply.status == Status.EXPIRED:
            self._finish_timeout()
        elif reply.status == Status.BUSY:
            self._busy_from.add(responder)
            self._back_off(now)
        else:  # UNKNOWN_SERVICE: it no longer offers the name; try the others
            self.tried.add(responder)
            self._next_send = now

    def on_pong(self, responder: str, pong: Pong, now: float, balancer: Balancer) -> Send | None:
        """A PONG arrived; returns a resend when the responder lost the request or its reply."""
        balancer.heard(responder, pong.free)
        if self.done or responder != self.responder or pong.request_id != self.id:
            return None
        self._last_heard = now
        self._marked_silent = False
        if pong.state == TaskState.RUNNING:
            self.running_on = responder
            return None
        # UNKNOWN: the request was lost on the way; DONE: the reply was. Either way resend the
        # same id: the responder runs it (UNKNOWN) or answers from its cache (DONE).
        self.attempts += 1
        self._next_ping = now + self.config.heartbeat_s
        return Send(responder, self.attempts - 1)

    def on_send_failed(self, responder: str, now: float, balancer: Balancer) -> None:
        """The socket could not route to ``responder`` (not connected yet, or gone)."""
        if responder == self.responder:
            self.release(balancer)
            self.responder = None
            self._back_off(now)

    def on_lost(self, responder: str, now: float, balancer: Balancer) -> None:
        """Evidence that ``responder`` is dead: a PING to it could not be routed (its
        connection is gone). See the module doc for what the call does."""
        if not self.done and responder == self.responder:
            self._lost(responder, now, balancer)

    # --- timer --------------------------------------------------------------------------------

    def step(self, now: float, balancer: Balancer) -> list[Send | Ping]:
        """Advance to ``now``; return what to send. Sets ``done``/``error`` at the deadline."""
        if self.done:
            return []
        if now >= self.deadline:
            self._finish_timeout()
            self.release(balancer)
            return []
        r = self.responder
        if r is not None and r not in balancer.responders:
            if self._lost(r, now, balancer):  # presence LEFT: the node is gone from the mesh
                return []
            r = None
        if r is not None:
            if not self._marked_silent and \
                    now - self._last_heard >= self.config.heartbeat_s * self.config.liveness:
                # Silent, not dead: new calls avoid it; this one keeps asking it.
                balancer.mark_silent(r)
                self._marked_silent = True
            if now >= self._next_ping:
                self._next_ping = now + self.config.heartbeat_s
                return [Ping(r)]
            return []
        if now < self._next_send:
            return []
        chosen, self.prefer = self.prefer, None
        if chosen not in balancer.responders:
            chosen = balancer.choose(self.tried)
        if chosen is None:
            self._next_send = now + self.config.poll_s
            return []
        self.responder = chosen
        self.running_on = None
        self._marked_silent = False
        self.tried.add(chosen)
        self.ever_sent = True
        self.attempts += 1
        self._last_heard = now
        self._next_ping = now + self.config.heartbeat_s
        if self._held is not None:
            self.release(balancer)
        self._held = (chosen, balancer.started(chosen))
        return [Send(chosen, self.attempts - 1)]

    def wake_at(self) -> float:
        """The next clock value at which :meth:`step` has something to do."""
        if self.done:
            return float("inf")
        if self.responder is None:
            return min(self.deadline, self._next_send)
        return min(self.deadline, self._next_ping)

    # --- internals ----------------------------------------------------------------------------

    def _lost(self, responder: str, now: float, balancer: Balancer) -> bool:
        # The responder holding the call is dead (left the mesh, or its connection is gone).
        # True when that ends the call.
        self.release(balancer)
        self.responder = None
        if not self.config.retry_on_death:
            # It may have run (or be running) the handler: say so, never run it elsewhere.
            what = "was running on" if self.running_on == responder else "was sent to"
            self.done = True
            self.error = RemoteError(
                ERR_OUTCOME_UNKNOWN, f"request {self.id} {what} {responder}, which died before "
                "replying (it left the mesh or lost its connection); it may or may not have "
                "taken effect", service=self.service, responder=responder)
            return True
        self.failovers += 1
        self._next_send = now
        return False

    def _back_off(self, now: float) -> None:
        self._next_send = now + self.config.backoff.delay(self._retries, self._rand)
        self._retries += 1

    def _finish_timeout(self) -> None:
        self.done = True
        if not self.ever_sent:
            self.error = NoResponders(self.service, self.timeout)
        elif self._busy_from and self.responder is None:
            self.error = ServiceBusy("ServiceBusy", f"every responder of {self.service!r} "
                                     "was busy until the deadline", service=self.service)
        else:
            self.error = RequestTimeout(self.service, self.id, self.timeout, self.attempts)
