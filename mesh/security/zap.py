"""ZAP: who may complete a CURVE handshake with this node.

One :class:`zmq.auth.thread.ThreadAuthenticator` per node context answers the ZAP requests of
every bound socket (libzmq asks it during the handshake, before any message passes). Its
decision comes from a :class:`TrustStore`:

- allowlist mode: a directory of ``*.key`` files (ZeroMQ certificate format), re-read when any
  file in it changes (checked at each handshake: handshakes are rare, a stat is cheap), so keys
  are added and removed with no restart;
- authority mode: a directory of ``*.cert`` files signed by the mesh authority, plus an optional
  signed ``revoked.crl``; a key is accepted only while its certificate verifies (signature,
  validity window at the time of the handshake, revocation).

Both may be on at once (a key passes when either accepts it), which is how a mesh migrates from
one to the other. Refusals are counted here (``zap_refused_*``); handshakes that never reach ZAP
(a plaintext peer, a wrong server key) are counted from socket monitor events by the node.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from mesh.budget import LogLimiter
from mesh.errors import CertificateError, KeyFileError
from mesh.security.authority import CERT_SUFFIX, CRL_NAME, Certificate, RevocationList, TrustAnchor
from mesh.security.keys import load_public_keys

__all__ = ["ZAP_DOMAIN", "TrustStore", "ZapAuthenticator"]

#: The ZAP domain of every mesh socket (a node's handler answers only this domain).
ZAP_DOMAIN = "zeromesh"

log = logging.getLogger(__name__)


def _dir_signature(d: Path) -> tuple[Any, ...]:
    try:
        st = d.stat()
        files = tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                             for e in os.scandir(d) if e.is_file()))
    except OSError:
        return ("missing",)
    return (st.st_mtime_ns, files)


class TrustStore:
    """Decides whether a CURVE public key may connect (thread-safe).

    Args:
        allowlist_dir: directory of authorised ``*.key`` files, or None.
        anchor: the authority's public key, or None.
        certs_dir: directory of ``*.cert`` files (and ``revoked.crl``), needed with ``anchor``.
        trusted_keys: keys always accepted (e.g. this node's own key, for local sockets).
        clock: wall clock (certificate expiry is wall-clock time).
    """

    def __init__(self, *, allowlist_dir: str | Path | None = None,
                 anchor: TrustAnchor | None = None, certs_dir: str | Path | None = None,
                 trusted_keys: Iterable[str] = (), clock: Any = time.time) -> None:
        self.allowlist_dir = Path(allowlist_dir) if allowlist_dir is not None else None
        self.anchor = anchor
        self.certs_dir = Path(certs_dir) if certs_dir is not None else None
        self.trusted = frozenset(trusted_keys)
        self._clock = clock
        self._lock = threading.Lock()
        self._allow: dict[str, str] = {}
        self._allow_sig: tuple[Any, ...] | None = None
        self._certs: dict[str, Certificate] = {}  # by public key
        self._certs_by_node: dict[str, Certificate] = {}
        self._certs_sig: tuple[Any, ...] | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._log = LogLimiter(log)  # a handshake is remote-triggered: so are its log lines

    # --- reloading -------------------------------------------------------------------------------

    def _reload(self) -> None:
        if self.allowlist_dir is not None:
            sig = _dir_signature(self.allowlist_dir)
            if sig != self._allow_sig:
                try:
                    self._allow = load_public_keys(self.allowlist_dir)
                except KeyFileError as exc:
                    log.warning("allowlist unreadable, refusing everybody: %s", exc)
                    self._allow = {}
                self._allow_sig = sig
                self.counters["allowlist_reloads"] += 1
        if self.anchor is not None and self.certs_dir is not None:
            sig = _dir_signature(self.certs_dir)
            if sig != self._certs_sig:
                self._load_certs()
                self._certs_sig = sig
                self.counters["certs_reloads"] += 1

    def _load_certs(self) -> None:
        assert self.anchor is not None and self.certs_dir is not None
        crl: RevocationList | None = None
        crl_path = self.certs_dir / CRL_NAME
        if crl_path.exists():
            try:
                crl = self.anchor.verify_crl(crl_path.read_bytes())
            except (OSError, CertificateError) as exc:
                # A revocation list we cannot trust: fail closed (accept nobody) rather than
                # let revoked nodes back in.
                log.warning("revocation list %s refused: %s; refusing every certificate",
                            crl_path, exc)
                self.counters["bad_crl"] += 1
                self._certs, self._certs_by_node = {}, {}
                return
        certs: dict[str, Certificate] = {}
        by_node: dict[str, Certificate] = {}
        for f in sorted(self.certs_dir.glob(f"*{CERT_SUFFIX}")):
            try:
                data = f.read_bytes()
                # Validity is checked again at each handshake; here only what never changes.
                cert = self.anchor.verify(data, now=self._clock(), revoked=crl)
            except CertificateError as exc:
                self.counters[f"cert_{exc.reason}"] += 1
                # An expired certificate may be renewed by a newer file: keep looking.
                continue
            except OSError:
                self.counters["cert_unreadable"] += 1
                continue
            old = certs.get(cert.public_key)
            if old is None or cert.not_after > old.not_after:
                certs[cert.public_key] = cert
            prev = by_node.get(cert.node_id)
            if prev is None or cert.not_after > prev.not_after:
                by_node[cert.node_id] = cert
        self._certs, self._certs_by_node = certs, by_node

    # --- queries ---------------------------------------------------------------------------------

    def allowed(self, key: str) -> bool:
        """True when ``key`` (Z85) may connect now; counts the decision."""
        with self._lock:
            self._reload()
            if key in self.trusted or key in self._allow:
                self.counters["zap_allowed"] += 1
                return True
            cert = self._certs.get(key)
            if cert is not None:
                if self._clock() < cert.not_after:
                    self.counters["zap_allowed"] += 1
                    return True
                self.counters["zap_refused_expired"] += 1
                return False
            self.counters["zap_refused_unknown"] += 1
            return False

    def certificate(self, key: str) -> Certificate | None:
        """The verified certificate of ``key``, or None."""
        with self._lock:
            self._reload()
            return self._certs.get(key)

    def key_of_node(self, node_id: str) -> str | None:
        """The CURVE key a certificate binds to ``node_id`` (authority mode), or None."""
        with self._lock:
            self._reload()
            cert = self._certs_by_node.get(node_id)
            return cert.public_key if cert is not None else None

    # pyzmq's credentials-provider protocol
    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP callback (called on the authenticator thread with a Z85 key)."""
        try:
            return self.allowed(key.decode("ascii"))
        except Exception:  # never let a bug turn into "allow": refuse and log
            self._log.log(logging.ERROR, "zap_errors", "trust store failed; refusing %r",
                          key[:40], exc_info=True)
            self.counters["zap_errors"] += 1
            return False


class ZapAuthenticator:
    """The ZAP handler of one ZeroMQ context, backed by a :class:`TrustStore`.

    Must be started before any CURVE server socket of the context binds (libzmq accepts every
    client when no ZAP handler listens).
    """

    def __init__(self, context: zmq.Context[Any], store: TrustStore) -> None:
        self.store = store
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("mesh.security.zap.auth"))

    def start(self) -> None:
        """Start the authenticator thread."""
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.store)

    def stop(self) -> None:
        """Stop it (before the context terminates)."""
        self._auth.stop()
