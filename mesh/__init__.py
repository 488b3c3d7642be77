"""zeromesh: a brokerless messaging mesh for Python on ZeroMQ.

The core package: the event envelope, the durable log, crash-safe state, the node (its reactor
thread, sockets, control channel, peer table and presence) and discovery. ``patterns`` builds on
the public API exported here; no core module imports ``patterns``.

Quick tour::

    from mesh import Node, Event, Log, LogConfig, FsyncPolicy

    with Node(data_dir="./data", name="sensor-1", interface="127.0.0.1") as node:
        print(node.id, node.info().endpoints)
"""

import importlib
from typing import TYPE_CHECKING, Any

from mesh._version import __version__
from mesh.uuid7 import uuid7  # eager: the submodule of the same name would shadow it

if TYPE_CHECKING:
    from mesh.envelope import (
        DEFAULT_MAX_EVENT_BYTES,
        ENVELOPE_VERSION,
        Event,
        decode,
        encode,
        from_cloudevent,
        to_cloudevent,
        to_cloudevent_json,
    )
    from mesh.errors import (
        ClosedError,
        CodecError,
        ConfigError,
        DataDirInUse,
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

# Imported on first use (PEP 562): ``python -m mesh --version`` and the CLI's one-shot
# commands do not pay for the node, the log and discovery unless they use them.
_LAZY: dict[str, str] = {
    'DEFAULT_MAX_EVENT_BYTES': 'mesh.envelope',
    'ENVELOPE_VERSION': 'mesh.envelope',
    'Event': 'mesh.envelope',
    'decode': 'mesh.envelope',
    'encode': 'mesh.envelope',
    'from_cloudevent': 'mesh.envelope',
    'to_cloudevent': 'mesh.envelope',
    'to_cloudevent_json': 'mesh.envelope',
    'ClosedError': 'mesh.errors',
    'CodecError': 'mesh.errors',
    'ConfigError': 'mesh.errors',
    'DataDirInUse': 'mesh.errors',
    'EventTooLarge': 'mesh.errors',
    'LogCorrupted': 'mesh.errors',
    'LogError': 'mesh.errors',
    'LogFull': 'mesh.errors',
    'LogLocked': 'mesh.errors',
    'MalformedEvent': 'mesh.errors',
    'MeshError': 'mesh.errors',
    'MeshTimeout': 'mesh.errors',
    'OffsetOutOfRange': 'mesh.errors',
    'PeerError': 'mesh.errors',
    'PeerUnreachable': 'mesh.errors',
    'ProtocolError': 'mesh.errors',
    'SendFailed': 'mesh.errors',
    'StateError': 'mesh.errors',
    'UnsupportedVersion': 'mesh.errors',
    'FsyncPolicy': 'mesh.log',
    'Log': 'mesh.log',
    'LogConfig': 'mesh.log',
    'LogDirectory': 'mesh.log',
    'LogStats': 'mesh.log',
    'Record': 'mesh.log',
    'Retention': 'mesh.log',
    'Node': 'mesh.node',
    'NodeConfig': 'mesh.node',
    'PresenceConfig': 'mesh.node',
    'PeerEvent': 'mesh.peers',
    'PeerEventKind': 'mesh.peers',
    'PeerInfo': 'mesh.peers',
    'PeerState': 'mesh.peers',
    'Reactor': 'mesh.reactor',
    'StateStore': 'mesh.state',
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "ENVELOPE_VERSION",
    "ClosedError",
    "CodecError",
    "ConfigError",
    "DataDirInUse",
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
