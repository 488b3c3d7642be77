"""The test vectors of docs/protocol.md ("Test vectors") checked against the codecs.

Each vector is one line of the document's ```vectors block: a name, then the hex of each
ZeroMQ frame (routing ids left out; ``-`` is an empty frame). For every vector this test decodes the document's bytes
and checks the fields, and encodes the same fields and checks the bytes are the document's:
a frame whose encoding changes without the document changing fails here. The "Frame
versions" table of the document is checked against the code's version constants.

``python -m tests.test_protocol_vectors`` prints the block the codecs produce today.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mesh import control, envelope, gossip, txt
from mesh.log import format as logfmt
from mesh.peers import PeerInfo
from patterns.pipeline import frames as pf
from patterns.pubsub import frames as sf
from patterns.reqrep import frames as rf

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
NODE = "8d395d25ecfe4dd581e3e71a9c112cde"
NODE2 = "0123456789abcdef0123456789abcdef"
#: blake2b-8 of NODE2 + NODE (the ids sorted), as docs/protocol.md "Gossip" states it
_DIGEST_HEX = "4a55668447255b0a"
#: the salt of the bucket vectors, and the 2 bucket hashes of NODE and NODE2 under it
#: (docs/protocol.md, "Gossip": blake2b-4 keyed with the salt; NODE2 in bucket 0, NODE in 1)
_SALT = bytes(range(2, 10))
_BUCKETS_HEX = "dc650ed2dc5637a5"
_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def _event() -> envelope.Event:
    return envelope.Event(type="sensor.reading", source="node-1/sensor", data=b"\x01\x02",
                          id="018f0000-0000-7000-8000-000000000001",
                          time=dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC),
                          stream="sensors", seq=7, headers={"unit": "C"})


def _event2() -> envelope.Event:
    return envelope.Event(type="sensor.reading", source="node-1/sensor", data=b"\x03",
                          id="018f0000-0000-7000-8000-000000000002",
                          time=dt.datetime(2026, 12, 2, 12, 0, 1, tzinfo=dt.UTC),
                          stream="sensors", seq=8)


_INFO = PeerInfo(node_id=NODE, name="gw-3", mesh="factory", version=1, host="4c1f0e9a",
                 endpoints={"control": ("tcp://10.0.0.7:41533",)},
                 offers={"stream": ("temps",)}, public_key=None,
                 incarnation=1_764_676_800_000)


def _ctrl(kind: str, body: Any) -> list[bytes]:
    return control.encode_frames([(kind, control.encode_body(body, 1 << 20))])


def _ctrl_check(kind: str) -> Callable[[list[bytes]], Any]:
    def check(frames: list[bytes]) -> Any:
        (m,) = control.decode_frames(frames)
        assert m.error is None and m.kind == kind
        return m.body
    return check


_PUB = sf.node_id_bytes(NODE)
_REQ = rf.Request("r-1", "calibrate", 5000, 0, rf.Format.BYTES, {"correlationid": "c-1"}, b"hi")
_REP = rf.Reply("r-1", rf.Status.OK, 3, rf.Format.BYTES, "", "", b"ok")
_REQS = (_REQ, _REQ._replace(id="r-2", body=b"yo"))
_REPS = (_REP, _REP._replace(id="r-2", body=b"yo"))

# name -> (encode the fields, check the decoded bytes against the fields)
VECTORS: dict[str, tuple[Callable[[], list[bytes]], Callable[[list[bytes]], None]]] = {
    "envelope": (lambda: [envelope.encode(_event())],
                 lambda f: _eq(envelope.decode(f[0]), _event())),
    "control.hello": (
        lambda: _ctrl("hello", control.hello_to_wire(control.Hello(_INFO, dial=7))),
        lambda f: _eq(control.hello_from_wire(_ctrl_check("hello")(f)),
                      control.Hello(_INFO, dial=7))),
    "control.update": (
        lambda: _ctrl("update", control.hello_to_wire(control.Hello(_INFO))),
        lambda f: _eq(control.hello_from_wire(_ctrl_check("update")(f)).info, _INFO)),
    "control.ping": (lambda: _ctrl("ping", 42), lambda f: _eq(_ctrl_check("ping")(f), 42)),
    "control.pong": (lambda: _ctrl("pong", 42), lambda f: _eq(_ctrl_check("pong")(f), 42)),
    "control.gossip": (
        lambda: _ctrl("gossip", control.gossip_to_wire(
            [(NODE2, "factory", "4c1f0e9a", ("tcp://10.0.0.8:41533",), None)])),
        lambda f: _eq(control.gossip_from_wire(_ctrl_check("gossip")(f)),
                      ([(NODE2, "factory", "4c1f0e9a", ("tcp://10.0.0.8:41533",), None)], 0))),
    "control.digest": (
        lambda: _ctrl("digest", control.digest_to_wire(
            control.Digest(gossip.digest([NODE, NODE2]), 2, True))),
        lambda f: _eq(control.digest_from_wire(_ctrl_check("digest")(f)),
                      control.Digest(bytes.fromhex(_DIGEST_HEX), 2, True))),
    "control.digest.buckets": (
        lambda: _ctrl("digest", control.digest_to_wire(control.Digest(
            gossip.digest([NODE, NODE2]), 2, True, _SALT,
            gossip.buckets([NODE, NODE2], _SALT, 2), 2))),
        lambda f: _eq(control.digest_from_wire(_ctrl_check("digest")(f)), control.Digest(
            bytes.fromhex(_DIGEST_HEX), 2, True, _SALT, bytes.fromhex(_BUCKETS_HEX), 2))),
    "control.digest.want": (
        lambda: _ctrl("digest", control.digest_to_wire(control.Digest(
            gossip.digest([NODE, NODE2]), 2, True, _SALT, None, 2, (1,)))),
        lambda f: _eq(control.digest_from_wire(_ctrl_check("digest")(f)), control.Digest(
            bytes.fromhex(_DIGEST_HEX), 2, True, _SALT, None, 2, (1,)))),
    "control.bye": (lambda: _ctrl("bye", None), lambda f: _eq(_ctrl_check("bye")(f), None)),
    "control.node.stats": (
        lambda: _ctrl("node.stats", {"v": 1, "rid": 1, "families": ["mesh_peers"]}),
        lambda f: _eq(_ctrl_check("node.stats")(f), {"v": 1, "rid": 1,
                                                     "families": ["mesh_peers"]})),
    "control.node.stats_reply": (
        lambda: _ctrl("node.stats_reply", {"v": 1, "rid": 1, "ok": False, "error": "forbidden"}),
        lambda f: _eq(_ctrl_check("node.stats_reply")(f),
                      {"v": 1, "rid": 1, "ok": False, "error": "forbidden"})),
    "pubsub.data": (
        lambda: sf.encode_data(b"temps", _PUB, 0x01020304, 7, [envelope.encode(_event())], True),
        lambda f: _eq(_data(f), ("temps", sf.Header(sf.KIND_DATA, True, NODE, 0x01020304, 7, 1),
                                 [_event()]))),
    "pubsub.data_packed": (
        lambda: sf.encode_data(b"temps", _PUB, 0x01020304, 7,
                               [envelope.encode(_event()),
                                envelope.encode(_event2())], True,
                               packed=True),
        lambda f: _eq(_data(f), ("temps", sf.Header(sf.KIND_DATA, True, NODE, 0x01020304, 7, 2),
                                 [_event(), _event2()]))),
    "pubsub.heartbeat": (
        lambda: sf.encode_heartbeat(b"temps", _PUB, 0x01020304, 8, True),
        lambda f: _eq(sf.HEADER.unpack(f[1]),
                      (1, sf.KIND_HEARTBEAT, sf.FLAG_DURABLE, _PUB, 0x01020304, 8, 0))),
    "pubsub.refused": (
        lambda: sf.encode_refused(b"temps", _PUB, sf.REFUSED_FORBIDDEN),
        lambda f: _eq(sf.HEADER.unpack(f[1]),
                      (1, sf.KIND_REFUSED, 0, _PUB, 0, 0, sf.REFUSED_FORBIDDEN))),
    "pubsub.ping": (lambda: sf.encode_ping(_PUB),
                    lambda f: _eq(sf.HEADER.unpack(f[1]), (1, sf.KIND_PING, 0, _PUB, 0, 0, 0))),
    "pubsub.subscribe": (lambda: sf.encode_subscribe(b"temps", prefix=False),
                         lambda f: _eq(sf.decode_subscribe(f), (sf.OP_SUBSCRIBE, "temps", False))),
    "pubsub.subscribe_packed": (
        lambda: sf.encode_subscribe(b"temps", prefix=False, packed=True),
        lambda f: _eq(sf.decode_subscription(f), (sf.OP_SUBSCRIBE, "temps", False, True))),
    "pubsub.replay": (
        lambda: _ctrl(sf.CTRL_REPLAY, sf.ReplayRequest("s1", 1, "temps", 0, None, None, 100,
                                                       65536, 0x01020304).to_body()),
        lambda f: _eq(sf.decode_replay_request(_ctrl_check(sf.CTRL_REPLAY)(f)),
                      sf.ReplayRequest("s1", 1, "temps", 0, None, None, 100, 65536,
                                       0x01020304))),
    "pubsub.replay_data": (
        lambda: _ctrl(sf.CTRL_REPLAY_DATA, sf.ReplayData("s1", 1, "temps", 0, [b"\x90"], 1, 0,
                                                         False, None, 0x01020304).to_body()),
        lambda f: _eq(sf.decode_replay_data(_ctrl_check(sf.CTRL_REPLAY_DATA)(f),
                                            max_event_size=100),
                      sf.ReplayData("s1", 1, "temps", 0, [b"\x90"], 1, 0, False, None,
                                    0x01020304))),
    "pubsub.ack": (lambda: _ctrl(sf.CTRL_ACK, sf.Ack("agg", "temps", 7).to_body()),
                   lambda f: _eq(sf.decode_ack(_ctrl_check(sf.CTRL_ACK)(f)),
                                 sf.Ack("agg", "temps", 7))),
    "pubsub.fetch": (
        lambda: _ctrl(sf.CTRL_FETCH, sf.ReplayRequest("s1", 1, "temps", 0, None, None, 100,
                                                      65536, 0x01020304, origin=NODE).to_body()),
        lambda f: _eq(sf.decode_fetch(_ctrl_check(sf.CTRL_FETCH)(f)),
                      sf.ReplayRequest("s1", 1, "temps", 0, None, None, 100, 65536,
                                       0x01020304, origin=NODE))),
    "pubsub.fetch_data": (
        lambda: _ctrl(sf.CTRL_REPLAY_DATA, sf.ReplayData(
            "s1", 1, "temps", 0, [b"\x90"], 1, 0, False, None, 0x01020304,
            origin=NODE).to_body()),
        lambda f: _eq(sf.decode_replay_data(_ctrl_check(sf.CTRL_REPLAY_DATA)(f),
                                            max_event_size=100),
                      sf.ReplayData("s1", 1, "temps", 0, [b"\x90"], 1, 0, False, None,
                                    0x01020304, origin=NODE))),
    "pubsub.replicated": (
        lambda: _ctrl(sf.CTRL_REPLICATED, sf.Replicated("temps", 0x01020304, 8).to_body()),
        lambda f: _eq(sf.decode_replicated(_ctrl_check(sf.CTRL_REPLICATED)(f)),
                      sf.Replicated("temps", 0x01020304, 8))),
    "pubsub.holdings_req": (
        lambda: _ctrl(sf.CTRL_HOLDINGS_REQ, sf.encode_holdings_req("tem", 3)),
        lambda f: _eq(sf.decode_holdings_req(_ctrl_check(sf.CTRL_HOLDINGS_REQ)(f)),
                      ("tem", 3, None))),
    "pubsub.holdings_req.after": (
        lambda: _ctrl(sf.CTRL_HOLDINGS_REQ, sf.encode_holdings_req("tem", 3, (NODE, "temps"))),
        lambda f: _eq(sf.decode_holdings_req(_ctrl_check(sf.CTRL_HOLDINGS_REQ)(f)),
                      ("tem", 3, (NODE, "temps")))),
    "pubsub.holdings": (
        lambda: _ctrl(sf.CTRL_HOLDINGS, sf.encode_holdings(
            3, [sf.Holding(NODE, "temps", 0, 8, 0x01020304)], False)),
        lambda f: _eq(sf.decode_holdings(_ctrl_check(sf.CTRL_HOLDINGS)(f)),
                      (3, [sf.Holding(NODE, "temps", 0, 8, 0x01020304)], False, None))),
    "pubsub.holdings.page": (
        lambda: _ctrl(sf.CTRL_HOLDINGS, sf.encode_holdings(
            3, [sf.Holding(NODE, "temps", 0, 8, 0x01020304)], True, (NODE, "temps"))),
        lambda f: _eq(sf.decode_holdings(_ctrl_check(sf.CTRL_HOLDINGS)(f)),
                      (3, [sf.Holding(NODE, "temps", 0, 8, 0x01020304)], True,
                       (NODE, "temps")))),
    "pipeline.ready": (lambda: pf.encode_ready(pf.Ready("jobs", 8, NODE, "w1")),
                       lambda f: _eq(pf.decode(f), (pf.READY, pf.Ready("jobs", 8, NODE, "w1")))),
    "pipeline.task": (
        lambda: pf.encode_tasks([(3, 1, 30000, None, b"job")]),
        lambda f: _eq(pf.decode(f), (pf.TASK, [pf.Delivery(3, 1, 30000, None, b"job")]))),
    "pipeline.ack": (lambda: pf.encode_ids(pf.ACK, [3, 4]),
                     lambda f: _eq(pf.decode(f), (pf.ACK, [3, 4]))),
    "pipeline.nack": (
        lambda: pf.encode_failures(pf.NACK, [pf.Failure(3, 1.5, "", "ValueError", "bad", None)]),
        lambda f: _eq(pf.decode(f), (pf.NACK, [pf.Failure(3, 1.5, "", "ValueError", "bad",
                                                          None)]))),
    "pipeline.in_progress": (lambda: pf.encode_ids(pf.IN_PROGRESS, [3]),
                             lambda f: _eq(pf.decode(f), (pf.IN_PROGRESS, [3]))),
    "pipeline.term": (
        lambda: pf.encode_failures(pf.TERM, [pf.Failure(3, None, "poison", None, None, None)]),
        lambda f: _eq(pf.decode(f), (pf.TERM, [pf.Failure(3, None, "poison", None, None,
                                                          None)]))),
    "pipeline.bye": (lambda: pf.encode_ids(pf.BYE, []),
                     lambda f: _eq(pf.decode(f), (pf.BYE, []))),
    "reqrep.request.compact": (lambda: rf.encode_request(_REQ),
                               lambda f: _eq(rf.decode(f), _REQ)),
    "reqrep.request.split": (lambda: rf.to_split(rf.encode_request(_REQ)),
                             lambda f: _eq(rf.decode(f), _REQ)),
    "reqrep.reply.compact": (lambda: rf.encode_reply(_REP), lambda f: _eq(rf.decode(f), _REP)),
    "reqrep.reply.split": (lambda: rf.to_split(rf.encode_reply(_REP)),
                           lambda f: _eq(rf.decode(f), _REP)),
    "reqrep.ping": (lambda: rf.encode_ping(rf.Ping(9, "r-1")),
                    lambda f: _eq(rf.decode(f), rf.Ping(9, "r-1"))),
    "reqrep.pong": (lambda: rf.encode_pong(rf.Pong(9, 3, "r-1", rf.TaskState.RUNNING)),
                    lambda f: _eq(rf.decode(f), rf.Pong(9, 3, "r-1", rf.TaskState.RUNNING))),
    "reqrep.batch.request": (
        lambda: [rf.batch_frame(rf.Command.REQUEST, [rf.encode_request(r)[0] for r in _REQS])],
        lambda f: _eq(rf.decode_rev(f), (rf.Batch(rf.Command.REQUEST, list(_REQS)), 4))),
    "reqrep.batch.reply": (
        lambda: [rf.batch_frame(rf.Command.REPLY, [rf.encode_reply(r)[0] for r in _REPS])],
        lambda f: _eq(rf.decode_rev(f), (rf.Batch(rf.Command.REPLY, list(_REPS)), 4))),
    "txt": (lambda: [txt.pack_txt(list(txt.encode_txt(_INFO).properties.items()))],
            lambda f: _check_txt(f[0])),
    "log.batch": (lambda: [logfmt.encode_batch(5, 1_764_676_800_000_000_000, [b"ab", b"c"])],
                  lambda f: _check_batch(f[0])),
}


def _eq(got: object, want: object) -> None:
    assert got == want, f"{got!r} != {want!r}"


def _data(f: list[bytes]) -> tuple[str, sf.Header, list[envelope.Event]]:
    stream, header, envs = sf.decode_message(f, max_event_size=1 << 20)
    if isinstance(envs, sf.Packed):  # frame 2 is exactly the envelopes back to back
        assert b"".join(envs.envelopes()) == f[2] and len(f) == 3
        assert [envelope.from_unpacked(a) for a in envs.arrays or ()] == [
            envelope.decode(e) for e in envs.envelopes()]
    return stream, header, [envelope.decode(e) for e in sf.run_envelopes(envs)]


def _check_batch(b: bytes) -> None:
    h = logfmt.read_header(b, 0)
    assert (h.length, h.base_offset, h.timestamp_ns, h.records) == (
        len(b), 5, 1_764_676_800_000_000_000, 2)
    assert b.endswith(b"abc") and b[8] == 0xA7 and b[9] == 1


def _check_txt(b: bytes) -> None:
    rec = txt.decode_txt(b)
    _eq(rec.info, _INFO)
    assert not rec.truncated and rec.skipped == ()


def doc_vectors() -> dict[str, list[bytes]]:
    """Name -> frames of every vector line in the document's ```vectors blocks."""
    out: dict[str, list[bytes]] = {}
    for block in re.findall(r"```vectors\n(.*?)```", DOC.read_text(), re.S):
        for line in block.splitlines():
            if line.strip() and not line.startswith("#"):
                name, *hexes = line.split()
                out[name] = [b"" if h == "-" else bytes.fromhex(h) for h in hexes]
    return out


