"""Peers: what a node knows about the other nodes of its mesh.

The data types here are the contract between discovery (mDNS, static peers, gossip), the node's
presence tracking, and the patterns that ask "who offers stream X". Presence (joined → evasive
→ gone) comes from the mesh's own heartbeats on the control channel, never from mDNS expiry.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

#: Major version of the mesh wire protocol this build speaks (control channel, TXT record).
PROTOCOL_VERSION = 1

#: Kinds of things a node offers to the mesh.
OFFER_KINDS = ("stream", "queue", "service")


class PeerState(enum.Enum):
    """Liveness of a peer as seen by this node."""

    JOINED = "joined"  #: heard from within the evasive interval
    EVASIVE = "evasive"  #: quiet for longer than the evasive interval; being pinged
    GONE = "gone"  #: quiet past the gone interval, or said goodbye


class PeerEventKind(enum.Enum):
    """What happened to a peer, as reported to the application."""

    JOINED = "joined"
    CHANGED = "changed"  #: its record changed (new endpoint, new offer, new name)
    EVASIVE = "evasive"
    LEFT = "left"  #: gone (goodbye, or silent past the gone interval)


@dataclass(frozen=True)
class PeerInfo:
    """A node's self-description, as announced by mDNS, a HELLO, or gossip.

    Attributes:
        node_id: stable id of the node (persisted in its data directory), 32 hex chars.
        name: human-readable node name.
        mesh: mesh name; nodes of other meshes are ignored.
        version: the protocol major version the node speaks.
        host: an id of the host the node runs on (peers with the same host prefer ipc).
        endpoints: ZeroMQ endpoints per role, e.g. ``{"control": ("tcp://10.0.0.1:5000",
            "ipc:///tmp/zeromesh-0/ab12.control")}``. Role names are defined by the module that
            binds the socket ("control" by the node core; patterns add their own).
        offers: names offered per kind (``"stream"``, ``"queue"``, ``"service"``).
        public_key: Z85 CURVE public key when security is on, else None.
        incarnation: grows with every start of the node on its data dir
            (mesh.datadir.next_incarnation); 0 from a node that does not announce one (an
            older build). Peers use it to tell a restart from a second process holding the
            same id (mesh.membership).
    """

    node_id: str
    name: str
    mesh: str
    version: int = PROTOCOL_VERSION
    host: str = ""
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    offers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    public_key: str | None = None
    incarnation: int = 0


@dataclass(frozen=True)
class PeerEvent:
    """A change in the peer table, delivered to callbacks and iterators."""

    kind: PeerEventKind
    peer: PeerInfo


# --- presence: a pure state machine (events and a clock in, events and actions out) -----------


@dataclass(frozen=True)
class PeerRecord:
    """A snapshot of one row of the peer table.

    Attributes:
        info: the peer's latest self-description.
        state: its liveness.
        last_heard: ``time.monotonic()`` of the last message heard from it.
        since: ``time.monotonic()`` of its last state change.
        source: how it was learnt: ``"hello"``, ``"mdns"``, ``"gossip"``, ``"static"``...
    """

    info: PeerInfo
    state: PeerState
    last_heard: float
    since: float
    source: str


@dataclass(frozen=True)
class Tick:
    """What one presence tick decided.

    Attributes:
        events: EVASIVE / LEFT events to report.
        ping: node ids of evasive peers to ping now.
        gone: node ids that just went gone (close their connections).
        pruned: node ids removed from the table (gone for longer than the prune interval).
    """

    events: list[PeerEvent]
    ping: list[str]
    gone: list[str]
    pruned: list[str]


class Presence:
    """Liveness of peers from what was heard and when; no I/O, no threads, no clock of its own.

    States: JOINED -> EVASIVE (quiet > ``evasive_s``) -> GONE (quiet > ``gone_s``); any message
    makes a peer JOINED again (a JOINED event is reported when it was evasive or gone); a goodbye
    makes it GONE at once. GONE rows stay for ``prune_s`` (so ``mesh peers`` can show them), then
    are removed.

    Args:
        evasive_s: quiet time after which a peer is evasive (and pinged).
        gone_s: quiet time after which a peer is gone.
        prune_s: time a gone peer stays in the table.
    """

    def __init__(self, evasive_s: float, gone_s: float, prune_s: float) -> None:
        self.evasive_s = evasive_s
        self.gone_s = gone_s
        self.prune_s = prune_s
        self._rows: dict[str, PeerRecord] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, node_id: str) -> PeerRecord | None:
        """The row of ``node_id``, or None."""
        return self._rows.get(node_id)

    def records(self) -> list[PeerRecord]:
        """Every row, gone ones included."""
        return list(self._rows.values())

    def is_live(self, node_id: str) -> bool:
        """True when the peer is JOINED or EVASIVE."""
        row = self._rows.get(node_id)
        return row is not None and row.state is not PeerState.GONE

    def upsert(self, info: PeerInfo, now: float, source: str = "hello") -> list[PeerEvent]:
        """Record a full self-description heard from the peer itself (HELLO / UPDATE).

        Returns:
            JOINED for a new, evasive or gone peer; CHANGED when a live peer's info changed
            (both when an evasive peer comes back with new info).
        """
        row = self._rows.get(info.node_id)
        if row is None:
            self._rows[info.node_id] = PeerRecord(info, PeerState.JOINED, now, now, source)
            return [PeerEvent(PeerEventKind.JOINED, info)]
        events: list[PeerEvent] = []
        changed = row.info != info
        if row.state is PeerState.GONE:
            self._rows[info.node_id] = PeerRecord(info, PeerState.JOINED, now, now, source)
            return [PeerEvent(PeerEventKind.JOINED, info)]
        if row.state is PeerState.EVASIVE:
            events.append(PeerEvent(PeerEventKind.JOINED, info))
            row = replace(row, state=PeerState.JOINED, since=now)
        if changed:
            events.append(PeerEvent(PeerEventKind.CHANGED, info))
        self._rows[info.node_id] = replace(row, info=info, last_heard=now)
        return events

    def heard(self, node_id: str, now: float) -> list[PeerEvent]:
        """Any message from ``node_id`` counts as liveness.

        Returns:
            [JOINED] when the peer was evasive or gone; [] otherwise (or when unknown).
        """
        row = self._rows.get(node_id)
        if row is None:
            return []
        if row.state is PeerState.JOINED:
            if now > row.last_heard:
                self._rows[node_id] = replace(row, last_heard=now)
            return []
        self._rows[node_id] = replace(row, state=PeerState.JOINED, last_heard=now, since=now)
        return [PeerEvent(PeerEventKind.JOINED, row.info)]

    def goodbye(self, node_id: str, now: float) -> list[PeerEvent]:
        """The peer said goodbye on its control channel (BYE): GONE at once.

        Returns:
            [LEFT] when it was live; [] otherwise.
        """
        row = self._rows.get(node_id)
        if row is None or row.state is PeerState.GONE:
            return []
        self._rows[node_id] = replace(row, state=PeerState.GONE, since=now)
        return [PeerEvent(PeerEventKind.LEFT, row.info)]

    def forget(self, node_id: str) -> bool:
        """Remove a row now (a gone row evicted to make room); True if there was one."""
        return self._rows.pop(node_id, None) is not None

    def tick(self, now: float) -> Tick:
        """Advance time: mark quiet peers evasive or gone, prune old gone rows."""
        result = Tick([], [], [], [])
        for node_id, row in list(self._rows.items()):
            quiet = now - row.last_heard
            if row.state is PeerState.GONE:
                if now - row.since > self.prune_s:
                    del self._rows[node_id]
                    result.pruned.append(node_id)
                continue
            if quiet > self.gone_s:
                self._rows[node_id] = replace(row, state=PeerState.GONE, since=now)
                result.events.append(PeerEvent(PeerEventKind.LEFT, row.info))
                result.gone.append(node_id)
            elif quiet > self.evasive_s:
                if row.state is PeerState.JOINED:
                    self._rows[node_id] = replace(row, state=PeerState.EVASIVE, since=now)
                    result.events.append(PeerEvent(PeerEventKind.EVASIVE, row.info))
                result.ping.append(node_id)
        return result


_Infos = list[PeerInfo]
_Records = list[PeerRecord]


# --- the thread-safe table the node exposes ------------------------------------------------------


class PeerTable:
    """The node's peer table: thread-safe reads, writes marshalled to the node's reactor.

    Reads (:meth:`get`, :meth:`list`, :meth:`state`, :meth:`last_seen`, :meth:`records`) take a
    short lock and return immutable snapshots. :meth:`upsert` and :meth:`goodbye` are how
    discovery (mDNS, from its own threads) reports what it saw: they only hand the report to the
    node, which dials the peer; presence is then decided by the control channel's own traffic.

    Args:
        presence: the state machine (mutated only by the node, on its reactor thread).
        on_upsert: called with ``(info, source)`` by :meth:`upsert` (the node marshals it).
        on_goodbye: called with ``node_id`` by :meth:`goodbye`.
        clock: the monotonic clock the presence times come from.
    """

    def __init__(
        self,
        presence: Presence,
        on_upsert: Callable[[PeerInfo, str], None] | None = None,
        on_goodbye: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.presence = presence
        #: held by the node while it mutates ``presence``; readers take it briefly
        self.lock = threading.RLock()
        self._on_upsert = on_upsert
        self._on_goodbye = on_goodbye
        self._clock = clock

    def get(self, node_id: str) -> PeerInfo | None:
        """The latest info of a peer (live or gone), or None when unknown."""
        with self.lock:
            row = self.presence.get(node_id)
        return None if row is None else row.info

    def list(self, include_gone: bool = False) -> _Infos:
        """Infos of live peers (joined or evasive), or of every row."""
        with self.lock:
            rows = self.presence.records()
        return [r.info for r in rows if include_gone or r.state is not PeerState.GONE]

    def records(self) -> _Records:
        """Snapshots of every row, gone ones included (for ``mesh peers``)."""
        with self.lock:
            return self.presence.records()

    def state(self, node_id: str) -> PeerState | None:
        """The peer's state, or None when unknown."""
        with self.lock:
            row = self.presence.get(node_id)
        return None if row is None else row.state

    def last_seen(self, node_id: str) -> float | None:
        """Wall-clock time (``time.time()``) the peer was last heard from, or None."""
        with self.lock:
            row = self.presence.get(node_id)
        if row is None:
            return None
        return time.time() - (self._clock() - row.last_heard)

    def __len__(self) -> int:
        with self.lock:
            return len(self.presence)

    def __contains__(self, node_id: object) -> bool:
        with self.lock:
            return node_id in self.presence

    def upsert(self, info: PeerInfo, source: str = "mdns") -> None:
        """Report a peer found by discovery; thread-safe. The node dials it unless it is live.

        Raises:
            ClosedError: the node is closed.
        """
        if self._on_upsert is not None:
            self._on_upsert(info, source)

    def goodbye(self, node_id: str) -> None:
        """Report a discovery goodbye for ``node_id``; thread-safe. A hint only: the node
        counts it and presence does not change (an mDNS goodbye proves nothing about who sent
        it; only the peer's control channel, BYE or silence past ``gone_s``, takes it away).

        Raises:
            ClosedError: the node is closed.
        """
        if self._on_goodbye is not None:
            self._on_goodbye(node_id)
