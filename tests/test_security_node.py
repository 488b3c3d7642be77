"""CURVE on real nodes: two secured nodes join; strangers are refused in the handshake.

Real sockets on 127.0.0.1, a raw pyzmq client for the misbehaving peers.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh import control
from mesh.control import Hello
from mesh.errors import ConfigError
from mesh.node import Node
from mesh.peers import PeerInfo, PeerState
from mesh.security import SecurityConfig
from mesh.security.keys import Keypair, generate_keypair, write_keypair
from tests.util import unique, wait_until


def _node(tmp: Path, name: str, mesh: str, sec: SecurityConfig | None, **kw: Any) -> Node:
    return Node(data_dir=tmp / name, name=name, mesh=mesh, mdns=False, transports=("tcp",),
                interface="127.0.0.1", security=sec, **kw)


def _ctl(node: Node) -> str:
    return node.info().endpoints["control"][0]


@pytest.fixture
def mesh_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Keypair]]]:
    allow = tmp_path / "allow"
    keys = {n: generate_keypair() for n in ("a", "b", "c")}
    for n, kp in keys.items():
        write_keypair(tmp_path / "keys", n, kp)
    allow.mkdir()
    for n in ("a", "b"):  # c is a stranger until the test allows it
        shutil.copy(tmp_path / "keys" / f"{n}.key", allow / f"{n}.key")
    yield tmp_path, keys


def _sec(tmp: Path, name: str, **kw: Any) -> SecurityConfig:
    return SecurityConfig(key_file=tmp / "keys" / f"{name}.key_secret",
                          allowlist_dir=tmp / "allow", **kw)


def test_security_requires_a_trust_source() -> None:
    with pytest.raises(ConfigError, match="deny by default"):
        SecurityConfig()


def test_two_secure_nodes_join_and_exchange(mesh_env: tuple[Path, dict[str, Keypair]]) -> None:
    tmp, keys = mesh_env
    m = unique("sec")
    with _node(tmp, "a", m, _sec(tmp, "a")) as a:
        assert a.info().public_key == keys["a"].public
        ep = _ctl(a)
        with _node(tmp, "b", m, _sec(tmp, "b", peer_keys={ep: keys["a"].public}),
                   static_peers=(ep,)) as b:
            wait_until(lambda: a.peers.get(b.id) is not None and b.peers.get(a.id) is not None,
                       5, what="secure join")
            got: list[Any] = []
            a.handle("x-echo", lambda peer, body: got.append((peer, body)))
            b.send(a.id, "x-echo", {"hi": 1})
            wait_until(lambda: got, 5, what="control message over CURVE")
            assert got == [(b.id, {"hi": 1})]
            assert a.peers.get(b.id).public_key == keys["b"].public  # type: ignore[union-attr]


def test_static_peer_without_key_not_dialled(mesh_env: tuple[Path, dict[str, Keypair]]) -> None:
    tmp, _ = mesh_env
    m = unique("sec")
    with _node(tmp, "a", m, _sec(tmp, "a")) as a, \
            _node(tmp, "b", m, _sec(tmp, "b"), static_peers=(_ctl(a),)) as b:
        # no plaintext fallback: without a server key the DEALER is never connected
        wait_until(lambda: b.stats().get("dial_errors", 0) >= 1, 5, what="dial refused")
        assert b.stats().get("security_connect_no_key", 0) >= 1
        assert a.peers.get(b.id) is None


def _raw_dealer(ctx: zmq.Context[Any], ep: str, *, client: Keypair | None, server: str | None,
                ident: bytes) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, ident)
    if client is not None and server is not None:
        assert client.secret is not None
        s.curve_publickey = client.public.encode()
        s.curve_secretkey = client.secret.encode()
        s.curve_serverkey = server.encode()
    s.connect(ep)
    return s


def _failed(node: Node) -> int:
    # libzmq reports a broken handshake as PROTOCOL or NO_DETAIL depending on timing
    st = node.stats()
    return int(st.get("security_handshake_failed_protocol", 0)
               + st.get("security_handshake_failed_no_detail", 0))


def _hello(node_id: str, mesh: str, key: str | None) -> list[bytes]:
    info = PeerInfo(node_id=node_id, name="raw", mesh=mesh, public_key=key,
                    endpoints={"control": ("tcp://127.0.0.1:1",)})
    body = control.encode_body(control.hello_to_wire(Hello(info)), 1 << 20)
    return control.encode_frames([(control.HELLO, body)])


def test_plaintext_unknown_and_mismatched_peers_refused(
    mesh_env: tuple[Path, dict[str, Keypair]], zctx: zmq.Context[Any]
) -> None:
    tmp, keys = mesh_env
    m = unique("sec")
    with _node(tmp, "a", m, _sec(tmp, "a")) as a:
        ep, apub = _ctl(a), keys["a"].public
        # 1. plaintext (NULL) client against the CURVE server
        plain = _raw_dealer(zctx, ep, client=None, server=None, ident=b"1" * 32)
        plain.send_multipart(_hello("1" * 32, m, None))
        wait_until(lambda: _failed(a) >= 1, 5, what="plaintext refused")
        # 2. CURVE client with a key nobody allowed
        stranger = _raw_dealer(zctx, ep, client=keys["c"], server=apub, ident=b"2" * 32)
        stranger.send_multipart(_hello("2" * 32, m, keys["c"].public))
        wait_until(lambda: a.stats().get("security_zap_refused_unknown", 0) >= 1
                   and a.stats().get("security_handshake_failed_auth", 0) >= 1, 5,
                   what="unknown key refused")
        # 3. an allowed key whose HELLO announces another key (impersonation attempt)
        liar = _raw_dealer(zctx, ep, client=keys["b"], server=apub, ident=b"3" * 32)
        liar.send_multipart(_hello("3" * 32, m, keys["c"].public))
        wait_until(lambda: a.stats().get("security_key_mismatch", 0) >= 1, 5,
                   what="announced key mismatch refused")
        for s in (plain, stranger, liar):
            s.close()
        assert len(a.peers.list()) == 0
        # 4. the same allowed key, honest HELLO: accepted (the node stayed healthy)
        honest = _raw_dealer(zctx, ep, client=keys["b"], server=apub, ident=b"4" * 32)
        honest.send_multipart(_hello("4" * 32, m, keys["b"].public))
        wait_until(lambda: a.peers.get("4" * 32) is not None, 5, what="honest peer joins")
        honest.close()
        # 5. allowlist reloaded without restart: c is allowed now (a fresh socket: a socket
        # refused by ZAP stays refused)
        shutil.copy(tmp / "keys" / "c.key", tmp / "allow" / "c.key")
        later = _raw_dealer(zctx, ep, client=keys["c"], server=apub, ident=b"5" * 32)
        later.send_multipart(_hello("5" * 32, m, keys["c"].public))
        wait_until(lambda: a.peers.get("5" * 32) is not None, 5, what="reloaded allowlist")
        later.close()
        assert a.reactor.errors == 0


def test_wrong_server_key_gets_nothing(
    mesh_env: tuple[Path, dict[str, Keypair]], zctx: zmq.Context[Any]
) -> None:
    """A client that expects another server key (a node impersonating the announced one)."""
    tmp, keys = mesh_env
    m = unique("sec")
    with _node(tmp, "a", m, _sec(tmp, "a")) as a:
        s = _raw_dealer(zctx, _ctl(a), client=keys["b"], server=keys["c"].public,
                        ident=b"6" * 32)
        s.send_multipart(_hello("6" * 32, m, keys["b"].public))
        wait_until(lambda: _failed(a) >= 1, 5, what="wrong server key refused")
        s.close()
        assert a.peers.get("6" * 32) is None


def test_security_off_by_default(tmp_path: Path) -> None:
    m = unique("plain")
    with _node(tmp_path, "p", m, None) as p:
        assert p.security is None and p.info().public_key is None
        s = p.socket(zmq.PULL, "x")
        assert s.get(zmq.MECHANISM) == zmq.NULL


def test_pattern_sockets_get_curve(mesh_env: tuple[Path, dict[str, Keypair]]) -> None:
    """Any socket made by node.socket()/bound by node.bind() is CURVE; connect uses the key
    the peer announced (what patterns do: connect_endpoint then sock.connect)."""
    tmp, _ = mesh_env
    m = unique("sec")
    with _node(tmp, "a", m, _sec(tmp, "a")) as a, _node(tmp, "b", m, _sec(tmp, "b")) as b:
        pull = a.socket(zmq.PULL, "work")
        a.bind(pull, "work")
        assert pull.get(zmq.MECHANISM) == zmq.CURVE and pull.get(zmq.CURVE_SERVER) == 1
        push = b.socket(zmq.PUSH, "work")
        ep = b.connect_endpoint(a.info(), "work")
        assert ep is not None
        push.connect(ep)
        push.send(b"payload")
        assert pull.poll(5000) and pull.recv() == b"payload"
        no_key = PeerInfo(node_id="f" * 32, name="x", mesh=m, endpoints=a.info().endpoints)
        assert b.connect_endpoint(no_key, "work") is None
        assert b.stats()["security_peer_without_key"] == 1
        assert a.peers.get(b.id) is None or a.peers.get(b.id).state is not PeerState.GONE


def test_permits_deny_by_default(mesh_env: tuple[Path, dict[str, Keypair]]) -> None:
    tmp, keys = mesh_env
    m = unique("sec")
    rules = {keys["b"].public: ["replay:sensors.*", "!replay:sensors.secret"]}
    with _node(tmp, "a", m, _sec(tmp, "a", permissions=rules)) as a:
        ep = _ctl(a)
        with _node(tmp, "b", m, _sec(tmp, "b", peer_keys={ep: keys["a"].public}),
                   static_peers=(ep,)) as b:
            wait_until(lambda: a.peers.get(b.id) is not None, 5, what="join")
            assert a.permits(b.id, "replay", "sensors.t1")
            assert not a.permits(b.id, "replay", "sensors.secret")
            assert not a.permits(b.id, "subscribe", "sensors.t1")
            assert not a.permits("0" * 32, "replay", "sensors.t1")  # unknown peer
            assert a.stats()["security_denied_replay"] == 2
    with _node(tmp, "p", m, None) as p:
        assert p.permits("0" * 32, "publish", "anything")  # security off: no checks
