"""Reply cache: keyed by (caller, id), payload digests, expired requests, a byte bound, and
no Linux-only calls. Real nodes on 127.0.0.1, static peers, no mDNS."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.node import Node, PresenceConfig
from mesh.security import SecurityConfig
from mesh.security.keys import Keypair, generate_keypair, write_keypair
from patterns.reqrep import (
    Client,
    Incoming,
    RemoteError,
    ReplyNotCached,
    RequestIdReused,
    RequestTimeout,
    Service,
    ServiceConfig,
)
from patterns.reqrep.cache import Lookup, ReplyCache
from tests.test_reqrep_real import ctrl, make_node
from tests.util import REPO, unique, wait_until

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)


@pytest.fixture
def mesh3(tmp_path: Path) -> Iterator[tuple[Node, Node, Node]]:
    """A hub (runs the services) and two caller nodes, A and B."""
    mesh = unique("m")
    hub = make_node(tmp_path / "hub", mesh)
    a = make_node(tmp_path / "a", mesh, ctrl(hub))
    b = make_node(tmp_path / "b", mesh, ctrl(hub))
    yield hub, a, b
    for n in (a, b, hub):
        n.close()


def _offered(node: Node, name: str) -> None:
    wait_until(lambda: node.who_offers("service", name), 10, what=f"{name} offered")


def test_another_caller_reusing_an_id_never_gets_the_first_callers_reply(
        mesh3: tuple[Node, Node, Node]) -> None:
    """Without CURVE nothing proves who called: one id space, but another payload under a
    known id is refused (before: B got A's cached reply, a leak)."""
    hub, a, b = mesh3
    name = unique("svc")
    ran: list[str] = []

    def handler(req: Incoming) -> dict[str, str]:
        ran.append(req.payload)
        return {"for": req.payload}

    with Service(hub, name, handler):
        _offered(a, name)
        _offered(b, name)
        with Client(a) as ca, Client(b) as cb:
            assert ca.request(name, "alice", timeout=5, request_id="rid-1") == {"for": "alice"}
            with pytest.raises(RequestIdReused):
                cb.request(name, "bob", timeout=5, request_id="rid-1")
            assert ca.request(name, "alice", timeout=5, request_id="rid-1") == {"for": "alice"}
    assert ran == ["alice"]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Keypair]:
    ks = {n: generate_keypair() for n in ("hub", "a", "b")}
    (tmp_path / "allow").mkdir()
    for n, kp in ks.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", tmp_path / "allow" / f"{n}.key")
    return ks


def _secure(tmp: Path, name: str, mesh: str, **kw: Any) -> Node:
    sec = SecurityConfig(key_file=tmp / "keys" / f"{name}.key_secret",
                         allowlist_dir=tmp / "allow", permissions={"*": ("*:*",)},
                         **kw.pop("sec", {}))
    return Node(data_dir=tmp / name, name=name, mesh=mesh, mdns=False, transports=("tcp",),
                interface="127.0.0.1", security=sec, presence=PRESENCE, **kw)


def test_over_curve_each_caller_node_has_its_own_id_space(
        tmp_path: Path, keys: dict[str, Keypair]) -> None:
    mesh = unique("sm")
    hub = _secure(tmp_path, "hub", mesh)
    ep = hub.info().endpoints["control"][0]
    a = _secure(tmp_path, "a", mesh, sec={"peer_keys": {ep: keys["hub"].public}},
                static_peers=(ep,))
    b = _secure(tmp_path, "b", mesh, sec={"peer_keys": {ep: keys["hub"].public}},
                static_peers=(ep,))
    ran: list[str] = []

    def handler(req: Incoming) -> dict[str, str]:
        ran.append(req.payload)
        return {"for": req.payload}

    try:
        name = unique("svc")
        with Service(hub, name, handler):
            _offered(a, name)
            _offered(b, name)
            with Client(a) as ca, Client(b) as cb:
                assert ca.request(name, "alice", timeout=5, request_id="r1") == {"for": "alice"}
                # before: {'for': 'alice'}; now B's request runs under B's proven node id
                assert cb.request(name, "bob", timeout=5, request_id="r1") == {"for": "bob"}
                assert ca.request(name, "alice", timeout=5, request_id="r1") == {"for": "alice"}
                assert cb.request(name, "bob", timeout=5, request_id="r1") == {"for": "bob"}
                with pytest.raises(RequestIdReused):
                    cb.request(name, "mallory", timeout=5, request_id="r1")
    finally:
        for n in (a, b, hub):
            n.close()
    assert sorted(ran) == ["alice", "bob"]


