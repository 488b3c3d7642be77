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


def test_mesh_bridge_says_which_broker_it_cannot_reach_and_keeps_retrying(
        tmp_path: Path) -> None:
    import threading

    with socket.socket() as s:  # a port from the OS that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "bridge", "--data-dir", str(tmp_path / "br"),
         "--mesh", unique("dead"), "--no-mdns", "--interface", "127.0.0.1", "--name", "deadb",
         "--kind", "mqtt", "--broker", f"127.0.0.1:{port}", "--out", "d.>=d/#"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert proc.stderr is not None
    err = proc.stderr
    reader = threading.Thread(target=lambda: lines.extend(iter(err.readline, "")),
                              daemon=True)
    reader.start()
    try:
        said = wait_until(lambda: [ln for ln in lines if "cannot reach" in ln], 15,
                          what=lambda: lines)
        assert f"the MQTT broker 127.0.0.1:{port}" in said[0]
        assert "still retrying" in said[0] and "store-and-forward" in said[0]
        assert proc.poll() is None  # it keeps running (and retrying), it does not give up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_watch_reports_up_down_and_repeats_while_down() -> None:
    from mesh.cli.bridge_cmd import DEAD_AFTER_S, REPEAT_S, _BrokerWatch
    from patterns.bridge.config import config_from_mapping

    cfg = config_from_mapping({"name": "w", "kind": "nats", "nats": {"servers": ["nats://h:1"]},
                               "routes": [{"mesh": "a.>", "remote": "a.>",
                                           "direction": "out"}]})
    w = _BrokerWatch(cfg, now=0.0)
    assert w.update(False, 1.0) is None
    down = w.update(False, DEAD_AFTER_S + 0.1)
    assert down is not None and "NATS server nats://h:1" in down
    assert w.update(False, DEAD_AFTER_S + 1) is None  # said once, then every REPEAT_S
    assert w.update(False, DEAD_AFTER_S + REPEAT_S + 1) is not None
    assert w.update(True, 50.0) == "connected to the NATS server nats://h:1"
    assert w.update(True, 51.0) is None
    lost = w.update(False, 52.0)
    assert lost is not None and lost.startswith("lost the connection")


def test_the_readme_bridge_config_example_loads(tmp_path: Path) -> None:
    from patterns.bridge.config import load_config

    text = (Path(REPO) / "README.md").read_text()
    toml = text.split("```toml\n", 1)[1].split("```", 1)[0]
    f = tmp_path / "bridge.toml"
    f.write_text(toml)
    cfg = load_config(f)
    assert cfg.name == "site-bridge" and cfg.kind == "mqtt" and cfg.mqtt.port == 1883
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == "/etc/ssl/site-ca.pem"
    assert [(r.mesh, r.remote, r.direction) for r in cfg.routes] == [
        ("sensors.>", "site/sensors/#", "out"), ("cmd.*", "site/cmd/+", "in")]
