"""Fuzzing of every decoder that reads bytes from the network or the disk.

Each decoder gets hostile input three ways: random bytes, random *well-formed msgpack* of
random shape (gets past the first parser, exercises the shape checks), and a valid encoding
with bytes flipped, cut or appended (exercises the checks right next to the happy path). The
property is the same for all of them: the decoder either returns or raises one of the typed
errors it documents (mesh.errors); any other exception is a bug. The hypothesis ``deadline``
catches a hang or quadratic blow-up; the ``tracemalloc`` tests bound what a hostile length
prefix can make a decoder allocate.
"""

from __future__ import annotations

import os
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import control, envelope, txt
from mesh.envelope import Event
from mesh.errors import (
    CertificateError,
    CodecError,
    LogError,
    ProtocolError,
    SecurityError,
)
from mesh.log import Log, LogConfig
from mesh.log import format as logfmt
from mesh.peers import PeerInfo
from patterns.pipeline import frames as pfr
from patterns.pipeline.dlq import _decode_entry
from patterns.pipeline.store import decode_task
from patterns.pubsub import frames as psf
from patterns.reqrep import frames as rrf
from patterns.reqrep.service import decode_body

# Busy shared CI cores: a generous per-example deadline still catches a hang or a blow-up.
FUZZ = settings(max_examples=150, deadline=1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# msgpack-able values of any shape, to get past the first unpack and reach the shape checks.
_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
         | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40))
