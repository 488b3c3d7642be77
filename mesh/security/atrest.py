"""Optional encryption of log records at rest (AEAD, ChaCha20-Poly1305 from ``cryptography``).

The cipher seals each record's payload before it is appended and opens it after it is read.
The log's own framing (length, checksum, index) stays in clear, so an encrypted log is still
appendable, recoverable (a torn tail is found by the checksum of the sealed bytes) and
seekable by offset and time; only payloads are secret. Sealed record layout::

    magic   2 bytes   b"Z1"
    key id  4 bytes   first 4 bytes of SHA-256(key): a wrong key is told apart from damage
    nonce  12 bytes   random (96-bit random nonces: safe far beyond 2^32 records per key)
    sealed  n+16      ChaCha20-Poly1305(payload), tag last; associated data = aad (stream name)

Keys live in the node's keystore: a 0600 file holding 32 random bytes, base64.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mesh.errors import ConfigError, DecryptionFailed
from mesh.security.keys import load_or_create_secret_bytes

__all__ = ["OVERHEAD", "RecordCipher", "load_or_create_atrest_key"]

_MAGIC = b"Z1"
_HEADER = 2 + 4 + 12
#: Bytes a sealed record adds to its payload.
OVERHEAD = _HEADER + 16


def load_or_create_atrest_key(path: str | Path) -> bytes:
    """Load the 32-byte at-rest key at ``path`` (0600), creating it when absent.

    Raises:
        KeyFileError: too-open permissions, malformed, or cannot be written.
    """
    return load_or_create_secret_bytes(path, lambda: os.urandom(32), "key")


class RecordCipher:
    """Seals and opens log payloads.

    Args:
        key: 32 bytes.
        aad: associated data bound into every record (e.g. the stream name: a record moved to
            another stream does not open).

    Raises:
        ConfigError: the key is not 32 bytes.
    """

    def __init__(self, key: bytes, aad: bytes = b"") -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise ConfigError("at-rest key must be 32 bytes")
        self._aead = ChaCha20Poly1305(key)
        self.key_id = hashlib.sha256(key).digest()[:4]
        self._prefix = _MAGIC + self.key_id
        self.aad = aad

    def seal(self, payload: bytes) -> bytes:
        """Encrypt and authenticate one payload."""
        nonce = os.urandom(12)
        return self._prefix + nonce + self._aead.encrypt(nonce, payload, self.aad)

    def seal_many(self, payloads: Sequence[bytes]) -> list[bytes]:
        """Seal a batch (one nonce draw for the batch: per-batch work on the hot path)."""
        rnd = os.urandom(12 * len(payloads))
        enc, prefix, aad = self._aead.encrypt, self._prefix, self.aad
        return [prefix + rnd[i * 12:i * 12 + 12] + enc(rnd[i * 12:i * 12 + 12], p, aad)
                for i, p in enumerate(payloads)]

    def open(self, sealed: bytes, where: str = "record") -> bytes:
        """Decrypt one sealed payload.

        Raises:
            DecryptionFailed: not sealed by zeromesh, sealed under another key (the message
                says so), or altered.
        """
        if len(sealed) < OVERHEAD or sealed[:2] != _MAGIC:
            raise DecryptionFailed(f"{where} (not an encrypted record)")
        if sealed[2:6] != self.key_id:
            raise DecryptionFailed(f"{where} (sealed under key id {sealed[2:6].hex()}, "
                                   f"this key is {self.key_id.hex()})")
        try:
            return self._aead.decrypt(sealed[6:18], sealed[18:], self.aad)
        except InvalidTag as exc:
            raise DecryptionFailed(f"{where} (authentication tag mismatch)") from exc
