"""``mesh bridge`` as a real process: flags, forwarding to a real mosquitto, clean SIGTERM."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.envelope import Event
from mesh.errors import ConfigError
from mesh.node import Node
from patterns.pubsub import Publisher
from tests.brokers import Broker, mosquitto  # noqa: F401 - fixture
from tests.util import REPO, unique, wait_until

pytest.importorskip("paho.mqtt.client", reason="pip install 'zeromesh[mqtt]'")


def test_flags_build_the_config() -> None:
    from mesh.cli import build_parser
    from mesh.cli.bridge_cmd import config_from_args

    args = build_parser().parse_args([
        "bridge", "--data-dir", "d", "--name", "b", "--kind", "nats",
        "--broker", "nats://h:1,nats://h:2", "--out", "s.>=x.>", "--in", "c.*=cmd.*",
        "--ca-file", "/ca.pem", "--creds", "/u.creds"])
    cfg = config_from_args(args)
    assert cfg.nats.servers == ("nats://h:1", "nats://h:2")
    assert [(r.mesh, r.remote, r.direction) for r in cfg.routes] == [
        ("s.>", "x.>", "out"), ("cmd.*", "c.*", "in")]
    assert cfg.nats.tls is not None and cfg.nats.tls.ca_file == "/ca.pem"
    assert cfg.nats.creds_file == "/u.creds"
    bad = build_parser().parse_args(["bridge", "--data-dir", "d", "--name", "b", "--kind",
                                     "mqtt", "--broker", "nohost", "--out", "a=b"])
    with pytest.raises(ConfigError):
        config_from_args(bad)


def test_mesh_bridge_process_forwards_and_stops(tmp_path: Path, mosquitto: Broker) -> None:  # noqa: F811
    from tests.test_bridge_real import MqttCollector, ctrl

    mesh = unique("cli")
    node = Node(data_dir=tmp_path / "pub", mesh=mesh, mdns=False, interface="127.0.0.1")
    coll = MqttCollector(mosquitto.port, "cli/#")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "bridge", "--data-dir", str(tmp_path / "br"),
         "--mesh", mesh, "--no-mdns", "--interface", "127.0.0.1", "--peer", ctrl(node),
         "--name", "clib", "--kind", "mqtt", "--broker", f"127.0.0.1:{mosquitto.port}",
         "--out", "cli.>=cli/#"], cwd=REPO, stderr=subprocess.PIPE)
    try:
        with Publisher(node, "cli.a") as pub:
            ids = []
            for i in range(50):
                ev = Event(type="t", source="s", data=i)
                pub.publish_event(ev)
                ids.append(ev.id)
            wait_until(lambda: set(ids) <= set(coll.ids()), 20, what="forwarded by the CLI")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert rc == 0 and b"forwarded=50" in err, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        coll.close()
        node.close()


def test_example_bridge_mqtt_runs(mosquitto: Broker) -> None:  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "examples.bridge_mqtt", "--port",
                        str(mosquitto.port), "--count", "10"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "outbound: 10 readings" in r.stdout and "forwarded=10" in r.stdout
    assert "inbound: site/cmd/kitchen -> mesh stream cmd.kitchen" in r.stdout


def test_example_bridge_mqtt_survives_its_broker_restart() -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    r = subprocess.run([sys.executable, "-m", "examples.bridge_mqtt", "--count", "10"],
                       cwd=REPO, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "(20 of 20, none lost)" in r.stdout and "inbound:" in r.stdout


def test_example_bridge_mqtt_says_when_no_broker_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    r = subprocess.run([sys.executable, "-m", "examples.bridge_mqtt", "--port", str(port)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no MQTT broker answers" in r.stderr, (r.stdout, r.stderr)
