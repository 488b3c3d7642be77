"""A mesh authority: an Ed25519 key that signs node certificates and revocation lists.

A certificate binds a node id to its CURVE public key, with roles, permission rules and an
expiry. Files (docs/protocol.md)::

    <ca dir>/ca.secret     Ed25519 private key, 32 raw bytes, base64 (mode 0600)
    <ca dir>/ca.pub        Ed25519 public key, 32 raw bytes, base64 (what nodes trust)
    <ca dir>/serial        next serial number (text)
    <name>.cert            msgpack [body: bin, signature: bin]; body = msgpack map
    revoked.crl            msgpack [body: bin, signature: bin]; body = {"v", "issued", "serials"}

Certificates are tamper-proof on their own (only the authority's public key is trusted), so the
directory they are kept in needs no protection: anybody may copy them around.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh.errors import CertificateError, ConfigError, KeyFileError
from mesh.security.keys import check_secret_permissions, is_z85_key

__all__ = [
    "CERT_SUFFIX",
    "CRL_NAME",
    "Authority",
    "Certificate",
    "RevocationList",
    "TrustAnchor",
    "load_certificate_file",
]

CERT_VERSION = 1
CERT_SUFFIX = ".cert"
CRL_NAME = "revoked.crl"
_CA_SECRET = "ca.secret"
_CA_PUBLIC = "ca.pub"


@dataclass(frozen=True)
class Certificate:
    """A node certificate (already verified when it comes from :meth:`TrustAnchor.verify`).

    Attributes:
        serial: unique per authority.
        node_id: the node's id (32 hex chars) or a free-form principal name.
        public_key: the node's CURVE public key (Z85).
        roles: free-form role names.
        permissions: permission rules (``"<action>:<pattern>"``, see mesh.security.perms).
        not_before: unix seconds.
        not_after: unix seconds (expiry).
        raw: the signed file bytes.
    """

    serial: int
    node_id: str
    public_key: str
    roles: tuple[str, ...] = ()
    permissions: tuple[str, ...] = ()
    not_before: float = 0.0
    not_after: float = 0.0
    raw: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class RevocationList:
    """Revoked certificate serials, signed by the authority."""

    serials: frozenset[int]
    issued: float
    raw: bytes = field(default=b"", repr=False, compare=False)


def _b64_read(path: Path) -> bytes:
    try:
        raw = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise KeyFileError(str(path), f"cannot read: {exc}") from exc
    if len(raw) != 32:
        raise KeyFileError(str(path), "is not a 32-byte Ed25519 key")
    return raw


def _split_signed(data: bytes, what: str) -> tuple[bytes, bytes, dict[str, Any]]:
    try:
        outer = msgpack.unpackb(data, raw=False)
        if not (isinstance(outer, list) and len(outer) == 2 and isinstance(outer[0], bytes)
                and isinstance(outer[1], bytes)):
            raise ValueError("not [body, signature]")
        body = msgpack.unpackb(outer[0], raw=False)
        if not isinstance(body, dict):
            raise ValueError("body is not a map")
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CertificateError(f"malformed {what}: {exc}", reason="malformed") from exc
    return outer[0], outer[1], body


class TrustAnchor:
    """Verifies certificates and revocation lists against the authority's public key.

    Args:
        public_key: the authority's raw 32-byte Ed25519 public key.
    """

    def __init__(self, public_key: bytes) -> None:
        self.public_key_bytes = public_key
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    @classmethod
    def from_file(cls, path: str | Path) -> TrustAnchor:
        """Load ``ca.pub``.

        Raises:
            KeyFileError: missing or not an Ed25519 public key.
        """
        return cls(_b64_read(Path(path)))

    def _check_sig(self, body: bytes, sig: bytes, what: str, node_id: str | None) -> None:
        try:
            self._key.verify(sig, body)
        except InvalidSignature as exc:
            raise CertificateError(f"{what} signature does not verify (tampered, or another "
                                   "authority)", reason="signature", node_id=node_id) from exc

    def verify_crl(self, data: bytes) -> RevocationList:
        """Verify and decode a revocation list.

        Raises:
            CertificateError: malformed or bad signature.
        """
        body, sig, obj = _split_signed(data, "revocation list")
        self._check_sig(body, sig, "revocation list", None)
        serials = obj.get("serials")
        if not isinstance(serials, list) or not all(isinstance(s, int) for s in serials):
            raise CertificateError("revocation list serials must be integers", reason="malformed")
        return RevocationList(frozenset(serials), float(obj.get("issued", 0)), data)

    def verify(self, data: bytes, *, now: float | None = None,
               revoked: RevocationList | None = None) -> Certificate:
        """Verify a certificate: signature, validity window, revocation.

        Raises:
            CertificateError: ``reason`` is ``malformed``, ``signature``, ``expired``
                (also: not yet valid) or ``revoked``.
        """
        body, sig, obj = _split_signed(data, "certificate")
        node_id = obj.get("node_id") if isinstance(obj.get("node_id"), str) else None
        self._check_sig(body, sig, "certificate", node_id)
        try:
            if obj.get("v") != CERT_VERSION:
                raise ValueError(f"unsupported certificate version {obj.get('v')!r}")
            cert = Certificate(
                serial=int(obj["serial"]),
                node_id=str(obj["node_id"]),
                public_key=str(obj["public_key"]),
                roles=tuple(str(r) for r in obj.get("roles", ())),
                permissions=tuple(str(p) for p in obj.get("permissions", ())),
                not_before=float(obj["not_before"]),
                not_after=float(obj["not_after"]),
                raw=data,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CertificateError(f"malformed certificate: {exc}", reason="malformed",
                                   node_id=node_id) from exc
        if not is_z85_key(cert.public_key):
            raise CertificateError("certificate public key is not Z85", reason="malformed",
                                   node_id=node_id)
        t = time.time() if now is None else now
        if t >= cert.not_after:
            raise CertificateError(f"certificate of {cert.node_id} expired at {cert.not_after:.0f}",
                                   reason="expired", node_id=cert.node_id)
        if t < cert.not_before:
            raise CertificateError(f"certificate of {cert.node_id} is not valid before "
                                   f"{cert.not_before:.0f}", reason="expired", node_id=cert.node_id)
        if revoked is not None and cert.serial in revoked.serials:
            raise CertificateError(f"certificate {cert.serial} of {cert.node_id} is revoked",
                                   reason="revoked", node_id=cert.node_id)
        return cert


class Authority(TrustAnchor):
    """The signing side (``mesh ca``): holds the Ed25519 private key.

    Use :meth:`init` to create one and :meth:`open` to load it.
    """

    def __init__(self, directory: Path, private: Ed25519PrivateKey) -> None:
        from cryptography.hazmat.primitives import serialization as ser

        self.directory = directory
        self._private = private
        super().__init__(private.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))

    @classmethod
    def init(cls, directory: str | Path) -> Authority:
        """Create a new authority in ``directory`` (``ca.secret`` 0600, ``ca.pub``).

        Raises:
            KeyFileError: an authority exists there already, or files cannot be written.
        """
        from cryptography.hazmat.primitives import serialization as ser

        from mesh.security.keys import _write_new

        d = Path(directory)
        if (d / _CA_SECRET).exists():
            raise KeyFileError(str(d / _CA_SECRET), "an authority exists here already")
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(str(d), f"cannot create: {exc}") from exc
        priv = Ed25519PrivateKey.generate()
        raw = priv.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
        pub = priv.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        _write_new(d / _CA_SECRET, base64.b64encode(raw).decode() + "\n", 0o600, False)
        _write_new(d / _CA_PUBLIC, base64.b64encode(pub).decode() + "\n", 0o644, False)
        _write_new(d / "serial", "1\n", 0o600, False)
        return cls(d, priv)

    @classmethod
    def open(cls, directory: str | Path) -> Authority:
        """Load the authority in ``directory``.

        Raises:
            KeyFileError: missing, too-open permissions on ``ca.secret``, malformed.
        """
        d = Path(directory)
        check_secret_permissions(d / _CA_SECRET)
        return cls(d, Ed25519PrivateKey.from_private_bytes(_b64_read(d / _CA_SECRET)))

    def _issued_below(self) -> int:
        """The next serial to be issued: every issued serial is below it."""
        try:
            return int((self.directory / "serial").read_text().strip())
        except (OSError, ValueError):
            return 1

    def _next_serial(self) -> int:
        from mesh.security.keys import _write_new

        path = self.directory / "serial"
        try:
            serial = int(path.read_text().strip())
        except (OSError, ValueError):
            serial = 1
        _write_new(path, f"{serial + 1}\n", 0o600, True)
        return serial

    def _sign(self, obj: dict[str, Any]) -> bytes:
        body: bytes = msgpack.packb(obj, use_bin_type=True)
        out: bytes = msgpack.packb([body, self._private.sign(body)], use_bin_type=True)
        return out

    def sign(self, node_id: str, public_key: str, *, roles: Sequence[str] = (),
             permissions: Sequence[str] = (), valid_s: float = 365 * 86400,
             not_before: float | None = None) -> Certificate:
        """Sign a certificate for ``node_id`` holding CURVE ``public_key``.

        Raises:
            ConfigError: empty node id, bad key, non-positive validity, or a bad rule.
        """
        from mesh.security.perms import parse_rule

        if not node_id:
            raise ConfigError("certificate node id must not be empty")
        if not is_z85_key(public_key):
            raise ConfigError("certificate public key must be 40 Z85 characters")
        if valid_s <= 0:
            raise ConfigError(f"validity must be positive, got {valid_s}")
        for rule in permissions:
            parse_rule(rule)
        start = time.time() if not_before is None else not_before
        obj = {
            "v": CERT_VERSION, "serial": self._next_serial(), "node_id": node_id,
            "public_key": public_key, "roles": list(roles), "permissions": list(permissions),
            "not_before": int(start) - 60 if not_before is None else start,  # clock skew
            "not_after": start + valid_s,
        }
        return self.verify(self._sign(obj), now=start)

    def revocation_list(self) -> RevocationList:
        """The current revocation list (empty when none was written)."""
        path = self.directory / CRL_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return RevocationList(frozenset(), 0.0)
        except OSError as exc:
            raise KeyFileError(str(path), f"cannot read: {exc}") from exc
        return self.verify_crl(data)

    def revoke(self, serials: Iterable[int]) -> RevocationList:
        """Add ``serials`` to the revocation list and write it (``<ca dir>/revoked.crl``).

        Copy that file into every node's certificate directory; nodes reload it on change.

        Raises:
            ConfigError: a serial this authority never issued (a typo would revoke nothing).
            KeyFileError: cannot write.
        """
        issued = self._issued_below()
        unknown = sorted(s for s in set(serials) if not 1 <= s < issued)
        if unknown:
            have = f"1..{issued - 1}" if issued > 1 else "none"
            raise ConfigError(f"serial(s) {', '.join(map(str, unknown))} never issued by this "
                              f"authority (issued: {have})")
        current = self.revocation_list()
        merged = sorted(current.serials | set(serials))
        data = self._sign({"v": CERT_VERSION, "issued": time.time(), "serials": merged})
        tmp = self.directory / f".{CRL_NAME}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.directory / CRL_NAME)
        except OSError as exc:
            raise KeyFileError(str(self.directory / CRL_NAME), f"cannot write: {exc}") from exc
        return self.verify_crl(data)


def load_certificate_file(path: str | Path) -> bytes:
    """Read a certificate file's bytes.

    Raises:
        CertificateError: unreadable.
    """
    try:
        data: bytes = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read certificate {path}: {exc}",
                               reason="malformed") from exc
    return data