def test_same_caller_same_id_other_payload_is_refused_typed(
        mesh3: tuple[Node, Node, Node]) -> None:
    hub, a, _ = mesh3
    name = unique("svc")
    ran: list[str] = []

    def handler(req: Incoming) -> str:
        ran.append(req.payload)
        return f"did {req.payload}"

    with Service(hub, name, handler) as svc:
        _offered(a, name)
        with Client(a) as ca:
            assert ca.request(name, "pay 10", timeout=5, request_id="rid-2") == "did pay 10"
            with pytest.raises(RequestIdReused) as info:
                ca.request(name, "pay 99", timeout=5, request_id="rid-2")
            assert isinstance(info.value, RemoteError)
            assert ca.request(name, "pay 10", timeout=5, request_id="rid-2") == "did pay 10"
        assert svc.stats().id_reused == 1
    assert ran == ["pay 10"]


def test_expired_answer_is_cached_for_the_same_caller(mesh3: tuple[Node, Node, Node]) -> None:
    hub, a, _ = mesh3
    name = unique("svc")
    ran: list[str] = []
    release = threading.Event()

    def handler(req: Incoming) -> str:
        ran.append(req.payload)
        if req.payload == "slow":
            release.wait(10)
        return str(req.payload)

    with Service(hub, name, handler, concurrency=1) as svc:
        _offered(a, name)
        with Client(a) as ca:
            t = threading.Thread(target=lambda: ca.request(name, "slow", timeout=10))
            t.start()
            wait_until(lambda: ran == ["slow"], 5, what="slow handler running")
            late: list[BaseException] = []

            def call_late() -> None:
                try:
                    ca.request(name, "late", timeout=0.4, request_id="late-2")
                except BaseException as exc:
                    late.append(exc)

            t2 = threading.Thread(target=call_late)
            t2.start()
            # The service's deadline counts from the request's arrival (its ttl_ms), which the
            # default service's fast path can delay by up to about two inline budgets while
            # "slow" holds the socket: release only once that deadline has passed too.
            wait_until(lambda: svc.stats().received >= 2, 5, what="late request received")
            arrived = time.monotonic()
            t2.join(5)
            assert late and isinstance(late[0], RequestTimeout)
            wait_until(lambda: time.monotonic() > arrived + 0.45, 2, what="its deadline")
            release.set()
            t.join(10)
            wait_until(lambda: svc.stats().expired >= 1, 5, what="late request dropped")
            t0 = time.monotonic()
            with pytest.raises(RequestTimeout):
                ca.request(name, "late", timeout=3, request_id="late-2")
            assert time.monotonic() - t0 < 1.5, "the cached 'expired' answer should come at once"
        assert svc.stats().executed == 1
    assert ran == ["slow"]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def test_reply_cache_is_bounded_in_bytes(mesh3: tuple[Node, Node, Node]) -> None:
    hub, a, _ = mesh3
    name = unique("svc")
    blob = b"x" * (512 << 10)
    cfg = ServiceConfig(cache_max_bytes=8 << 20)
    with Service(hub, name, lambda req: blob + req.payload, config=cfg) as svc:
        _offered(a, name)
        with Client(a) as ca:
            ca.request(name, b"warm", timeout=5)
            before = _rss_kib()
            for i in range(160):  # 80 MiB of replies through an 8 MiB cache
                assert len(ca.request(name, str(i).encode(), timeout=5)) > len(blob)
            grown = (_rss_kib() - before) >> 10
            st = svc.stats()
            assert st.cache_bytes <= 8 << 20
            assert st.executed == 161
    # unbounded, the 80 MiB stay in the cache; bounded, growth stays near the 8 MiB bound
    assert grown < 48, f"RSS grew {grown} MiB"


