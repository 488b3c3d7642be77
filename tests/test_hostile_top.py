"""Hostile peers against ``node.stats`` (the stats request ``mesh top`` uses).

- Under CURVE, a peer whose key is admitted but not permitted ``observe`` gets a typed
  refusal (``forbidden``), counted, and no metrics; a permitted one gets the snapshot; ``mesh
  top`` run with the refused key shows the node as ``forbidden``.
- A raw DEALER (plaintext) that joined with a forged HELLO floods stats requests: it is
  answered at most at the budgeted rate (per-peer token bucket), the rest are dropped and
  counted, malformed and unknown-version requests are counted and unanswered, log lines stay
  within the limiter's burst, and a real peer is still answered during the flood.
- A snapshot larger than ``max_message_bytes`` is cut by whole families, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh import control
from mesh.control import Hello
from mesh.node import Node
from mesh.observe import NODE_WIDE, PER_PEER, STATS_KIND, STATS_REPLY_KIND, StatsClient
from mesh.peers import PeerInfo
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from tests.util import REPO, ctrl, make_node, unique, wait_until


def _node(tmp: Path, name: str, mesh: str, **kw: Any) -> Node:
    return Node(data_dir=tmp / name, name=name, mesh=mesh, mdns=False, interface="127.0.0.1",
                transports=("tcp",), **kw)


@pytest.fixture
def curve(tmp_path: Path) -> Iterator[dict[str, Any]]:
    keys = {n: generate_keypair() for n in ("victim", "watcher", "nosy")}
    allow = tmp_path / "allow"
    allow.mkdir()
    for n, kp in keys.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", allow / f"{n}.key")

    def sec(name: str, perms: dict[str, tuple[str, ...]], **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=tmp_path / "keys" / f"{name}.key_secret",
                              allowlist_dir=allow, permissions=perms, **kw)

    mesh = unique("hostile-top")
    # the victim lets everyone publish, and only the watcher's key observe
    victim = _node(tmp_path, "victim", mesh, security=sec("victim", {
        "*": ("publish:*",), keys["watcher"].public: ("observe:*",)}))
    peers = {"victim": ctrl(victim)}
    vkey = {peers["victim"]: keys["victim"].public}
    watcher = _node(tmp_path, "watcher", mesh, static_peers=(peers["victim"],),
                    security=sec("watcher", {"*": ("*:*",)}, peer_keys=vkey))
    nosy = _node(tmp_path, "nosy", mesh, static_peers=(peers["victim"],),
                 security=sec("nosy", {"*": ("*:*",)}, peer_keys=vkey))
    try:
        wait_until(lambda: all(victim.peers.get(n.id) and n.peers.get(victim.id)
                               for n in (watcher, nosy)), 10, what="CURVE mesh joined")
        yield {"victim": victim, "watcher": watcher, "nosy": nosy, "keys": keys,
               "tmp": tmp_path, "allow": allow}
    finally:
        for n in (nosy, watcher, victim):
            n.close()


def test_curve_peer_without_observe_gets_a_typed_refusal(curve: dict[str, Any]) -> None:
    victim, watcher, nosy = curve["victim"], curve["watcher"], curve["nosy"]
    refused, allowed = StatsClient(nosy), StatsClient(watcher)
    assert refused.request(victim.id) and allowed.request(victim.id)
    wait_until(lambda: victim.id in refused.latest and victim.id in allowed.latest, 10,
               what="both answered")
    no = refused.latest[victim.id]
    assert not no.ok and no.error == "forbidden" and "metrics" not in no.body
    assert "observe" in no.body["message"]
    yes = allowed.latest[victim.id]
    assert yes.ok and yes.body["node_id"] == victim.id and "stats_requests_total" in \
        yes.body["metrics"]
    st = victim.stats()
    assert st["stats_forbidden"] == 1 and st["stats_answered"] == 1
    assert st["security_denied_observe"] == 1
    fam = victim.metrics.as_dict()["stats_requests_total"]["samples"]
    assert {s["labels"]["outcome"]: s["value"] for s in fam}["forbidden"] == 1


def test_curve_mesh_top_with_a_key_not_permitted_shows_forbidden(
        curve: dict[str, Any]) -> None:
    victim, tmp, keys = curve["victim"], curve["tmp"], curve["keys"]
    ep = ctrl(victim)
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(
        [sys.executable, "-m", "mesh", "top", "--once", "--json", "--no-mdns",
         "--interface", "127.0.0.1", "--mesh", victim.mesh, "--peer", ep,
         "--peer-key", f"{ep}={keys['victim'].public}",
         "--key-file", str(tmp / "keys" / "nosy.key_secret"), "--allowlist", str(curve["allow"]),
         "--timeout", "10"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {n["name"]: n for n in json.loads(r.stdout)["nodes"]}
    assert rows["victim"]["stats"] == "forbidden" and rows["victim"]["uptime_s"] is None
    assert victim.stats()["stats_forbidden"] >= 1


# --- a flood from a raw DEALER -------------------------------------------------------------------


def _fake_id() -> str:
    return os.urandom(16).hex()


def _pairs(router: zmq.Socket[Any], kind: str) -> list[Any]:
    """Bodies of ``kind`` waiting on the attacker's ROUTER (what the victim sent it)."""
    out = []
    while True:
        try:
            frames = router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return out
        for m in control.decode_frames(frames[1:]):
            if m.kind == kind:
                out.append(m.body)


