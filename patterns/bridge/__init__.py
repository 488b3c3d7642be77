"""Bridges from the mesh to MQTT 5 brokers and NATS JetStream, with store-and-forward.

Layers: :mod:`.mapping` (names, envelope, loops) and :mod:`.config` are pure; :mod:`.mqtt`
and :mod:`.nats` wrap the optional client libraries (imported only when a bridge of that kind
starts); :mod:`.bridge` runs the forwarding on a node.
"""

from patterns.bridge.bridge import Bridge, BridgeStats
from patterns.bridge.config import BridgeConfig, MqttConfig, NatsConfig, TlsConfig, load_config
from patterns.bridge.mapping import LoopGuard, Message, Route, event_to_message, message_to_event

__all__ = [
    "Bridge",
    "BridgeConfig",
    "BridgeStats",
    "LoopGuard",
    "Message",
    "MqttConfig",
    "NatsConfig",
    "Route",
    "TlsConfig",
    "event_to_message",
    "load_config",
    "message_to_event",
]