def test_reply_over_the_entry_limit_is_answered_typed_on_retry_never_rerun(
        mesh3: tuple[Node, Node, Node]) -> None:
    hub, a, _ = mesh3
    name = unique("svc")
    ran: list[bytes] = []

    def handler(req: Incoming) -> bytes:
        ran.append(req.payload)
        return b"y" * (2 << 20)

    with Service(hub, name, handler, cache_entry_max_bytes=1 << 20) as svc:
        _offered(a, name)
        with Client(a, heartbeat_s=0.1) as ca:
            assert len(ca.request(name, b"big", timeout=5, request_id="big-1")) == 2 << 20
            svc.drop_replies = 1  # the next reply is lost on the way: the client retries
            with pytest.raises(ReplyNotCached):
                ca.request(name, b"big2", timeout=5, request_id="big-2")
            with pytest.raises(ReplyNotCached):
                ca.request(name, b"big", timeout=5, request_id="big-1")
        st = svc.stats()
        assert st.not_cached == 2
        assert st.cache_bytes < 4096
    assert ran == [b"big", b"big2"]


_LINUX_ONLY = re.compile(r"\bos\.eventfd\w*|\bselect\.epoll\b|\bos\.EFD_\w+")
_GUARD = re.compile(r"sys\.platform|hasattr\((os|select)")


def test_no_linux_only_call_outside_a_guarded_path() -> None:
    """Linux-only calls in mesh/ and patterns/ must sit within 6 lines after a platform check
    (``sys.platform`` or ``hasattr(os|select, ...)``)."""
    bad = []
    for pkg in ("mesh", "patterns"):
        for path in sorted((Path(REPO) / pkg).rglob("*.py")):
            src = path.read_text().splitlines()
            for i, line in enumerate(src):
                code = line.split("#", 1)[0]
                if _LINUX_ONLY.search(code) and not any(
                        _GUARD.search(prev) for prev in src[max(0, i - 6):i + 1]):
                    bad.append(f"{path.relative_to(REPO)}:{i + 1}: {line.strip()}")
    assert not bad, "Linux-only calls outside a guarded path:\n" + "\n".join(bad)


def test_cache_unit_conflict_and_byte_accounting() -> None:
    now = [0.0]
    cache: ReplyCache[str, str] = ReplyCache(10.0, 100, lambda: now[0], max_bytes=100)
    assert cache.begin(("a", "1"), "w1", b"d1") == (Lookup.NEW, None)
    assert cache.begin(("a", "1"), "w2", b"d2") == (Lookup.CONFLICT, None)  # while running
    assert cache.begin(("b", "1"), "w3", b"d2") == (Lookup.NEW, None)  # another caller
    assert cache.finish(("a", "1"), "A", size=60) == ["w1"]
    assert cache.begin(("a", "1"), "w1", b"d2") == (Lookup.CONFLICT, None)  # once finished
    assert cache.begin(("a", "1"), "w1", b"d1") == (Lookup.CACHED, "A")
    cache.finish(("b", "1"), "B", size=60)  # 120 > 100: the oldest goes
    assert cache.bytes == 60 and cache.state(("a", "1")) is None
    assert cache.conflicts == 2
    now[0] = 11.0
    cache.expire()
    assert cache.bytes == 0 and len(cache) == 0


def test_iterator_style_skips_a_request_that_expired_in_its_queue(
        mesh3: tuple[Node, Node, Node]) -> None:
    hub, a, _ = mesh3
    name = unique("svc")
    svc = Service(hub, name, concurrency=1)
    seen: list[Any] = []
    got = threading.Event()

    def serve() -> None:
        for req in svc.requests(timeout=10):
            seen.append(req.payload)
            got.set()
            if req.payload == "slow":
                wait_until(lambda: late_done.is_set(), 10, what="late call timed out")
            req.reply(req.payload)

    late_done = threading.Event()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        _offered(a, name)
        with Client(a) as ca:
            slow = threading.Thread(target=lambda: ca.request(name, "slow", timeout=10))
            slow.start()
            got.wait(5)
            with pytest.raises(RequestTimeout):
                ca.request(name, "late", timeout=0.4, request_id="it-late")
            late_done.set()
            slow.join(10)
            wait_until(lambda: svc.stats().expired >= 1, 5, what="late request dropped")
            assert seen == ["slow"]
    finally:
        svc.close()
        t.join(5)
