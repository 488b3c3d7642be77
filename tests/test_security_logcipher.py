"""The durable log encrypted at rest (LogConfig.cipher) and a real Publisher on top of it.

Real files: bytes on disk are searched for the payloads; a torn tail is made by truncating
the segment file; a wrong key must fail at open and leave every byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import DecryptionFailed
from mesh.log import Log, LogConfig, LogDirectory
from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.atrest import RecordCipher
from mesh.security.keys import generate_keypair, write_keypair
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import unique, wait_until

MARK = b"TOPSECRET-PAYLOAD"


def disk_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "LOCK":
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cfg(key: bytes) -> LogConfig:
    return LogConfig(cipher=RecordCipher(key, aad=b"s"))


def test_encrypted_log_appendable_recoverable_and_secret(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "log"
    with Log.open(path, config=cfg(key)) as log:
        log.append(MARK + b"-0")
        log.append_many([MARK + b"-%d" % i for i in range(1, 100)])
    assert MARK not in disk_bytes(path)
    assert (path / "CIPHER").read_text().strip() == RecordCipher(key).key_id.hex()
    with Log.open(path, config=cfg(key)) as log:  # appendable after reopen
        assert log.append(MARK + b"-100") == 100
    seg = max(path.glob("*.log"), key=lambda p: p.stat().st_size)
    with open(seg, "r+b") as f:  # tear the last record
        f.truncate(seg.stat().st_size - 5)
    with Log.open(path, config=cfg(key)) as log:  # recovery cuts back to the last good record
        assert log.next_offset == 100
        assert [r.payload for r in log.read(0, 200)] == [MARK + b"-%d" % i for i in range(100)]
        _, payloads = log.read_batch_payloads(95, 10)
        assert payloads == [MARK + b"-%d" % i for i in range(95, 100)]
        assert log.stats().truncated_bytes_on_recovery > 0


def test_wrong_key_missing_key_and_plaintext_log_refused_nothing_damaged(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "log"
    with Log.open(path, config=cfg(key)) as log:
        log.append_many([b"r%d" % i for i in range(10)])
    before = digest(path)
    with pytest.raises(DecryptionFailed, match="encrypted under key id"):
        Log.open(path, config=cfg(os.urandom(32)))
    with pytest.raises(DecryptionFailed, match="opened without a key"):
        Log.open(path)
    assert digest(path) == before
    with Log.open(path, config=cfg(key)) as log:  # and the right key still reads everything
        assert [r.payload for r in log.read(0)] == [b"r%d" % i for i in range(10)]
    plain = tmp_path / "plain"
    with Log.open(plain) as log:
        log.append(b"clear")
    with pytest.raises(DecryptionFailed, match="plaintext records"):
        Log.open(plain, config=cfg(key))


def test_log_directory_key_binds_records_to_their_stream(tmp_path: Path) -> None:
    key = os.urandom(32)
    d = LogDirectory(tmp_path, key=key)
    with d.open("a") as log:
        log.append(MARK)
    # a record copied into another stream's log does not open (stream name is the AAD)
    shutil.copytree(tmp_path / "streams" / "a", tmp_path / "streams" / "b")
    with d.open("b") as log, pytest.raises(DecryptionFailed, match="tag mismatch"):
        log.read(0)
    with d.open("a") as log:
        assert log.read(0)[0].payload == MARK


def _node(tmp: Path, name: str, mesh: str, atrest_key: Path | None, **kw: Any) -> Node:
    sec = SecurityConfig(key_file=tmp / "keys" / f"{name}.key_secret",
                         allowlist_dir=tmp / "allow", permissions={"*": ("*:*",)},
                         atrest=atrest_key is not None, atrest_key_file=atrest_key,
                         peer_keys=kw.pop("peer_keys", {}))
    return Node(data_dir=tmp / name, name=name, mesh=mesh, mdns=False, transports=("tcp",),
                interface="127.0.0.1", security=sec, **kw)


def test_publisher_with_encrypted_log_replays_and_wrong_key_refused(tmp_path: Path) -> None:
    (tmp_path / "allow").mkdir()
    kps = {n: generate_keypair() for n in ("a", "b")}
    for n, kp in kps.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", tmp_path / "allow" / f"{n}.key")
    m = unique("rest")
    stream = unique("s")
    with _node(tmp_path, "a", m, tmp_path / "ks" / "atrest.key") as a:
        assert a.security is not None and a.security.atrest_key is not None
        with Publisher(a, stream) as pub:
            pub.publish_many([MARK + b"-%d" % i for i in range(200)])
            ep = a.info().endpoints["control"][0]
            with _node(tmp_path, "b", m, None, static_peers=(ep,),
                       peer_keys={ep: kps["a"].public}) as b, \
                    Subscriber(b, stream, start=Start.beginning()) as sub:
                got: list[Any] = []
                wait_until(lambda: (got.extend(sub.recv_batch(timeout=0.1)), len(got) >= 200)[1],
                           15, what="replay from the encrypted log")
                assert [e.data for e in got[:200]] == [MARK + b"-%d" % i for i in range(200)]
                assert sub.stats().replayed > 0
    data = next(p for p in (tmp_path / "a").rglob(stream) if p.is_dir())
    assert MARK not in disk_bytes(data) and (data / "CIPHER").exists()
    before = digest(data)
    # The same data directory with another at-rest key: refused with a clear error.
    with _node(tmp_path, "a", m, tmp_path / "ks" / "other.key") as a2, \
            pytest.raises(DecryptionFailed, match="encrypted under key id"):
        Publisher(a2, stream)
    assert digest(data) == before
    with _node(tmp_path, "a", m, tmp_path / "ks" / "atrest.key") as a3, \
            Publisher(a3, stream) as pub3:
        assert pub3.head == 200 and pub3.publish(b"more") == 200
