"""Bridges against real brokers on loopback: outage, SIGKILL, inbound ack order, DLQ, loops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.envelope import Event
from mesh.node import Node
from patterns.bridge import Bridge, BridgeConfig, MqttConfig, NatsConfig, Route
from patterns.bridge.bridge import KILL_BEFORE_APPEND_ENV
from patterns.pipeline.dlq import DeadLetters
from patterns.pubsub import Publisher, Start, Subscriber
from tests.brokers import Broker, mosquitto, nats_js  # noqa: F401 - fixtures
from tests.util import ctrl, make_node, python_child, unique, wait_until

paho = pytest.importorskip("paho.mqtt.client", reason="pip install 'zeromesh[mqtt]'")
nats = pytest.importorskip("nats", reason="pip install 'zeromesh[nats]'")

CHILD = "import tests.bridge_child as c; c.main()"




# --- broker-side observers ---------------------------------------------------------------------


class MqttCollector:
    """A paho subscriber with a persistent session: records (topic, id attr, payload)."""

    def __init__(self, port: int, topic: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.got: list[tuple[str, str | None, bytes]] = []
        self.lock = threading.Lock()
        c = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2,
                        client_id=unique("coll"), protocol=paho.MQTTv5)
        c.reconnect_delay_set(1, 2)
        self.subscribed = threading.Event()

        def on_connect(cl: Any, ud: Any, fl: Any, rc: Any, pr: Any) -> None:
            cl.subscribe(topic, qos=1)

        def on_subscribe(*a: Any) -> None:
            self.subscribed.set()

        def on_message(cl: Any, ud: Any, msg: Any) -> None:
            props = dict(getattr(msg.properties, "UserProperty", None) or [])
            with self.lock:
                self.got.append((msg.topic, props.get("id"), bytes(msg.payload)))

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        c.connect("127.0.0.1", port, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        assert self.subscribed.wait(5)

    def ids(self) -> list[str | None]:
        with self.lock:
            return [g[1] for g in self.got]

    def publish(self, topic: str, payload: bytes, props: list[tuple[str, str]] | None = None,
                content_type: str | None = None) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        p = Properties(PacketTypes.PUBLISH)
        if props:
            p.UserProperty = props
        if content_type:
            p.ContentType = content_type
        self.client.publish(topic, payload, qos=1, properties=p).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def _js_read(port: int, stream: str) -> list[tuple[str, str | None]]:
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(stream, seq)
            out.append((m.subject, (m.headers or {}).get("Nats-Msg-Id")))
        return out
    finally:
        await nc.close()


def js_read(port: int, stream: str) -> list[tuple[str, str | None]]:
    try:
        return asyncio.run(_js_read(port, stream))
    except Exception:
        return []


async def _js_count(port: int, stream: str) -> int:
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def js_count(port: int, stream: str) -> int:
    """Messages in ``stream`` (one request: js_read fetches them one by one, too slow to
    catch a forwarder mid-run), 0 before it exists."""
    try:
        return asyncio.run(_js_count(port, stream))
    except Exception:
        return 0


async def _js_publish(port: int, subject: str, msgs: list[tuple[bytes, dict[str, str]]],
                      stream: str, subjects: list[str]) -> None:
    from nats.js.api import StreamConfig
    from nats.js.errors import NotFoundError

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(stream)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=stream, subjects=subjects))
        for payload, headers in msgs:
            await js.publish(subject, payload, headers=headers or None)
    finally:
        await nc.close()


def js_publish(port: int, subject: str, msgs: list[tuple[bytes, dict[str, str]]],
               stream: str, subjects: list[str]) -> None:
    asyncio.run(_js_publish(port, subject, msgs, stream, subjects))


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def publisher_node(tmp_path: Path) -> Iterator[Node]:
    nd = make_node(tmp_path / "pub", unique("br"))
    yield nd
    nd.close()


def bridge_cfg(kind: str, port: int, name: str, routes: list[dict[str, str]],
               **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": name, "kind": kind, "routes": routes, "batch": 100,
                           "ack_timeout_s": 2.0, "retry_s": 0.2, **extra}
    if kind == "mqtt":
        cfg["mqtt"] = {"host": "127.0.0.1", "port": port}
    else:
        cfg["nats"] = {"servers": [f"nats://127.0.0.1:{port}"], "stream": "MESH",
                       "ack_wait_s": 1.5}
    return cfg


class Child:
    """A bridge process (tests/bridge_child.py)."""

    def __init__(self, tmp: Path, spec: dict[str, Any], env: dict[str, str] | None = None):
        path = tmp / f"spec-{unique('c')}.json"
        path.write_text(json.dumps(spec))
        self.proc = python_child(CHILD, str(path), env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("READY"), line
        _, self.node_id, self.ctrl = line.split()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def first_seen(ids: list[str | None]) -> list[str | None]:
    seen: set[str | None] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


# --- outbound: broker outage ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_outbound_survives_broker_outage_in_order(kind: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path,
                                                  publisher_node: Node) -> None:
    broker: Broker = request.getfixturevalue("mosquitto" if kind == "mqtt" else "nats_js")
    stream = "sensors.t1"
    remote = "site/sensors/#" if kind == "mqtt" else "site.sensors.>"
    cfg = BridgeConfig(
        name=unique("b"), kind=kind,  # type: ignore[arg-type]
        routes=(Route("sensors.>", remote, "out", kind),),  # type: ignore[arg-type]
        mqtt=MqttConfig(port=broker.port), nats=NatsConfig(
            servers=(f"nats://127.0.0.1:{broker.port}",), stream="MESH"),
        batch=100, ack_timeout_s=2.0, retry_s=0.2)
    coll = MqttCollector(broker.port, "site/#") if kind == "mqtt" else None
    bnode = make_node(tmp_path / "bridge", publisher_node.mesh, (ctrl(publisher_node),))
    sent: list[str] = []
    try:
        with Publisher(publisher_node, stream) as pub, Bridge(bnode, cfg) as br:
            def publish(n: int) -> None:
                for _ in range(n):
                    ev = Event(type="reading", source="t", data={"i": len(sent)})
                    pub.publish_event(ev)
                    sent.append(ev.id)

            publish(200)
            wait_until(lambda: br.stats().forwarded >= 200, 15, what="first 200 forwarded")
            broker.stop()
            publish(300)  # while the broker is down: stays in the log
            wait_until(lambda: br.stats().retries >= 2, 10, what="bridge retrying")
            assert br.stats().forwarded < 500
            broker.start()
            publish(100)
            wait_until(lambda: br.stats().forwarded >= 600, 30, what="backlog drained")
            if coll is not None:
                try:
                    wait_until(lambda: set(sent) <= set(coll.ids()), 20, what="all at subscriber")
                except AssertionError:
                    have = set(coll.ids())
                    miss = [i for i, x in enumerate(sent) if x not in have]
                    raise AssertionError(f"missing {len(miss)}: {miss[:5]}..{miss[-5:]} {br.stats()} {len(coll.ids())}") from None
                got = first_seen([i for i in coll.ids() if i in set(sent)])
                assert got == sent  # in order; duplicates (at least once) allowed
            else:
                def complete() -> list[tuple[str, str | None]]:
                    msgs = js_read(broker.port, "MESH")
                    return msgs if len(msgs) >= len(sent) else []
                msgs = wait_until(complete, 20, what="all in JetStream")
                assert [m[1] for m in msgs] == sent  # in order, each id exactly once
                assert {m[0] for m in msgs} == {"site.sensors.t1"}
    finally:
        if coll is not None:
            coll.close()
        bnode.close()


# --- outbound: bridge SIGKILLed mid-forward ------------------------------------------------------


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_outbound_bridge_sigkill_mid_forward_loses_nothing(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path,
        publisher_node: Node) -> None:
    broker: Broker = request.getfixturevalue("mosquitto" if kind == "mqtt" else "nats_js")
    remote = "k/#" if kind == "mqtt" else "k.>"
    spec = {"data_dir": str(tmp_path / "bridge"), "mesh": publisher_node.mesh,
            "peers": [ctrl(publisher_node)],
            "bridge": bridge_cfg(kind, broker.port, "kb",
                                 [{"mesh": "kill.>", "remote": remote, "direction": "out"}],
                                 # small NATS batches: JetStream acks fast enough that 3,000
                                 # events in batches of 50 were through before the kill
                                 batch=50 if kind == "mqtt" else 10)}
    coll = MqttCollector(broker.port, "k/#") if kind == "mqtt" else None

    def arrived() -> list[str | None]:
        if coll is not None:
            return coll.ids()
        return [m[1] for m in js_read(broker.port, "MESH")]

    def progress() -> int:  # a cheap count, to kill the bridge while it is still forwarding
        return len(coll.ids()) if coll is not None else js_count(broker.port, "MESH")

    n = 3000
    with Publisher(publisher_node, "kill.x") as pub:
        events = [Event(type="r", source="t", data=i) for i in range(n)]
        assert pub.publish_events(events) == range(n)
        ids: list[str | None] = [e.id for e in events]
        child = Child(tmp_path, spec)
        try:
            wait_until(lambda: progress() >= 200, 20, what="forwarding started")
            child.kill()  # SIGKILL mid-forward
            assert len(set(arrived())) < n, "all forwarded before the kill: test too small"
            child = Child(tmp_path, spec)
            # the cheap count first (JetStream dedups re-sends, so n means all were stored)
            wait_until(lambda: progress() >= n, 40, what="n messages at the broker")
            wait_until(lambda: set(ids) <= set(arrived()), 40, what="everything forwarded")
            got = arrived()
            assert first_seen(got) == ids
            if kind == "nats":
                assert len(got) == n  # JetStream dedup (Nats-Msg-Id) removed the re-sends
        finally:
            child.stop()
            if coll is not None:
                coll.close()


# --- inbound: ack only after the mesh append -----------------------------------------------------


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_inbound_acked_after_append_redelivered_after_kill(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path,
        publisher_node: Node) -> None:
    broker: Broker = request.getfixturevalue("mosquitto" if kind == "mqtt" else "nats_js")
    remote = "cmd/#" if kind == "mqtt" else "cmd.>"
    spec = {"data_dir": str(tmp_path / "bridge"), "mesh": publisher_node.mesh,
            "peers": [ctrl(publisher_node)],
            "bridge": bridge_cfg(kind, broker.port, "ib",
                                 [{"mesh": "cmd.>", "remote": remote, "direction": "in"}])}
    payloads = [f"c{i}".encode() for i in range(5)]
    # The bridge subscribes first (its session / consumer exists), then dies at message 3.
    child = Child(tmp_path, spec, env={KILL_BEFORE_APPEND_ENV: "3"})
    try:
        if kind == "mqtt":
            pubc = MqttCollector(broker.port, unique("none"))
            wait_until(lambda: _mqtt_session_exists(broker), 5)
            for p in payloads:
                pubc.publish("cmd/door", p)
            pubc.close()
        else:
            wait_until(lambda: _js_consumer_exists(broker.port), 10, what="consumer")
            js_publish(broker.port, "cmd.door", [(p, {}) for p in payloads], "MESH",
                       ["cmd.>"])
        assert child.proc.wait(20) == -signal.SIGKILL  # died between receive and append
        child = Child(tmp_path, spec)
        with Subscriber(publisher_node, "cmd.", start=Start.beginning(),
                        endpoints=()) as sub:
            got: list[bytes] = []

            def all_in() -> bool:
                got.extend(e.data for e in sub.recv_batch(timeout=0.2))
                return set(payloads) <= set(got)

            wait_until(all_in, 30, what="every command in the mesh")
            # Every command arrived, none lost. Order is kept for what was acked before the
            # kill; the redelivered tail comes in the broker's redelivery order (JetStream
            # redelivers by ack timer, not necessarily in sequence).
            assert first_seen(got)[:2] == payloads[:2]  # type: ignore[index]
            assert sorted(set(got)) == payloads
            assert all(isinstance(g, bytes) for g in got)
    finally:
        child.stop()


def _mqtt_session_exists(broker: Broker) -> bool:
    return broker.running  # mosquitto keeps the session from the bridge's first CONNECT


def _js_consumer_exists(port: int) -> bool:
    async def check() -> bool:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            info = await nc.jetstream().stream_info("MESH")
            return bool(info.state.consumer_count)
        finally:
            await nc.close()
    try:
        return asyncio.run(check())
    except Exception:
        return False


# --- malformed inbound goes to the DLQ; loops are recognised -------------------------------------


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_malformed_to_dlq_and_loop_not_republished(kind: str, request: pytest.FixtureRequest,
                                                   tmp_path: Path,
                                                   publisher_node: Node) -> None:
    broker: Broker = request.getfixturevalue("mosquitto" if kind == "mqtt" else "nats_js")
    sep, rest = ("/", "#") if kind == "mqtt" else (".", ">")
    name = unique("lp")
    cfg = BridgeConfig(
        name=name, kind=kind,  # type: ignore[arg-type]
        routes=(Route("loop.>", f"loop{sep}{rest}", "both", kind),),  # type: ignore[arg-type]
        mqtt=MqttConfig(port=broker.port), nats=NatsConfig(
            servers=(f"nats://127.0.0.1:{broker.port}",), stream="MESH", ack_wait_s=2),
        batch=50, ack_timeout_s=2.0, retry_s=0.2)
    bnode = make_node(tmp_path / "bridge", publisher_node.mesh, (ctrl(publisher_node),))
    try:
        with Publisher(publisher_node, "loop.out") as pub, Bridge(bnode, cfg) as br:
            assert br.wait_connected(10)
            ev = Event(type="r", source="t", data={"v": 1})
            pub.publish_event(ev)
            # Out to the broker, back in through our own inbound route: recognised, dropped.
            wait_until(lambda: br.stats().looped >= 1, 15, what="loop recognised")
            assert br.stats().appended == 0
            bad_ce = b"{not json"
            bad_bin = b"x"
            if kind == "mqtt":
                c = MqttCollector(broker.port, unique("none"))
                c.publish("loop/bad1", bad_ce, content_type="application/cloudevents+json")
                c.publish("loop/bad2", bad_bin, props=[("specversion", "1.0"),
                                                       ("source", "s")])
                c.publish("loop/good", b"plain")
                c.close()
            else:
                js_publish(broker.port, "loop.bad1", [(bad_ce, {
                    "content-type": "application/cloudevents+json"})], "MESH", ["loop.>"])
                js_publish(broker.port, "loop.bad2", [(bad_bin, {
                    "ce-specversion": "1.0", "ce-source": "s"})], "MESH", ["loop.>"])
                js_publish(broker.port, "loop.good", [(b"plain", {})], "MESH", ["loop.>"])
            wait_until(lambda: br.stats().dead_lettered >= 2 and br.stats().appended >= 1,
                       15, what="DLQ + plain message")
            entries = DeadLetters(bnode.data_dir, name).list()
            assert sorted(e.payload for e in entries) == sorted([bad_ce, bad_bin])
            assert {e.reason for e in entries} == {"malformed"}
            assert all(e.error_type and e.error_message for e in entries)
            assert any("id" in (e.error_message or "") for e in entries)
            with Subscriber(publisher_node, "loop.good", start=Start.beginning()) as sub:
                got = sub.recv(timeout=10)
                assert got is not None and got.data == b"plain"
                assert got.subject == f"loop{sep}good"
            assert br.stats().looped == 1  # the plain message was not sent out and back
    finally:
        bnode.close()


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_cloudevent_attributes_cross_a_real_broker_intact(kind: str, mode: str,
                                                          request: pytest.FixtureRequest) -> None:
    """Non-ASCII, '%', '/' and '"' in attributes survive the bridge's own clients and the
    broker both ways (MQTT: unencoded UTF-8 user properties; NATS: percent-encoded headers)."""
    from patterns.bridge.mapping import event_to_message, message_to_event
    from patterns.bridge.mqtt import MqttClient
    from patterns.bridge.nats import NatsClient

    broker: Broker = request.getfixturevalue("mosquitto" if kind == "mqtt" else "nats_js")
    topic = "ce/x" if kind == "mqtt" else "ce.x"
    got: list[Any] = []
    lock = threading.Lock()

    def handler(m: Any, ack: Any) -> None:
        with lock:
            got.append(m)
        ack()

    client: Any
    if kind == "mqtt":
        client = MqttClient(MqttConfig(port=broker.port), unique("ce"))
    else:
        client = NatsClient(NatsConfig(servers=(f"nats://127.0.0.1:{broker.port}",),
                                       stream="CE"), unique("ce"), ["ce.>"])
    ev = Event(type="t", source="/ü", subject='日本語 subject %2F/ "q"', data=b"\x00p",
               datacontenttype="text/plain; charset=utf-8", extras={"note": "Euro € 😀"})
    msg = event_to_message(ev, topic, kind=kind, mode=mode,  # type: ignore[arg-type]
                           origin="Zürich/b")
    try:
        client.start([topic], handler)
        assert client.wait_connected(10)
        assert client.publish_batch([msg], 5.0) == 1
        wait_until(lambda: len(got) >= 1, 10, what="the message back from the broker")
        back = message_to_event(got[0], kind=kind, origin="O")  # type: ignore[arg-type]
        assert (back.id, back.subject, back.source, back.data) == (ev.id, ev.subject, "/ü",
                                                                   b"\x00p")
        assert back.datacontenttype == ev.datacontenttype
        assert back.extras["note"] == "Euro € 😀"
        if kind == "nats" and mode == "binary":
            wire = dict(got[0].attrs)
            assert wire["ce-subject"].startswith("%E6%97%A5%E6%9C%AC%E8%AA%9E%20subject%20%252F/")
    finally:
        client.close()


def test_outbound_event_that_is_no_cloudevent_is_skipped_not_fatal(
        tmp_path: Path, mosquitto: Broker, publisher_node: Node) -> None:  # noqa: F811
    """An envelope from another encoder with an empty subject (the constructor refuses one; the
    decoder takes it) is skipped and logged; the events after it are still forwarded."""
    import msgpack

    from mesh.envelope import decode

    cfg = BridgeConfig(name=unique("b"), kind="mqtt", routes=(Route("bad.>", "bad/#", "out"),),
                       mqtt=MqttConfig(port=mosquitto.port), batch=10, ack_timeout_s=2.0,
                       retry_s=0.2)
    coll = MqttCollector(mosquitto.port, "bad/#")
    bnode = make_node(tmp_path / "bridge", publisher_node.mesh, (ctrl(publisher_node),))
    try:
        with Publisher(publisher_node, "bad.x") as pub, Bridge(bnode, cfg) as br:
            foreign = decode(msgpack.packb([1, 0, "", None, unique("id"), 0, "t", "src", "",
                                            None, None, None, None, {}, b"x"]))
            assert foreign.subject == ""
            good = Event(type="t", source="s", data=b"ok")
            pub.publish_event(foreign)
            pub.publish_event(good)
            wait_until(lambda: good.id in coll.ids(), 15, what="the valid event forwarded")
            assert foreign.id not in coll.ids()
            assert br.stats().skipped >= 1 and br.stats().forwarded >= 1
    finally:
        coll.close()
        bnode.close()
