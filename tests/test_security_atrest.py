"""Log encryption at rest with a real durable log: round trip, wrong key, altered bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.errors import ConfigError, DecryptionFailed, KeyFileError
from mesh.log import Log
from mesh.security.atrest import OVERHEAD, RecordCipher, load_or_create_atrest_key


def test_key_file_created_0600_and_refused_when_open(tmp_path: Path) -> None:
    p = tmp_path / "ks" / "atrest.key"
    k = load_or_create_atrest_key(p)
    assert len(k) == 32 and load_or_create_atrest_key(p) == k
    assert os.stat(p).st_mode & 0o777 == 0o600
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match="too open"):
        load_or_create_atrest_key(p)


def test_encrypted_log_roundtrip_and_wrong_key(tmp_path: Path) -> None:
    key = load_or_create_atrest_key(tmp_path / "a.key")
    c = RecordCipher(key, aad=b"stream-1")
    payloads = [f"secret payload {i}".encode() for i in range(50)]
    with Log.open(tmp_path / "log") as log:
        log.append_many(c.seal_many(payloads[:25]))
        for p in payloads[25:]:
            log.append(c.seal(p))
    raw = b"".join(f.read_bytes() for f in (tmp_path / "log").rglob("*") if f.is_file())
    assert b"secret payload" not in raw  # nothing in clear on disk
    with Log.open(tmp_path / "log") as log:
        assert [c.open(r.payload) for r in log.iter(0)] == payloads
        wrong = RecordCipher(os.urandom(32), aad=b"stream-1")
        with pytest.raises(DecryptionFailed, match="key id"):
            wrong.open(next(log.iter(0)).payload, "stream-1@0")
        other_stream = RecordCipher(key, aad=b"stream-2")
        with pytest.raises(DecryptionFailed, match="tag"):
            other_stream.open(next(log.iter(0)).payload)
        log.append(c.seal(b"still appendable"))
    with Log.open(tmp_path / "log") as log:  # nothing damaged by the failed opens
        recs = list(log.iter(0))
        assert len(recs) == 51 and c.open(recs[-1].payload) == b"still appendable"


def test_altered_and_foreign_records() -> None:
    c = RecordCipher(b"k" * 32)
    sealed = bytearray(c.seal(b"x" * 10))
    assert len(sealed) == 10 + OVERHEAD
    sealed[-1] ^= 1
    with pytest.raises(DecryptionFailed, match="tag"):
        c.open(bytes(sealed))
    with pytest.raises(DecryptionFailed, match="not an encrypted"):
        c.open(b"plain text record that was never sealed")
    with pytest.raises(ConfigError):
        RecordCipher(b"short")
