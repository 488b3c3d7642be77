"""Peers: what a node knows about the other nodes of its mesh.

The data types here are the contract between discovery (mDNS, static peers, gossip), the node's
presence tracking, and the patterns that ask "who offers stream X". Presence (joined → evasive
→ gone) comes from the mesh's own heartbeats on the control channel, never from mDNS expiry.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    """

    node_id: str
    name: str
    mesh: str
    version: int = PROTOCOL_VERSION
    host: str = ""
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    offers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    public_key: str | None = None


@dataclass(frozen=True)
class PeerEvent:
    """A change in the peer table, delivered to callbacks and iterators."""

    kind: PeerEventKind
    peer: PeerInfo
