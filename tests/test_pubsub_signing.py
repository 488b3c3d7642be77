"""Publisher(sign=...) / Subscriber(verify=...): end-to-end signatures with real nodes.

Live, replayed and relayed (bridge-style ``publish_event`` on another node) signed events
verify as the original publisher; unsigned and tampered events are refused, counted, and the
stream moves on past them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh.envelope import Event
from mesh.errors import ConfigError
from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from mesh.security.signing import EventSigner, EventVerifier, load_or_create_signing_key
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import unique, wait_until


def _collect(sub: Subscriber, got: list[Event], n: int) -> bool:
    got.extend(sub.recv_batch(timeout=0.05))
    return len(got) >= n


def test_signing_options_need_keys(tmp_path: Path) -> None:
    with Node(data_dir=tmp_path / "n", mesh=unique("m"), mdns=False, transports=("tcp",),
              interface="127.0.0.1") as n:
        with pytest.raises(ConfigError, match="sign=True"):
            Publisher(n, unique("s"), sign=True)
        with pytest.raises(ConfigError, match="verify=True"):
            Subscriber(n, unique("s"), verify=True)
        # Default off without security: the unsigned fast path.
        with Publisher(n, unique("s")) as pub:
            assert pub._signer is None


def test_explicit_keys_without_curve_refuse_unsigned_and_tampered(tmp_path: Path) -> None:
    signer = EventSigner(Ed25519PrivateKey.generate(), name="pub-a")
    verifier = EventVerifier({"pub-a": signer.public_key})
    m, stream = unique("m"), unique("s")
    with Node(data_dir=tmp_path / "a", mesh=m, mdns=False, transports=("tcp",),
              interface="127.0.0.1") as a:
        ep = a.info().endpoints["control"][0]
        with Publisher(a, stream, sign=signer) as pub, \
                Publisher(a, stream + ".raw", sign=False) as raw, \
                Node(data_dir=tmp_path / "b", mesh=m, mdns=False, transports=("tcp",),
                     interface="127.0.0.1", static_peers=(ep,)) as b, \
                Subscriber(b, stream + "*", start=Start.beginning(), verify=verifier) as sub:
            pub.publish(b"one")
            got: list[Event] = []
            wait_until(lambda: _collect(sub, got, 1), 10, what="first signed event")
            good = got[0]
            raw.publish(b"unsigned")  # no signature at all
            # Signed for stream.raw by the right key, then altered: the signature breaks.
            forged = signer.sign(good.replace(stream=stream + ".raw", seq=None))
            raw.publish_event(forged.replace(data=b"tampered"))
            raw.publish_event(forged)  # intact: verifies
            pub.publish_many([b"two", b"three"])
            wait_until(lambda: _collect(sub, got, 4), 10, what="events after refused ones")
            wait_until(lambda: sub.stats().bad_signatures >= 2, 10,
                       what="both bad events counted")
            datas = sorted(e.data for e in got)
            assert datas == [b"one", b"one", b"three", b"two"]
            assert sub.stats().bad_signatures == 2
            assert all(verifier.verify(e) == "pub-a" for e in got)


def _secure_nodes(tmp_path: Path, names: tuple[str, ...]) -> tuple[dict[str, str], Any]:
    (tmp_path / "allow").mkdir()
    pubs = {}
    for n in names:
        kp = generate_keypair()
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", tmp_path / "allow" / f"{n}.key")
        pubs[n] = kp.public

    def sec(n: str, **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=tmp_path / "keys" / f"{n}.key_secret",
                              allowlist_dir=tmp_path / "allow", permissions={"*": ("*:*",)},
                              **kw)
    return pubs, sec


def test_signed_live_replayed_and_relayed_verify_as_original(tmp_path: Path) -> None:
    pubs, sec = _secure_nodes(tmp_path, ("a", "r", "b"))
    a_sign = EventSigner(load_or_create_signing_key(tmp_path / "a-sign.key")).public_key
    m, stream = unique("m"), unique("s")

    def node(n: str, **kw: Any) -> Node:
        return Node(data_dir=tmp_path / n, name=n, mesh=m, mdns=False, transports=("tcp",),
                    interface="127.0.0.1", **kw)

    with node("a", security=sec("a", sign_events=True,
                                signing_key_file=tmp_path / "a-sign.key")) as a:
        ep = a.info().endpoints["control"][0]
        with Publisher(a, stream) as pub:  # signs: the node has a signer
            assert pub._signer is not None
            name = pub._signer.name
            pub.publish_many([b"r0", b"r1", b"r2"])  # before anyone listens: replayed later
            pub.publish(b"r3", headers={"k": "v"})
            # The relay signs its own events too, but keeps the original signature.
            with node("r", static_peers=(ep,),
                      security=sec("r", peer_keys={ep: pubs["a"]}, sign_events=True,
                                   event_keys={"a": a_sign})) as r, \
                    Subscriber(r, stream, start=Start.beginning()) as rsub, \
                    node("b", static_peers=(ep,),
                         security=sec("b", peer_keys={ep: pubs["a"]},
                                      event_keys={"a": a_sign})) as b, \
                    Subscriber(b, stream, start=Start.beginning()) as sub:
                assert sub._verifier is not None  # on by default: event_keys configured
                got: list[Event] = []
                wait_until(lambda: _collect(sub, got, 4), 10, what="replayed signed events")
                assert sub.stats().replayed >= 1
                pub.publish_event(Event(type="x", source="a", data=b"live"))
                wait_until(lambda: _collect(sub, got, 5), 10, what="live signed event")
                # Relay: r re-publishes what it received (decoded events) on its node.
                relayed: list[Event] = []
                wait_until(lambda: _collect(rsub, relayed, 5), 10, what="relay received")
                assert rsub.stats().bad_signatures == 0
                with Publisher(r, stream) as rpub:
                    rpub.publish_events(relayed)
                    wait_until(lambda: _collect(sub, got, 10), 15, what="relayed events")
                assert sub.stats().bad_signatures == 0
                by_src = {(e.extras["sigkey"], e.data) for e in got}
                assert {d for _, d in by_src} == {b"r0", b"r1", b"r2", b"r3", b"live"}
                assert {k for k, _ in by_src} == {name}  # all as a's signer, none as r's
                assert b.security is not None
                assert {b.security.verifier.verify(e) for e in got} == {name}
                assert len(got) == 10 and sub.stats().streams == 2  # from a and from r
