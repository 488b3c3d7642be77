"""Key rotation without downtime, on two real secured nodes (allowlist mode).

1. The allowlist holds a's key and BOTH of b's keys (old and new): the overlap.
2. b switches to its new key (same node id, same data dir); a keeps running and serving, and
   the mesh works in both directions with b's new key.
3. b's old key is removed from the allowlist (reloaded live): a client holding the old key is
   refused in the handshake and counted; b with the new key keeps working.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import zmq

from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from patterns.reqrep.client import Client
from patterns.reqrep.service import Service
from tests.util import unique, wait_until

ALL = {"*": ("*:*",)}


def test_rotate_b_with_overlap_then_old_key_refused(tmp_path: Path,
                                                    zctx: zmq.Context[Any]) -> None:
    keys = {n: generate_keypair() for n in ("a", "b_old", "b_new")}
    allow = tmp_path / "allow"
    allow.mkdir()
    for n, kp in keys.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", allow / f"{n}.key")
    m = unique("rot")
    svc_a, svc_b = unique("sa"), unique("sb")

    def sec(key: str, **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=tmp_path / "keys" / f"{key}.key_secret",
                              allowlist_dir=allow, permissions=ALL, **kw)

    def node_b(key: str, ep: str) -> Node:
        return Node(data_dir=tmp_path / "b", name="b", mesh=m, mdns=False, transports=("tcp",),
                    interface="127.0.0.1", static_peers=(ep,),
                    security=sec(key, peer_keys={ep: keys["a"].public}))

    with Node(data_dir=tmp_path / "a", name="a", mesh=m, mdns=False, transports=("tcp",),
              interface="127.0.0.1", security=sec("a")) as a, \
            Service(a, svc_a, lambda req: ("a", req.payload)), Client(a) as ca:
        ep = a.info().endpoints["control"][0]
        b = node_b("b_old", ep)
        try:
            sb = Service(b, svc_b, lambda req: ("b", req.payload))
            wait_until(lambda: b.who_offers("service", svc_a) and a.who_offers("service", svc_b),
                       5, what="old-key mesh")
            with Client(b) as cb:
                assert cb.request(svc_a, 1, timeout=5.0) == ["a", 1]
            assert ca.request(svc_b, 2, timeout=5.0) == ["b", 2]
            b_id = b.id
            sb.close()
        finally:
            b.close()
        # 2. b switches keys; a never stops (it still serves and holds its client open)
        b = node_b("b_new", ep)
        try:
            assert b.id == b_id and b.info().public_key == keys["b_new"].public
            sb = Service(b, svc_b, lambda req: ("b2", req.payload))
            wait_until(lambda: (a.peers.get(b.id) is not None
                                and a.peers.get(b.id).public_key  # type: ignore[union-attr]
                                == keys["b_new"].public), 5, what="a learns b's new key")
            with Client(b) as cb:
                assert cb.request(svc_a, 3, timeout=5.0) == ["a", 3]
            # a's long-lived client follows b to its new key and endpoint
            assert ca.request(svc_b, 4, timeout=5.0) == ["b2", 4]
            # 3. end of the overlap: the old key leaves the allowlist (no restart of a)
            (allow / "b_old.key").unlink()
            refused_before = a.stats().get("security_zap_refused_unknown", 0)
            old = zctx.socket(zmq.DEALER)
            old.setsockopt(zmq.LINGER, 0)
            old_kp = keys["b_old"]
            assert old_kp.secret is not None
            old.curve_publickey = old_kp.public.encode()
            old.curve_secretkey = old_kp.secret.encode()
            old.curve_serverkey = keys["a"].public.encode()
            old.connect(ep)
            old.send_multipart([b"x", b"y"])
            wait_until(lambda: a.stats().get("security_zap_refused_unknown", 0) > refused_before
                       and a.stats().get("security_handshake_failed_auth", 0) >= 1, 5,
                       what="old key refused")
            old.close()
            # the new key keeps working after the old one is gone
            with Client(b) as cb:
                assert cb.request(svc_a, 5, timeout=5.0) == ["a", 5]
            assert ca.request(svc_b, 6, timeout=5.0) == ["b2", 6]
            sb.close()
        finally:
            b.close()