def test_stats_flood_from_a_raw_dealer_is_answered_at_the_budgeted_rate(
        tmp_path: Path, zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    mesh = unique("hostile-top")
    victim = make_node(tmp_path / "victim", mesh)
    friend = make_node(tmp_path / "friend", mesh, (ctrl(victim),))
    router = zctx.socket(zmq.ROUTER)
    dealer = zctx.socket(zmq.DEALER)
    try:
        wait_until(lambda: victim.peers.get(friend.id) and friend.peers.get(victim.id), 10)
        router.setsockopt(zmq.LINGER, 0)
        router.bind("tcp://127.0.0.1:*")
        back = router.getsockopt_string(zmq.LAST_ENDPOINT)
        fake = _fake_id()
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        dealer.setsockopt(zmq.ROUTING_ID, fake.encode() + os.urandom(8))
        dealer.connect(ctrl(victim))
        info = PeerInfo(node_id=fake, name="flooder", mesh=mesh, endpoints={"control": (back,)})
        dealer.send_multipart(control.encode_frames(
            [(control.HELLO, msgpack.packb(control.hello_to_wire(Hello(info))))]))
        wait_until(lambda: victim.peers.get(fake) is not None and _pairs(router, "hello"), 10,
                   what="the victim took the forged HELLO and dialled back")
        # one malformed body and one of an unknown version: counted, never answered
        dealer.send_multipart(control.encode_frames([
            (STATS_KIND, msgpack.packb("garbage")),
            (STATS_KIND, msgpack.packb({"v": 2, "rid": 1}))]))
        wait_until(lambda: victim.stats()["stats_malformed"] == 1
                   and victim.stats()["stats_unsupported_version"] == 1, 5)
        n, batch = 5000, 250
        t0 = time.monotonic()
        for i in range(0, n, batch):
            dealer.send_multipart(control.encode_frames(
                [(STATS_KIND, msgpack.packb({"v": 1, "rid": j})) for j in range(i, i + batch)]))
        # a real peer is still answered while the flood is read
        ok = StatsClient(friend)
        assert ok.request(victim.id)
        wait_until(lambda: victim.stats()["stats_requests"] >= n + 2, 20,
                   what="the victim read the whole flood")
        elapsed = time.monotonic() - t0
        wait_until(lambda: victim.id in ok.latest, 10, what="the friend's answer")
        assert ok.latest[victim.id].ok
        st = victim.stats()
        answered_flood = st["stats_answered"] - 1  # the friend's
        bound = PER_PEER.burst + PER_PEER.rate * elapsed + 1
        assert 1 <= answered_flood <= bound, (answered_flood, bound, elapsed)
        assert st["stats_rate_limited"] == n + 2 - 2 - answered_flood
        replies: list[Any] = []
        wait_until(lambda: replies.extend(_pairs(router, STATS_REPLY_KIND))
                   or len(replies) >= answered_flood, 10, what="the flooder's replies")
        assert len(replies) == answered_flood and all(r["ok"] for r in replies)
        assert {r["rid"] for r in replies} <= set(range(n))
        # collected at most once per cache window, whatever the number of answers
        assert st["stats_collections"] <= answered_flood + 1
        # counted, and logged within the limiter's burst (10 per key) plus one held-back line
        lines = [r for r in caplog.records if r.name == "mesh.observe"]
        assert len(lines) <= 3 * 11, len(lines)
        assert victim.stats()["stats_rate_limited"] > 1000
        assert NODE_WIDE.burst > PER_PEER.burst  # one peer cannot drain the node-wide bucket
    finally:
        dealer.close()
        router.close()
        friend.close()
        victim.close()


def test_a_snapshot_over_max_message_bytes_is_cut_by_whole_families(tmp_path: Path) -> None:
    mesh = unique("hostile-top")
    limit = 64 << 10
    victim = Node(data_dir=tmp_path / "v", name="v", mesh=mesh, mdns=False,
                  interface="127.0.0.1", max_message_bytes=limit)
    asker = make_node(tmp_path / "a", mesh, (ctrl(victim),))
    try:
        wait_until(lambda: victim.peers.get(asker.id) and asker.peers.get(victim.id), 10)
        big = victim.metrics.counter("zz_many_streams_total", "Many labels.", ("stream",))
        for i in range(3000):  # about 150 KB of samples: more than one reply may carry
            big.labels(f"stream-{i:05d}").inc()
        c = StatsClient(asker)
        assert c.request(victim.id)
        wait_until(lambda: victim.id in c.latest, 10)
        body = c.latest[victim.id].body
        assert body["ok"] and body["truncated"] == ["zz_many_streams_total"]
        assert "zz_many_streams_total" not in body["metrics"]
        assert "peers" in body["metrics"] and "stats_requests_total" in body["metrics"]
        assert len(msgpack.packb(body, use_bin_type=True)) <= limit
        assert victim.stats()["stats_truncated"] == 1
        # asking for named families only: those (that exist), nothing cut
        assert c.request(victim.id, ["peers", "zz_many_streams_total", "no_such_family"])
        wait_until(lambda: c.latest[victim.id].body["rid"] != body["rid"], 10)
        small = c.latest[victim.id].body
        assert sorted(small["metrics"]) == ["peers"] and small["truncated"] == [
            "zz_many_streams_total"]
        assert c.request(victim.id, ["peers"])
        wait_until(lambda: c.latest[victim.id].body["rid"] != small["rid"], 10)
        assert c.latest[victim.id].body["truncated"] == []
        # a malformed families list is counted and not answered
        assert c.request(victim.id, [1, 2])  # type: ignore[list-item]
        wait_until(lambda: victim.stats()["stats_malformed"] == 1, 10)
        assert c.pending(victim.id)
    finally:
        asker.close()
        victim.close()


def test_hostile_replies_cannot_crash_mesh_top_or_reach_the_terminal(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    from mesh.cli.top_cmd import build_view, render

    mesh = unique("hostile-top")
    asker = make_node(tmp_path / "asker", mesh)
    router = zctx.socket(zmq.ROUTER)
    dealer = zctx.socket(zmq.DEALER)
    try:
        router.setsockopt(zmq.LINGER, 0)
        router.bind("tcp://127.0.0.1:*")
        fake = _fake_id()
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, fake.encode() + os.urandom(8))
        dealer.connect(ctrl(asker))
        info = PeerInfo(node_id=fake, name="evil", mesh=mesh,
                        endpoints={"control": (router.getsockopt_string(zmq.LAST_ENDPOINT),)})
        dealer.send_multipart(control.encode_frames(
            [(control.HELLO, msgpack.packb(control.hello_to_wire(Hello(info))))]))
        wait_until(lambda: asker.peers.get(fake) is not None and _pairs(router, "hello"), 10)
        client = StatsClient(asker)

        def ask() -> int:
            assert client.request(fake)
            got: list[Any] = []
            wait_until(lambda: got.extend(_pairs(router, STATS_KIND)) or got, 5)
            rid: int = got[-1]["rid"]
            return rid

        def answer(body: object) -> None:
            dealer.send_multipart(control.encode_frames(
                [(STATS_REPLY_KIND, msgpack.packb(body, use_bin_type=True))]))

        good = {"v": 1, "ok": True, "uptime_s": 1.0, "peers": [], "truncated": []}
        for bad in ("garbage", {**good, "uptime_s": "abc"}, {**good, "peers": 7},
                    {**good, "truncated": [1]}, {**good, "metrics": []}):
            before = client.malformed
            answer(bad if isinstance(bad, str) else {**bad, "rid": ask()})
            wait_until(lambda b=before: client.malformed == b + 1, 5)
        rid = ask()
        answer({**good, "rid": rid + 1, "metrics": {}})  # not the outstanding rid
        wait_until(lambda: client.unexpected == 1, 5)
        esc = "q\x1b[2J\x1b]0;pwned\x07"
        answer({**good, "rid": rid, "name": "\x1b[31m", "metrics": {
            "queue_pending": {"samples": [{"labels": {"queue": esc}, "value": 3},
                                          {"labels": {"queue": 5}, "value": 1}, "junk",
                                          {"labels": {"queue": "n"}, "value": float("nan")},
                                          {"labels": {"queue": "b"}, "value": True}]},
            "consumer_lag": {"samples": 7}, "requests_served_total": "x",
            "events_published_total": {"samples": [{"labels": {"pattern": "pubsub",
                                                               "stream": "s" * 10_000},
                                                    "value": 1}]}}})
        wait_until(lambda: fake in client.latest, 5)
        view = build_view(asker.id, asker.name, mesh, asker.peers.records(),
                          client.snapshot(), {})
        assert [(q["queue"], q["depth"]) for q in view["queues"]] == [(esc, 3)]
        text = "\n".join(render(view))
        assert "\x1b" not in text and "\x07" not in text and "q?[2J" in text
        assert max(map(len, text.splitlines())) < 400  # a 10,000-char name is cut
        json.dumps(view)  # still data
    finally:
        dealer.close()
        router.close()
        asker.close()