def test_every_frame_type_has_a_vector_in_the_document() -> None:
    assert set(doc_vectors()) == set(VECTORS)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_decodes_to_its_fields_and_encodes_to_its_bytes(name: str) -> None:
    frames = doc_vectors()[name]
    encode, check = VECTORS[name]
    check(frames)
    assert encode() == frames, f"{name}: the encoding changed; update docs/protocol.md"


def test_frame_versions_table_matches_the_code() -> None:
    text = DOC.read_text()
    rows = {(k.split(" ")[0] if not k.startswith("pub") else "pub/sub"): v for k, v in
            re.findall(r"^\| (envelope|control header|pub/sub[^|]*|pipeline|request/reply|"
                       r"`node.stats`|log record batch) \|[^|]*\| (\d+ \| [^|]+) \|$", text, re.M)}
    assert len(rows) == 7, rows
    major = {k: int(v.split("|")[0]) for k, v in rows.items()}
    rev = {k: v.split("|")[1].strip() for k, v in rows.items()}
    assert major["envelope"] == envelope.ENVELOPE_VERSION[0]
    assert rev["envelope"] == "{}.{}".format(*envelope.ENVELOPE_VERSION)
    assert major["control"] == control.SUPPORTED_VERSIONS[-1]
    assert rev["control"] == "{}.{}".format(*control.REVISION)
    assert major["pub/sub"] == sf.VERSION
    assert rev["pub/sub"].startswith("{}.{}".format(*sf.PROTOCOL))
    assert major["pipeline"] == pf.VERSION
    assert major["request/reply"] == int(rf.SIGNATURE[3:].decode())
    assert rev["request/reply"] == f"1.{rf.REVISION}"
    assert major["log"] == logfmt.VERSION


if __name__ == "__main__":
    print("```vectors")
    for n, (enc, _) in VECTORS.items():
        print(n, *(f.hex() or "-" for f in enc()))
    print("```")
