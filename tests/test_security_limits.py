"""Per-peer ingress rate limits: token bucket units, and a flood between real secured nodes."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ConfigError
from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from mesh.security.limits import RateLimit, TokenBuckets
from tests.util import unique, wait_until


def test_bucket_allows_burst_then_rate() -> None:
    tb = TokenBuckets(RateLimit(rate=10, burst=5))
    assert all(tb.allow("k", 1, 0.0) for _ in range(5))
    assert not tb.allow("k", 1, 0.0) and tb.dropped["k"] == 1
    assert tb.allow("k", 1, 0.1) and not tb.allow("k", 1, 0.1)  # 10/s -> 1 token per 100 ms
    assert tb.allow("other", 5, 0.1)  # buckets are per key
    assert all(tb.allow("k", 1, 100.0) for _ in range(5))  # refill is capped at the burst
    assert not tb.allow("k", 1, 100.0)


def test_bucket_keys_bounded() -> None:
    tb = TokenBuckets(RateLimit(rate=1, burst=1), max_keys=10)
    for i in range(1000):
        tb.allow(f"k{i}", 1, float(i))
    assert len(tb._b) <= 10


def test_rate_limit_config_checked() -> None:
    with pytest.raises(ConfigError):
        RateLimit(rate=0)


def test_flood_from_one_peer_does_not_starve_another(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.mkdir()
    kps = {n: generate_keypair() for n in ("a", "b", "c")}
    for n, kp in kps.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", allow / f"{n}.key")
    m = unique("flood")
    limit = RateLimit(rate=500, burst=500)

    def node(n: str, **kw: Any) -> Node:
        return Node(data_dir=tmp_path / n, name=n, mesh=m, mdns=False, transports=("tcp",),
                    interface="127.0.0.1", max_message_bytes=1 << 16,
                    security=SecurityConfig(key_file=tmp_path / "keys" / f"{n}.key_secret",
                                            allowlist_dir=allow, rate_limit=limit,
                                            peer_keys=kw.pop("peer_keys", {})), **kw)

    got: dict[str, int] = {}
    lock = threading.Lock()

    def on_msg(peer: str, body: Any) -> None:
        with lock:
            got[peer] = got.get(peer, 0) + 1

    with node("a") as a:
        a.handle("x-load", on_msg)
        ep = a.info().endpoints["control"][0]
        with node("b", static_peers=(ep,), peer_keys={ep: kps["a"].public}) as b, \
                node("c", static_peers=(ep,), peer_keys={ep: kps["a"].public}) as c:
            wait_until(lambda: a.peers.get(b.id) and a.peers.get(c.id) and b.peers.get(a.id)
                       and c.peers.get(a.id), 5, what="joined")
            t0 = time.monotonic()
            for _ in range(20):  # b floods: 20,000 messages as fast as it can
                for _ in range(1000):
                    b.send(a.id, "x-load", 0)
                c.send(a.id, "x-load", 1)  # c sends one message per 1,000 of b's
            wait_until(lambda: got.get(c.id, 0) == 20, 10, what="every message of c")
            wait_until(lambda: a.stats().get("security_rate_limited", 0) > 0, 5,
                       what="b's excess dropped and counted")
            elapsed = time.monotonic() - t0
            # b got through at most its burst plus the rate over the run (+ one batch of slack)
            assert got.get(b.id, 0) <= 500 + 500 * elapsed + 1000
            assert a.security is not None
            assert a.security.buckets.dropped.get(kps["b"].public, 0) > 0
            assert a.security.buckets.dropped.get(kps["c"].public, 0) == 0


def test_send_queue_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.channel as channel_mod

    monkeypatch.setattr(channel_mod, "_MAX_OUTQ", 10)
    m = unique("outq")
    with Node(data_dir=tmp_path / "a", name="a", mesh=m, mdns=False, transports=("tcp",),
              interface="127.0.0.1") as a:
        ep = a.info().endpoints["control"][0]
        with Node(data_dir=tmp_path / "b", name="b", mesh=m, mdns=False, transports=("tcp",),
                  interface="127.0.0.1", static_peers=(ep,)) as b:
            wait_until(lambda: b.peers.get(a.id), 5, what="joined")
            hold, held = threading.Event(), threading.Event()
            b.reactor.call_soon(lambda: (held.set(), hold.wait(5)))  # the reactor is busy
            held.wait(5)
            for _ in range(25):
                b.send(a.id, "x-q", 0)
            hold.set()
            assert b.stats()["dropped_outq"] == 15
