"""A secured mesh with a mesh authority: CURVE everywhere, signed node keys, permissions.

    python -m examples.secured_mesh

One-time setup (what ``mesh ca init`` / ``mesh keygen`` / ``mesh ca sign`` do on the command
line): a mesh authority (an Ed25519 key) signs a certificate for each node, binding its node id
to its CURVE public key and listing what it may do. Every node trusts the authority, not a list
of keys. Then:

* the sensor (allowed ``publish:sensors.*``) and the aggregator (``subscribe`` and ``replay``
  of ``sensors.*``) join over CURVE and readings flow, encrypted on the wire;
* an intruder with a valid CURVE key but no certificate is refused in the handshake, and the
  sensor's ``node.stats()`` counts the refusal.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from mesh.node import Node, load_node_id
from mesh.security import SecurityConfig
from mesh.security.authority import Authority
from mesh.security.keys import generate_keypair, write_keypair
from patterns.pubsub import Publisher, Start, Subscriber

RULES = {
    "sensor": ["publish:sensors.*", "replay:sensors.*"],
    "aggregator": ["subscribe:sensors.*", "replay:sensors.*"],
}


def wait(cond: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        time.sleep(0.01)


def main(tmp: str) -> None:
    root = Path(tmp)
    ca = Authority.init(root / "ca")  # keep ca.secret offline in real life
    certs = root / "certs"
    certs.mkdir()
    keys: dict[str, str] = {}
    for name in ("sensor", "aggregator", "intruder"):
        kp = generate_keypair()
        write_keypair(root / "keys", name, kp)
        keys[name] = kp.public
        (root / name).mkdir()
        node_id = load_node_id(root / name)  # the id the certificate binds the key to
        if name in RULES:
            cert = ca.sign(node_id, kp.public, permissions=RULES[name], valid_s=3600)
            (certs / f"{name}.cert").write_bytes(cert.raw)

    def security(name: str, **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=root / "keys" / f"{name}.key_secret",
                              authority=root / "ca" / "ca.pub", certs_dir=certs, **kw)

    with Node(data_dir=root / "sensor", name="sensor", interface="127.0.0.1", mdns=False,
              security=security("sensor")) as sensor, \
            Publisher(sensor, "sensors.temp") as pub:
        ep = sensor.info().endpoints["control"][0]
        for i in range(5):
            pub.publish({"c": 20 + i}, type="reading")
        # Static peers are dialled before anything was announced: CURVE needs the key up front.
        with Node(data_dir=root / "aggregator", name="aggregator", interface="127.0.0.1",
                  mdns=False, static_peers=(ep,),
                  security=security("aggregator", peer_keys={ep: keys["sensor"]})) as agg, \
                Subscriber(agg, "sensors.", start=Start.beginning()) as sub:
            got = [sub.recv(timeout=10) for _ in range(5)]
            print("aggregator got over CURVE:", [e.data if e else None for e in got])
            assert all(e is not None for e in got)

        with Node(data_dir=root / "intruder", name="intruder", interface="127.0.0.1",
                  mdns=False, static_peers=(ep,),
                  security=security("intruder", peer_keys={ep: keys["sensor"]})):
            wait(lambda: sensor.stats().get("security_handshake_failed_auth", 0) >= 1,
                 "the intruder's refusal")
            refused = {k: v for k, v in sensor.stats().items()
                       if k.startswith("security_") and v}
            print("intruder refused; sensor counts:", refused)
            assert sensor.peers.get(load_node_id(root / "intruder")) is None


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(d)
