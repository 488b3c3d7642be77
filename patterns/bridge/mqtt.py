"""MQTT 5 broker client of the bridge, on paho-mqtt (the ``zeromesh[mqtt]`` extra).

One paho client per bridge, with its own network thread (``loop_start``). QoS 1 both ways:
outbound publishes wait for PUBACK; inbound uses paho's manual acks so the PUBACK goes to the
broker only once the handler appended the event to the mesh log. The session is persistent
(``clean_start=False`` with a session expiry and a stable client id), so QoS 1 messages the
bridge did not ack before a crash are redelivered by the broker when it comes back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from mesh.errors import ConfigError
from patterns.bridge.base import InboundHandler
from patterns.bridge.config import MqttConfig
from patterns.bridge.mapping import Message

__all__ = ["MqttClient", "import_paho"]

_log = logging.getLogger("zeromesh.bridge.mqtt")


def import_paho() -> Any:
    """Import paho-mqtt >= 2 or raise a ConfigError naming the extra.

    Raises:
        ConfigError: paho-mqtt is missing or too old.
    """
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise ConfigError("the MQTT bridge needs paho-mqtt: pip install 'zeromesh[mqtt]'"
                          ) from exc
    if not hasattr(mqtt, "CallbackAPIVersion"):
        raise ConfigError("the MQTT bridge needs paho-mqtt >= 2: pip install 'zeromesh[mqtt]'")
    return mqtt


class MqttClient:
    """The bridge's MQTT 5 connection (see the module docstring).

    Args:
        config: broker address, credentials, TLS.
        client_id: the stable MQTT client id.

    Raises:
        ConfigError: paho-mqtt missing, or bad TLS files.
    """

    def __init__(self, config: MqttConfig, client_id: str) -> None:
        mqtt = import_paho()
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._mqtt = mqtt
        self._Properties = Properties
        self._PacketTypes = PacketTypes
        self.config = config
        self._connected = threading.Event()
        self._closed = False
        self._inbound: list[str] = []
        self._handler: InboundHandler | None = None
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        # Enough in flight to keep the pipe full while a batch waits for its PUBACKs.
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=4)
        if config.username is not None:
            c.username_pw_set(config.username, config.password)
        if config.tls is not None:
            c.tls_set_context(config.tls.ssl_context())
            if config.tls.insecure:
                c.tls_insecure_set(True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._client = c

    # -- paho network thread ------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        if getattr(reason, "is_failure", False):
            _log.warning("mqtt: connection refused: %s", reason)
            return
        if self._inbound:
            # Connected counts from the SUBACK: before it, inbound messages would be missed.
            client.subscribe([(t, 1) for t in self._inbound])
        else:
            self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reasons: Any,
                      props: Any) -> None:
        bad = [r for r in reasons or () if getattr(r, "is_failure", False)]
        if bad:
            _log.warning("mqtt: subscription refused: %s", bad)
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       props: Any) -> None:
        self._connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        attrs = tuple((str(k), str(v)) for k, v in getattr(props, "UserProperty", None) or ())
        ctype = getattr(props, "ContentType", None)
        m = Message(msg.topic, bytes(msg.payload), attrs, ctype)
        mid, qos = msg.mid, msg.qos
        handler = self._handler

        def ack() -> None:
            if qos > 0:
                client.ack(mid, qos)

        if handler is None:
            ack()
            return
        handler(m, ack)

    # -- owner thread -----------------------------------------------------------------------

    def start(self, inbound: Sequence[str], handler: InboundHandler | None) -> None:
        """Connect in the background and subscribe to ``inbound`` (QoS 1)."""
        self._inbound = list(inbound)
        self._handler = handler
        props = self._Properties(self._PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        self._client.connect_async(self.config.host, self.config.port,
                                   keepalive=self.config.keepalive_s, clean_start=False,
                                   properties=props)
        self._client.loop_start()

    def connected(self) -> bool:
        """True while connected to the broker."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the connection."""
        return self._connected.wait(timeout)

    def publish_batch(self, msgs: Sequence[Message], timeout: float) -> int:
        """Publish QoS 1 and wait for the PUBACKs; returns the acked prefix length."""
        if not self._connected.wait(min(timeout, 1.0)):
            return 0
        infos: list[Any] = []
        for m in msgs:
            props = self._Properties(self._PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if m.attrs:
                props.UserProperty = list(m.attrs)
            if m.content_type is not None:
                props.ContentType = m.content_type
            info = self._client.publish(m.topic, m.payload, qos=1, properties=props)
            if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
                break  # disconnected meanwhile: paho keeps what it took; we re-send the rest
            infos.append(info)
        deadline = time.monotonic() + timeout
        done = 0
        for info in infos:
            while not info.is_published():
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected.is_set():
                    return done
                info.wait_for_publish(min(left, 0.2))
            done += 1
        return done

    def close(self) -> None:
        """Disconnect (the broker keeps the session) and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        was_connected = self._connected.is_set()
        try:
            self._client.disconnect()
        finally:
            if was_connected:
                self._client.loop_stop()  # the loop ends at once on the DISCONNECT
            else:
                # No connection, so nothing in flight: paho's (daemon) network thread may be in
                # its reconnect back-off, a time.sleep of up to 1 s that loop_stop() would wait
                # out; a bridge stopped by SIGTERM must not delay its node's goodbye by that.
                # The thread sees the stop flag when it wakes and exits.
                stopper = threading.Thread(target=self._client.loop_stop, daemon=True,
                                           name="zeromesh-bridge-mqtt-stop")
                stopper.start()
                stopper.join(0.1)
