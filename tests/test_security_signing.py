"""End-to-end Ed25519 signing of events: units, then real secured nodes (live, replay, relay)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh.envelope import Event, decode, encode
from mesh.errors import KeyFileError, SignatureInvalid
from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from mesh.security.signing import EventSigner, EventVerifier, load_or_create_signing_key
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import unique, wait_until


def ev(stream: str = "s", data: Any = b"x") -> Event:
    return Event(type="reading", source="sensor-1", stream=stream, data=data)


def test_sign_verify_and_every_refusal() -> None:
    signer = EventSigner(Ed25519PrivateKey.generate())
    other = EventSigner(Ed25519PrivateKey.generate())
    ver = EventVerifier({"pub-a": signer.public_key})
    signed = signer.sign(ev())
    wire = decode(encode(signed.replace(seq=42)))  # the publisher sets seq after signing
    assert ver.verify(wire) == signer.name
    with pytest.raises(SignatureInvalid) as info:
        ver.verify(wire.replace(data=b"y"))  # altered payload
    assert info.value.reason == "bad_signature"
    with pytest.raises(SignatureInvalid, match="bad_signature"):
        ver.verify(wire.replace(stream="elsewhere"))  # moved to another stream
    with pytest.raises(SignatureInvalid, match="unknown_key"):
        ver.verify(other.sign(ev()))
    with pytest.raises(SignatureInvalid, match="unsigned"):
        ver.verify(ev())
    forged = other.sign(ev()).replace(extras={**other.sign(ev()).extras, "sigkey": signer.name})
    with pytest.raises(SignatureInvalid, match="bad_signature"):
        ver.verify(forged)  # claims to be signer, signed by other


def test_signing_key_file_0600(tmp_path: Path) -> None:
    p = tmp_path / "sign.key"
    k = load_or_create_signing_key(p)
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert load_or_create_signing_key(p).private_bytes_raw() == k.private_bytes_raw()
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError):
        load_or_create_signing_key(p)


def test_signed_events_verify_live_replayed_and_relayed(tmp_path: Path) -> None:
    (tmp_path / "allow").mkdir()
    kps = {n: generate_keypair() for n in ("a", "b")}
    for n, kp in kps.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", tmp_path / "allow" / f"{n}.key")
    sign_pub = EventSigner(load_or_create_signing_key(tmp_path / "a-sign.key")).public_key
    m, stream = unique("sig"), unique("s")

    def sec(n: str, **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=tmp_path / "keys" / f"{n}.key_secret",
                              allowlist_dir=tmp_path / "allow", permissions={"*": ("*:*",)}, **kw)

    with Node(data_dir=tmp_path / "a", name="a", mesh=m, mdns=False, transports=("tcp",),
              interface="127.0.0.1",
              security=sec("a", sign_events=True, signing_key_file=tmp_path / "a-sign.key")
              ) as a:
        assert a.security is not None and a.security.signer is not None
        signer = a.security.signer
        ep = a.info().endpoints["control"][0]
        # Manual signing (sign=False / verify=False: the patterns' automatic signing and
        # verification are tested in tests/test_pubsub_signing.py).
        with Publisher(a, stream, sign=False) as pub:
            pub.publish_events(signer.sign_many([ev(stream, i) for i in range(20)]))
            with Node(data_dir=tmp_path / "b", name="b", mesh=m, mdns=False,
                      transports=("tcp",), interface="127.0.0.1", static_peers=(ep,),
                      security=sec("b", peer_keys={ep: kps["a"].public},
                                   event_keys={"a": sign_pub})) as b, \
                    Subscriber(b, stream, start=Start.beginning(), verify=False) as sub:
                assert b.security is not None
                got: list[Event] = []

                def have(n: int) -> bool:
                    got.extend(sub.recv_batch(timeout=0.05))
                    return len(got) >= n

                wait_until(lambda: have(20), 10, what="replayed signed events")
                assert sub.stats().replayed >= 1
                wait_until(lambda: (pub.publish_event(signer.sign(ev(stream, "live"))),
                                    have(21))[1], 10, what="live signed event")
                assert {b.security.verifier.verify(e) for e in got} == {signer.name}
                # An unsigned event on the same stream is told apart.
                pub.publish(b"unsigned")
                wait_until(lambda: have(10**9) or any(e.data == b"unsigned" for e in got), 10)
                bad = next(e for e in got if e.data == b"unsigned")
                with pytest.raises(SignatureInvalid, match="unsigned"):
                    b.security.verifier.verify(bad)
                # Relay: a node that re-publishes the event on the same stream gives it a new
                # seq; the signature still names the original signer.
                relayed_ev = decode(encode(got[0].replace(seq=10_000)))
                assert b.security.verifier.verify(relayed_ev) == signer.name
