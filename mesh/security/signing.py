"""Optional end-to-end signing of events with Ed25519 (``cryptography``).

A signed event carries two envelope extras:

* ``sigkey`` (str): the signer's key id (:func:`key_id` of its public key) or configured name;
* ``sig`` (bin, 64 bytes): Ed25519 over the *signed form* of the event.

The signed form is the encoded envelope (``mesh.envelope.encode``) of the same event with
``seq`` set to None and without the ``sig`` extra. ``seq`` is left out because the publisher
assigns it after the event is signed (and a relay re-sequences); everything else, including
``stream``, ``id``, ``time``, ``source``, headers, data and ``sigkey``, is covered. The
publisher sets ``stream`` to its own stream, so sign an event with ``stream`` already set to
the stream it will be published on. Replayed events are the logged bytes, so they verify
like live ones; a relay that keeps the event (only changes ``seq``) keeps it verifiable.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh.envelope import Event, encode
from mesh.errors import ConfigError, SignatureInvalid
from mesh.security.keys import load_or_create_secret_bytes

__all__ = ["EventSigner", "EventVerifier", "key_id", "load_or_create_signing_key",
           "public_key_b64"]

SIG = "sig"
SIGKEY = "sigkey"


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte Ed25519 public key, base64 (what verifiers are configured with)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes_raw()).decode()


def key_id(public_b64: str) -> str:
    """A short id of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()[:16]


def load_or_create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Load the Ed25519 signing key at ``path`` (base64 raw 32 bytes, 0600), creating it.

    Raises:
        KeyFileError: too-open permissions, malformed, or cannot be written.
    """
    raw = load_or_create_secret_bytes(
        path, lambda: Ed25519PrivateKey.generate().private_bytes_raw(), "Ed25519 signing key")
    return Ed25519PrivateKey.from_private_bytes(raw)


def _signed_form(ev: Event) -> bytes:
    extras = {k: v for k, v in ev.extras.items() if k != SIG}
    return encode(ev.replace(seq=None, extras=extras))


class EventSigner:
    """Signs events with one Ed25519 key.

    Args:
        key: the private key.
        name: the ``sigkey`` written into events; default the key id.
    """

    def __init__(self, key: Ed25519PrivateKey, name: str | None = None) -> None:
        self._key = key
        self.public_key = public_key_b64(key)
        self.name = name or key_id(self.public_key)

    def sign(self, ev: Event) -> Event:
        """A copy of ``ev`` carrying ``sigkey`` and ``sig`` (set ``stream`` before signing).

        Raises:
            CodecError: the event does not encode.
        """
        extras = {k: v for k, v in ev.extras.items() if k != SIG}
        extras[SIGKEY] = self.name
        unsigned = ev.replace(seq=None, extras=extras)
        sig = self._key.sign(encode(unsigned))
        return ev.replace(extras={**extras, SIG: sig})

    def sign_many(self, events: Iterable[Event]) -> list[Event]:
        """Sign several events."""
        return [self.sign(e) for e in events]


class EventVerifier:
    """Verifies events against known signing keys.

    Args:
        keys: name -> base64 Ed25519 public key. Each key is also known by its key id, so
            signers that use the default name need no name here.

    Raises:
        ConfigError: a key is not a base64 32-byte Ed25519 public key.
    """

    def __init__(self, keys: Mapping[str, str] | Iterable[str] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        items = keys.items() if isinstance(keys, Mapping) else ((None, k) for k in keys)
        for name, b64 in items:
            self.add(b64, name)

    def add(self, public_b64: str, name: str | None = None) -> None:
        """Trust one more key (under its key id, and ``name`` when given).

        Raises:
            ConfigError: not a base64 32-byte Ed25519 public key.
        """
        try:
            pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64, validate=True))
        except ValueError as exc:
            raise ConfigError(f"not an Ed25519 public key: {public_b64!r}") from exc
        self._keys[key_id(public_b64)] = pub
        if name:
            self._keys[name] = pub

    def verify(self, ev: Event) -> str:
        """Check ``ev``'s signature; returns the ``sigkey`` that signed it.

        Raises:
            SignatureInvalid: unsigned, unknown key, or the signature does not verify (the
                event was altered, or signed by another key).
        """
        x = ev.extras
        sig, who = x.get(SIG), x.get(SIGKEY)
        if not isinstance(sig, bytes) or not isinstance(who, str):
            raise SignatureInvalid(ev.id, "unsigned")
        pub = self._keys.get(who)
        if pub is None:
            raise SignatureInvalid(ev.id, "unknown_key")
        try:
            pub.verify(sig, _signed_form(ev))
        except InvalidSignature as exc:
            raise SignatureInvalid(ev.id, "bad_signature") from exc
        return who
