"""zeromesh: a brokerless messaging mesh for Python on ZeroMQ.

The core package: the event envelope, the durable log, crash-safe state, the node (its reactor
thread, sockets, control channel, peer table and presence) and discovery. ``patterns`` builds on
the public API exported here; no core module imports ``patterns``.

Quick tour::

    from mesh import Node, Event, Log, LogConfig, FsyncPolicy

    with Node(data_dir="./data", name="sensor-1", interface="127.0.0.1") as node:
        print(node.id, node.info().endpoints)
"""

from mesh._version import __version__
from mesh.envelope import (
    DEFAULT_MAX_EVENT_BYTES,
    ENVELOPE_VERSION,
    Event,
    decode,
    encode,
    from_cloudevent,
    to_cloudevent,
    to_cloudevent_json,
    uuid7,
)
from mesh.errors import (
    ClosedError,
    CodecError,
    ConfigError,
    EventTooLarge,
    LogCorrupted,
    LogError,
    LogFull,
    LogLocked,
    MalformedEvent,
    MeshError,
    MeshTimeout,
    OffsetOutOfRange,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    SendFailed,
    StateError,
    UnsupportedVersion,
)
from mesh.log import FsyncPolicy, Log, LogConfig, LogDirectory, LogStats, Record, Retention
from mesh.node import Node, NodeConfig, PresenceConfig
from mesh.peers import PeerEvent, PeerEventKind, PeerInfo, PeerState
from mesh.reactor import Reactor
from mesh.state import StateStore

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "ENVELOPE_VERSION",
    "ClosedError",
    "CodecError",
    "ConfigError",
    "Event",
    "EventTooLarge",
    "FsyncPolicy",
    "Log",
    "LogConfig",
    "LogCorrupted",
    "LogDirectory",
    "LogError",
    "LogFull",
    "LogLocked",
    "LogStats",
    "MalformedEvent",
    "MeshError",
    "MeshTimeout",
    "Node",
    "NodeConfig",
    "OffsetOutOfRange",
    "PeerError",
    "PeerEvent",
    "PeerEventKind",
    "PeerInfo",
    "PeerState",
    "PeerUnreachable",
    "PresenceConfig",
    "ProtocolError",
    "Reactor",
    "Record",
    "Retention",
    "SendFailed",
    "StateError",
    "StateStore",
    "UnsupportedVersion",
    "__version__",
    "decode",
    "encode",
    "from_cloudevent",
    "to_cloudevent",
    "to_cloudevent_json",
    "uuid7",
]