values = st.recursive(
    _leaf,
    lambda kids: st.lists(kids, max_size=6)
    | st.dictionaries(st.text(max_size=12) | st.integers(-5, 5), kids, max_size=6),
    max_leaves=30,
)
packed = values.map(lambda v: msgpack.packb(v, use_bin_type=True))
blobs = st.binary(max_size=512) | packed


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bytes flipped, then maybe cut or extended."""
    buf = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        if buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()) and buf:
        buf = buf[: draw(st.integers(0, len(buf)))]
    if draw(st.booleans()):
        buf += draw(st.binary(max_size=16))
    return bytes(buf)


def only(errors: tuple[type[BaseException], ...], fn: Callable[[], object]) -> None:
    """Run ``fn``: returning or raising one of ``errors`` is fine; anything else fails."""
    try:
        fn()
    except errors:
        pass


# -- envelope ---------------------------------------------------------------------------------

VALID_EVENT = envelope.encode(Event(type="t.x", source="src", data={"k": [1, 2, b"x"]},
                                    stream="s.a", seq=7, headers={"h": "v"}))


@FUZZ
@given(st.one_of(blobs, mutated(VALID_EVENT)))
def test_envelope_decode_raises_only_codec_errors(buf: bytes) -> None:
    only((CodecError,), lambda: envelope.decode(buf))


# -- control channel --------------------------------------------------------------------------

_INFO = PeerInfo(node_id="a" * 32, name="n", mesh="m", host="h",
                 endpoints={"control": ("tcp://127.0.0.1:5",)}, offers={})


@FUZZ
@given(st.lists(st.binary(max_size=80) | packed
                | mutated(control.encode_header("hello")), max_size=6))
def test_control_decode_frames_raises_only_protocol_errors(frames: list[bytes]) -> None:
    only((ProtocolError,), lambda: control.decode_frames(frames))


@FUZZ
@given(values | st.builds(lambda v, k: {**control.peerinfo_to_wire(_INFO), k: v},
                          values, st.sampled_from(sorted(control.peerinfo_to_wire(_INFO)))))
def test_control_body_decoders_raise_only_protocol_errors(body: Any) -> None:
    only((ProtocolError,), lambda: control.peerinfo_from_wire(body))
    only((ProtocolError,), lambda: control.hello_from_wire(body))
    only((ProtocolError,), lambda: control.gossip_from_wire(body))
    only((ProtocolError,), lambda: control.gossip_from_wire([body, body]))


# -- discovery TXT ----------------------------------------------------------------------------

_VALID_TXT = txt.encode_txt(_INFO).properties


@st.composite
def txt_props(draw: st.DrawFn) -> object:
    base: dict[Any, Any] = dict(_VALID_TXT) if draw(st.booleans()) else {}
    keys = st.binary(max_size=20) | st.text(max_size=20) | st.sampled_from(sorted(base) or [""])
    vals = st.none() | st.binary(max_size=300) | st.text(max_size=40) | st.integers()
    base.update(draw(st.dictionaries(keys, vals, max_size=6)))
    return draw(st.just(base) | values)


@FUZZ
@given(txt_props())
def test_decode_txt_raises_only_txt_errors(props: object) -> None:
    only((ProtocolError,), lambda: txt.decode_txt(props))


# -- durable log (disk) -----------------------------------------------------------------------

VALID_BATCH = logfmt.encode_batch(10, 123, [b"one", b"two", b"three"])


def _parse_all(buf: bytes) -> None:
    """What a segment reader does: walk batches, resynchronise past damage."""
    pos = 0
    while pos < len(buf):
        try:
            hdr = logfmt.check_batch(buf, pos)
        except logfmt.FrameError:
            found = logfmt.find_next_batch(buf, pos, len(buf), 0)
            if found is None:
                return
            pos, hdr = found
        assert len(logfmt.batch_payloads(buf, pos, hdr)) == hdr.records
        pos += hdr.length


@FUZZ
@given(st.binary(max_size=600) | mutated(VALID_BATCH) | mutated(VALID_BATCH + VALID_BATCH))
def test_log_batch_parsing_raises_only_frame_errors(buf: bytes) -> None:
    _parse_all(buf)
    logfmt.decode_index(buf)  # a torn final entry is ignored: never raises


@settings(max_examples=40, deadline=3000,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_log_open_on_damaged_segment_raises_only_log_errors(data: st.DataObject) -> None:
    # A real log on disk, its newest segment then damaged (power-cut or bit-rot): open()
    # recovers or raises LogError, and reading everything it offers raises nothing else.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s")
        with Log.open(path, config=LogConfig()) as lg:
            lg.append_many([b"r%d" % i for i in range(20)])
            lg.append(b"last")
        seg = sorted(f for f in os.listdir(path) if f.endswith(".log"))[-1]
        with open(os.path.join(path, seg), "rb") as f:
            good = f.read()
        with open(os.path.join(path, seg), "wb") as f:
            f.write(data.draw(mutated(good)))
        try:
            with Log.open(path, config=LogConfig()) as lg:
                for _ in lg.iter(0):
                    pass
        except LogError:
            pass


@FUZZ
@given(blobs | mutated(b"\x01" + msgpack.packb(["k", b"p"])))
def test_pipeline_store_records_raise_only_log_errors(buf: bytes) -> None:
    only((LogError,), lambda: decode_task(buf))
    only((LogError,), lambda: _decode_entry(0, buf))


# -- pattern wire frames ----------------------------------------------------------------------

_PS_DATA = psf.encode_data(b"s.a", b"\x01" * 16, 0, 5, [VALID_EVENT], durable=True)


#: packed DATA (pub/sub 2.4): three envelopes in frame 2
_PS_PACKED = psf.encode_data(b"s.a", b"\x01" * 16, 0, 5, [VALID_EVENT] * 3, durable=True,
                             packed=True)


def _ps_frames() -> st.SearchStrategy[list[bytes]]:
    parts = st.binary(max_size=80) | packed | st.sampled_from(_PS_DATA).flatmap(mutated)
    # Mostly the right shape (topic, header, envelope) with one part damaged.
    shaped = st.tuples(*[st.just(f) | mutated(f) for f in _PS_DATA]).map(list)
    shaped_packed = st.tuples(*[st.just(f) | mutated(f) for f in _PS_PACKED]).map(list)
    return st.lists(parts, max_size=5) | shaped | shaped_packed


def _ps_decode(frames: list[bytes]) -> None:
    _, _, run = psf.decode_message(frames, max_event_size=4096)
    psf.run_envelopes(run)  # a packed frame that decoded cuts into its envelopes


@FUZZ
@given(_ps_frames())
def test_pubsub_data_frames_raise_only_typed_errors(frames: list[bytes]) -> None:
    only((ProtocolError, CodecError), lambda: _ps_decode(frames))


@FUZZ
@given(values)
def test_pubsub_control_bodies_raise_only_typed_errors(body: Any) -> None:
    for fn in (psf.decode_replay_request, psf.decode_ack,
               lambda b: psf.decode_replay_data(b, max_event_size=4096)):
        only((ProtocolError, CodecError), lambda fn=fn: fn(body))


_PIPE_VALID = pfr.encode_ids(pfr.ACK, [1, 2, 3])


@FUZZ
@given(st.lists(st.binary(max_size=40) | packed | st.sampled_from(_PIPE_VALID).flatmap(mutated),
                max_size=4)
       | st.builds(lambda c, b: [pfr.header(c), b], st.sampled_from(sorted(pfr.COMMAND_NAMES)),
                   packed))
def test_pipeline_frames_raise_only_protocol_errors(frames: list[bytes]) -> None:
    only((ProtocolError,), lambda: pfr.decode(frames))


_RR_VALID = [*rrf.encode_ping(rrf.Ping(nonce=3, request_id="r1")),
             *rrf.encode_request(rrf.Request("r1", "svc", 1000, 1, rrf.Format.BYTES,
                                             {"h": "v"}, b"body")),
             # the split form (HEAD, META, BODY) next to the compact one-frame form above
             rrf.SIGNATURE + b"\x02", rrf._packb(["r1", 0, 3, 0, "", ""]), b"reply body"]


@FUZZ
@given(st.lists(st.binary(max_size=40) | packed
                | st.sampled_from(list(_RR_VALID)).flatmap(mutated), max_size=6))
def test_reqrep_frames_raise_only_protocol_errors(frames: list[bytes]) -> None:
    only((ProtocolError,), lambda: rrf.decode(frames))


@FUZZ
@given(blobs)
def test_reqrep_msgpack_body_raises_only_protocol_errors(body: bytes) -> None:
    only((ProtocolError,), lambda: decode_body(rrf.Format.MSGPACK, body))


# -- certificates (mesh.security) -------------------------------------------------------------

@FUZZ
@given(blobs | st.builds(lambda a, b: msgpack.packb([a, b]), packed, st.binary(max_size=64)))
def test_certificate_and_crl_parsing_raise_only_certificate_errors(data: bytes) -> None:
    from mesh.security.authority import TrustAnchor
    anchor = TrustAnchor(b"\x01" * 32)
    only((CertificateError,), lambda: anchor.verify(data))
    only((CertificateError,), lambda: anchor.verify_crl(data))


# -- bounded memory on hostile length prefixes ------------------------------------------------

def _peak(fn: Callable[[], object], errors: tuple[type[BaseException], ...]) -> int:
    tracemalloc.start()
    try:
        only(errors, fn)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HOSTILE = [
    b"\xdd\xff\xff\xff\xff",            # array32 claiming 4 G elements
    b"\xdf\xff\xff\xff\xff",            # map32 claiming 4 G pairs
    b"\xdb\xff\xff\xff\xf0abc",         # str32 claiming 4 GiB
    b"\xc6\x7f\xff\xff\xffabc",         # bin32 claiming 2 GiB
    b"\x91" * 100_000 + b"\xc0",        # nesting 100 000 deep
]


@pytest.mark.parametrize("buf", HOSTILE, ids=["array32", "map32", "str32", "bin32", "deep"])
def test_hostile_length_prefix_allocates_little(buf: bytes) -> None:
    limit = 4 * len(buf) + (2 << 20)
    checks: list[tuple[Callable[[], object], tuple[type[BaseException], ...]]] = [
        (lambda: envelope.decode(buf), (CodecError,)),
        (lambda: control.decode_frames([control.encode_header("hello"), buf]), (ProtocolError,)),
        (lambda: pfr.decode([pfr.header(pfr.ACK), buf]), (ProtocolError,)),
        (lambda: decode_body(rrf.Format.MSGPACK, buf), (ProtocolError,)),
        (lambda: decode_task(b"\x01" + buf), (LogError,)),
        (lambda: _decode_entry(0, buf), (LogError,)),
        (lambda: TrustAnchor_verify(buf), (SecurityError,)),
    ]
    for fn, errors in checks:
        assert _peak(fn, errors) < limit


def TrustAnchor_verify(buf: bytes) -> object:
    from mesh.security.authority import TrustAnchor
    return TrustAnchor(b"\x01" * 32).verify(buf)


def test_hostile_log_batch_length_allocates_little() -> None:
    # A batch header claiming the largest length with a few bytes behind it: cut short, and
    # nothing near the claimed size is allocated.
    hdr = struct.pack("<IIBBHQqI", logfmt.MAX_FRAME_BYTES, 0, logfmt.MAGIC, logfmt.VERSION, 0,
                      0, 0, 1)
    buf = hdr + b"\x00" * 64
    assert _peak(lambda: _parse_all(buf), (logfmt.FrameError,)) < 1 << 20
