"""Mesh authority mode on real nodes, and a wire capture showing no payload in clear."""

from __future__ import annotations

import selectors
import socket
import threading
from pathlib import Path
from typing import Any

import zmq

from mesh import control
from mesh.control import Hello
from mesh.node import Node
from mesh.peers import PeerInfo
from mesh.security import SecurityConfig
from mesh.security.authority import Authority
from mesh.security.keys import Keypair, generate_keypair, write_keypair
from tests.util import unique, wait_until


class RecordingProxy:
    """A userspace TCP proxy on 127.0.0.1 that keeps every byte it forwards (a capture)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.captured = bytearray()
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self._lsock.setblocking(False)
        self.port = self._lsock.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._lsock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def bytes(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def _run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                s: Any = key.fileobj
                if s is self._lsock:
                    c, _ = s.accept()
                    u = socket.create_connection(self.target)
                    for x, y in ((c, u), (u, c)):
                        x.setblocking(False)
                        pairs[x] = y
                        self._sel.register(x, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    peer = pairs.pop(s)
                    pairs.pop(peer, None)
                    for x in (s, peer):
                        try:
                            self._sel.unregister(x)
                        except (KeyError, ValueError):
                            pass
                        x.close()
                    continue
                with self._lock:
                    self.captured += data
                pairs[s].sendall(data)
        for s in list(pairs):
            s.close()
        self._lsock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _tcp(ep: str) -> tuple[str, int]:
    host, port = ep[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


def _node(tmp: Path, name: str, mesh: str, sec: SecurityConfig, **kw: Any) -> Node:
    return Node(data_dir=tmp / name, name=name, mesh=mesh, mdns=False, transports=("tcp",),
                interface="127.0.0.1", security=sec, **kw)


def test_capture_shows_no_payload_in_clear(tmp_path: Path) -> None:
    keys = {n: generate_keypair() for n in ("a", "b")}
    allow = tmp_path / "allow"
    for n, kp in keys.items():
        write_keypair(tmp_path / "keys", n, kp)
        write_keypair(allow, n, Keypair(kp.public, kp.secret))
        (allow / f"{n}.key_secret").unlink()
    m = unique("cap")
    secret_ctl, secret_data = b"CONTROL-SECRET-4f1c9e", b"DATA-SECRET-7d2a11"

    def sec(n: str, **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=tmp_path / "keys" / f"{n}.key_secret",
                              allowlist_dir=allow, **kw)

    with _node(tmp_path, "a", m, sec("a")) as a:
        pull = a.socket(zmq.PULL, "work")
        (work_ep,) = a.bind(pull, "work")
        ctl_proxy = RecordingProxy(_tcp(a.info().endpoints["control"][0]))
        data_proxy = RecordingProxy(_tcp(work_ep))
        try:
            ctl_ep = f"tcp://127.0.0.1:{ctl_proxy.port}"
            with _node(tmp_path, "b", m, sec("b", peer_keys={ctl_ep: keys["a"].public}),
                       static_peers=(ctl_ep,)) as b:
                wait_until(lambda: b.peers.get(a.id) is not None, 5, what="join via proxy")
                got: list[Any] = []
                a.handle("x-cap", lambda peer, body: got.append(body))
                b.send(a.id, "x-cap", secret_ctl)
                wait_until(lambda: got, 5, what="control message through the proxy")
                assert got == [secret_ctl]
                # a pattern-style connect through the proxy: the key comes from the announcement
                via = PeerInfo(node_id=a.id, name="a", mesh=m, public_key=keys["a"].public,
                               endpoints={"work": (f"tcp://127.0.0.1:{data_proxy.port}",)})
                push = b.socket(zmq.PUSH, "work")
                ep = b.connect_endpoint(via, "work")
                assert ep is not None
                push.connect(ep)
                push.send(secret_data)
                assert pull.poll(5000) and pull.recv() == secret_data
        finally:
            ctl_proxy.close()
            data_proxy.close()
    wire = ctl_proxy.bytes() + data_proxy.bytes()
    assert len(ctl_proxy.bytes()) > 200 and len(data_proxy.bytes()) > 100  # we did capture
    assert b"CURVE" in wire  # ZMTP greeting names the mechanism
    for needle in (secret_ctl, secret_data, b"SECRET", a.id.encode(), m.encode()):
        assert needle not in wire, needle


def _raw_hello(ctx: zmq.Context[Any], ep: str, kp: Keypair, server: str, node_id: str,
               mesh: str) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, node_id.encode())
    assert kp.secret is not None
    s.curve_publickey, s.curve_secretkey = kp.public.encode(), kp.secret.encode()
    s.curve_serverkey = server.encode()
    s.connect(ep)
    info = PeerInfo(node_id=node_id, name="raw", mesh=mesh, public_key=kp.public,
                    endpoints={"control": ("tcp://127.0.0.1:1",)})
    body = control.encode_body(control.hello_to_wire(Hello(info)), 1 << 20)
    s.send_multipart(control.encode_frames([(control.HELLO, body)]))
    return s


def test_authority_mode_certificates(tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    ca = Authority.init(tmp_path / "ca")
    certs = tmp_path / "certs"
    certs.mkdir()
    kp = {n: generate_keypair() for n in ("a", "b", "good", "revoked", "expired", "nocert")}
    for n in ("a", "b"):
        write_keypair(tmp_path / "keys", n, kp[n])
    ids = {n: f"{i:032x}" for i, n in enumerate(kp, start=1)}
    for n in ("a", "b", "good", "revoked"):
        (certs / f"{n}.cert").write_bytes(ca.sign(ids[n], kp[n].public, valid_s=3600).raw)
    exp = ca.sign(ids["expired"], kp["expired"].public, valid_s=1)
    (certs / "expired.cert").write_bytes(exp.raw)
    revoked_serial = ca.verify((certs / "revoked.cert").read_bytes()).serial
    (certs / "revoked.crl").write_bytes(ca.revoke([revoked_serial]).raw)
    m = unique("ca")

    def sec(n: str, **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=tmp_path / "keys" / f"{n}.key_secret",
                              authority=ca.directory / "ca.pub", certs_dir=certs, **kw)

    with _node(tmp_path, "a", m, sec("a")) as a:
        ep, apub = a.info().endpoints["control"][0], kp["a"].public
        with _node(tmp_path, "b", m, sec("b", peer_keys={ep: apub}), static_peers=(ep,)) as b:
            wait_until(lambda: a.peers.get(b.id) is not None and b.peers.get(a.id) is not None,
                       5, what="certified nodes join")
        # wait for the 1 s certificate to expire (a condition, not a fixed sleep)
        import time
        wait_until(lambda: time.time() >= exp.not_after, 3, what="certificate expiry")
        socks = [_raw_hello(zctx, ep, kp[n], apub, ids[n], m)
                 for n in ("revoked", "expired", "nocert", "good")]
        wait_until(lambda: a.peers.get(ids["good"]) is not None, 5, what="certified raw peer")
        wait_until(lambda: a.stats().get("security_handshake_failed_auth", 0) >= 3, 5,
                   what="three refusals")
        for n in ("revoked", "expired", "nocert"):
            assert a.peers.get(ids[n]) is None
        st = a.stats()
        assert st.get("security_cert_revoked", 0) >= 1
        assert st.get("security_zap_refused_unknown", 0) + st.get(
            "security_zap_refused_expired", 0) >= 3
        for s in socks:
            s.close()
