"""TLS and credentials on the broker connection, against real TLS-only brokers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mesh.envelope import Event
from mesh.node import Node
from patterns.bridge import Bridge, BridgeConfig, MqttConfig, NatsConfig, Route, TlsConfig
from patterns.pubsub import Publisher
from tests.brokers import make_tls, start_mosquitto, start_nats
from tests.util import unique, wait_until

pytest.importorskip("paho.mqtt.client", reason="pip install 'zeromesh[mqtt]'")
pytest.importorskip("nats", reason="pip install 'zeromesh[nats]'")


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_tls_and_password_connect_and_forward_wrong_password_does_not(
        kind: str, tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    starter = start_mosquitto if kind == "mqtt" else start_nats
    broker = starter(tmp_path / "broker", tls=tls, user=("edge", "s3cret"))
    mesh = unique("tls")
    a = Node(data_dir=tmp_path / "a", mesh=mesh, mdns=False, interface="127.0.0.1")
    ctrl = next(e for e in a.info().endpoints["control"] if e.startswith("tcp://"))
    b = Node(data_dir=tmp_path / "b", mesh=mesh, mdns=False, interface="127.0.0.1",
             static_peers=(ctrl,))

    def cfg(password: str, name: str) -> BridgeConfig:
        t = TlsConfig(ca_file=tls["ca"])
        return BridgeConfig(
            name=name, kind=kind,  # type: ignore[arg-type]
            routes=(Route("sec.>", "sec/#" if kind == "mqtt" else "sec.>", "out",
                          kind),),  # type: ignore[arg-type]
            mqtt=MqttConfig(port=broker.port, username="edge", password=password, tls=t),
            nats=NatsConfig(servers=(f"tls://127.0.0.1:{broker.port}",), user="edge",
                            password=password, tls=t, stream="SEC"),
            retry_s=0.1)

    try:
        with Publisher(a, "sec.x") as pub:
            with Bridge(b, cfg("wrong", "bad")) as bad:
                pub.publish_event(Event(type="r", source="s", data=0))
                assert not bad.wait_connected(2.0)
                assert bad.stats().forwarded == 0
            with Bridge(b, cfg("s3cret", "good")) as good:
                assert good.wait_connected(10)
                for i in range(1, 10):
                    pub.publish_event(Event(type="r", source="s", data=i))
                wait_until(lambda: good.stats().forwarded >= 10, 15, what="forwarded over TLS")
    finally:
        b.close()
        a.close()
        broker.stop(signal.SIGKILL)
