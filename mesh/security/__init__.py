"""Security: CURVE on every socket, trust (allowlist or mesh authority), permissions, at rest.

Off by default. ``Node(..., security=SecurityConfig(...))`` turns it on for every socket the
node makes (``node.socket``): bound sockets are CURVE servers behind the node's ZAP handler,
connecting sockets are CURVE clients that learn each peer's server key from what the peer
announced (``node.connect_endpoint``). There is no plaintext fallback: a peer without a known
key is not connected to at all.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from mesh.budget import LogLimiter
from mesh.errors import AuthenticationFailed, ConfigError
from mesh.limits import RateLimit, TokenBuckets
from mesh.security.atrest import load_or_create_atrest_key
from mesh.security.authority import TrustAnchor
from mesh.security.keys import Keypair, is_z85_key, load_or_create_keypair
from mesh.security.perms import PermissionTable
from mesh.security.signing import EventSigner, EventVerifier, load_or_create_signing_key
from mesh.security.zap import ZAP_DOMAIN, TrustStore, ZapAuthenticator

__all__ = ["NodeSecurity", "SecureSocket", "SecurityConfig"]

log = logging.getLogger(__name__)

#: Monitor events counted on bound sockets: handshakes that failed (refusals).
HANDSHAKE_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed_no_detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth",
}
_MONITOR_MASK = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                 | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_MONITOR_STOPPED)


@dataclass(frozen=True)
class SecurityConfig:
    """Security settings of a node (``NodeConfig.security``).

    At least one source of trust is required: ``allowlist_dir``, ``authority`` (with
    ``certs_dir``) or ``trusted_keys``.

    Attributes:
        key_file: the node's secret key file (``*.key_secret``, mode 0600); None means
            ``<data_dir>/node.key_secret``, created on first start.
        allowlist_dir: directory of authorised ``*.key`` files (reloaded on change).
        authority: the mesh authority's public key file (``ca.pub``).
        certs_dir: directory of authority-signed ``*.cert`` files and ``revoked.crl``.
        trusted_keys: Z85 keys always accepted.
        peer_keys: server key per configured endpoint (``static_peers``/``seeds`` are dialled
            before the peer has announced anything, and CURVE needs the server key up front).
        permissions: principal (node id, Z85 key or ``*``) -> rules; certificates add theirs.
        monitor: count handshake failures on bound sockets from socket monitor events.
        atrest: encrypt every durable log in the node's data directory at rest
            (ChaCha20-Poly1305 per record, ``mesh.security.atrest``).
        atrest_key_file: the at-rest key (32 random bytes, base64, mode 0600); None means
            ``<data_dir>/atrest.key``, created on first start. Losing it loses the logs.
        rate_limit: per-peer token bucket on the control channel's ingress (keyed by the
            sender's CURVE key); excess multiparts are dropped and counted
            (``security_rate_limited``).
        sign_events: load (or create) this node's Ed25519 event-signing key
            (``NodeSecurity.signer``, mesh.security.signing).
        signing_key_file: that key; None means ``<data_dir>/sign.key`` (0600).
        event_keys: name -> base64 Ed25519 public key of publishers whose signed events this
            node verifies (``NodeSecurity.verifier``; each key is also known by its key id).
    """

    key_file: str | Path | None = None
    allowlist_dir: str | Path | None = None
    authority: str | Path | None = None
    certs_dir: str | Path | None = None
    trusted_keys: tuple[str, ...] = ()
    peer_keys: Mapping[str, str] = field(default_factory=dict)
    permissions: Mapping[str, Sequence[str]] = field(default_factory=dict)
    monitor: bool = True
    atrest: bool = False
    atrest_key_file: str | Path | None = None
    rate_limit: RateLimit = field(default_factory=RateLimit)
    sign_events: bool = False
    signing_key_file: str | Path | None = None
    event_keys: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.allowlist_dir is None and self.authority is None and not self.trusted_keys:
            raise ConfigError("security needs allowlist_dir, authority or trusted_keys "
                              "(deny by default: with none, nobody could connect)")
        if (self.authority is None) != (self.certs_dir is None):
            raise ConfigError("authority and certs_dir go together")
        for k in (*self.trusted_keys, *self.peer_keys.values()):
            if not is_z85_key(k):
                raise ConfigError(f"not a Z85 CURVE key: {k!r}")
        PermissionTable(self.permissions)  # validates the rules now, not at first use


class SecureSocket(zmq.Socket[Any]):
    """A socket whose ``connect`` sets the CURVE server key the node knows for the endpoint.

    Patterns call ``ep = node.connect_endpoint(peer, role)`` then ``sock.connect(ep)``; the
    first records the key ``peer`` announced for ``ep``, the second applies it. An endpoint
    with no known key is refused (no plaintext fallback).
    """

    _mesh_security: NodeSecurity | None = None

    def connect(self, addr: str) -> Any:
        """Connect with the endpoint's CURVE server key.

        Raises:
            AuthenticationFailed: no server key is known for ``addr``.
        """
        sec = self._mesh_security
        if sec is not None and self.get(zmq.CURVE_SERVER) == 0:
            ep = str(addr)
            key = sec.server_key(ep)
            if key is None:
                sec.count("connect_no_key")
                raise AuthenticationFailed(f"no CURVE server key known for {ep}; "
                                           "not connecting in plaintext", peer=ep)
            self.setsockopt(zmq.CURVE_SERVERKEY, key.encode("ascii"))
        return super().connect(addr)


class NodeSecurity:
    """A node's security state: keypair, trust store, ZAP handler, endpoint keys, permissions.

    Raises:
        KeyFileError: the key file is too open or malformed.
        ConfigError: bad configuration.
    """

    def __init__(self, config: SecurityConfig, data_dir: Path, context: zmq.Context[Any]) -> None:
        self.config = config
        self.keypair: Keypair = load_or_create_keypair(
            config.key_file if config.key_file is not None else data_dir / "node.key_secret")
        anchor = TrustAnchor.from_file(config.authority) if config.authority is not None else None
        self.store = TrustStore(
            allowlist_dir=config.allowlist_dir, anchor=anchor, certs_dir=config.certs_dir,
            # our own key: our sockets talk to each other (inproc/ipc) and to ourselves
            trusted_keys=(*config.trusted_keys, self.keypair.public),
        )
        self.permissions = PermissionTable(config.permissions)
        self.buckets = TokenBuckets(config.rate_limit)
        self.verifier = EventVerifier(config.event_keys)
        self.signer: EventSigner | None = None
        if config.sign_events:
            self.signer = EventSigner(load_or_create_signing_key(
                config.signing_key_file if config.signing_key_file is not None
                else data_dir / "sign.key"))
            self.verifier.add(self.signer.public_key)
        self.atrest_key: bytes | None = None
        if config.atrest:
            self.atrest_key = load_or_create_atrest_key(
                config.atrest_key_file if config.atrest_key_file is not None
                else data_dir / "atrest.key")
        self._ep_keys: dict[str, str] = dict(config.peer_keys)
        self._lock = threading.Lock()
        self.counters: collections.Counter[str] = collections.Counter()
        #: handshake failures are remote-triggered: logged per kind through a limiter
        self._log = LogLimiter(log)
        self.auth = ZapAuthenticator(context, self.store)
        self.auth.start()

    @property
    def public_key(self) -> str:
        """This node's CURVE public key (Z85)."""
        return self.keypair.public

    def count(self, key: str, n: int = 1) -> None:
        """Add to a counter (thread-safe)."""
        with self._lock:
            self.counters[key] += n

    def stats(self) -> dict[str, int]:
        """Counters of this node's security layer and its ZAP handler."""
        with self._lock:
            out = {f"security_{k}": v for k, v in self.counters.items()}
        out.update({f"security_{k}": v for k, v in self.store.counters.items()})
        return out

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set the node's keypair on a new socket (client or server decided at bind/connect)."""
        assert self.keypair.secret is not None
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keypair.public.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keypair.secret.encode("ascii"))
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode("ascii"))
        if isinstance(sock, SecureSocket):
            sock._mesh_security = self

    def make_server(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server before it binds (its peers are checked by ZAP)."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)

    def remember(self, endpoint: str, key: str | None) -> None:
        """Record the server key announced for ``endpoint``."""
        if key is not None and is_z85_key(key):
            self._ep_keys[endpoint] = key

    def server_key(self, endpoint: str) -> str | None:
        """The CURVE server key to use for ``endpoint``, or None."""
        return self._ep_keys.get(endpoint)

    def key_for_node(self, node_id: str) -> str | None:
        """The key a certificate binds to ``node_id`` (authority mode), or None."""
        return self.store.key_of_node(node_id)

    def principals(self, node_id: str | None, key: str | None) -> list[str | None]:
        """The names a peer is known by for permission checks (node id and key)."""
        if key is not None:
            cert = self.store.certificate(key)
            if cert is not None:
                self.permissions.set(key, cert.permissions)
        return [node_id, key]

    def allows(self, node_id: str | None, key: str | None, action: str, resource: str) -> bool:
        """True when the peer (``node_id`` / handshake ``key``) may do ``action`` on ``resource``."""
        return self.permissions.allows(self.principals(node_id, key), action, resource)

    def monitor_socket(self, sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
        """A monitor PAIR for ``sock``'s handshake failures (read it with :meth:`on_monitor`)."""
        return sock.get_monitor_socket(_MONITOR_MASK)

    def on_monitor(self, mon: zmq.Socket[Any]) -> bool:
        """Drain monitor events into counters; False when the monitored socket closed."""
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                ev = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return True
            event = int(ev["event"])
            name = HANDSHAKE_EVENTS.get(event)
            if name is not None:
                self.count(name)
                self._log.warning(name, "handshake refused (%s) on %s", name,
                                  ev.get("endpoint"))
            elif event == zmq.EVENT_MONITOR_STOPPED:
                return False

    def close(self) -> None:
        """Stop the ZAP handler (call before terminating the context)."""
        self.auth.stop()
