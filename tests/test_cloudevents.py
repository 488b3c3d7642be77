"""CloudEvents 1.0 structured-mode JSON conversion, both ways."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgpack
import pytest

from mesh.envelope import (
    Event,
    decode,
    encode_new,
    encode_new_many,
    from_cloudevent,
    to_cloudevent,
    to_cloudevent_json,
)
from mesh.errors import CodecError, MalformedEvent, UnsupportedVersion

T0 = datetime(2024, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


def make(**kw: Any) -> Event:
    base: dict[str, Any] = {"type": "com.example.thing", "source": "/node/1", "time": T0}
    base.update(kw)
    return Event(**base)


def minimal(**kw: Any) -> dict[str, Any]:
    ce: dict[str, Any] = {"specversion": "1.0", "id": "A234-1234-1234", "source": "/x", "type": "t"}
    ce.update(kw)
    return ce


# --- to_cloudevent ------------------------------------------------------------------------


def test_to_cloudevent_core_attributes() -> None:
    ev = make(
        subject="s1",
        datacontenttype="application/json",
        correlationid="corr",
        causationid="cause",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        data={"temp": 21.5},
    )
    ce = to_cloudevent(ev)
    assert ce["specversion"] == "1.0"
    assert ce["id"] == ev.id and ce["source"] == "/node/1" and ce["type"] == "com.example.thing"
    assert ce["time"] == "2024-03-04T05:06:07.891011Z"
    assert ce["subject"] == "s1" and ce["datacontenttype"] == "application/json"
    assert ce["correlationid"] == "corr" and ce["causationid"] == "cause"
    assert ce["traceparent"].startswith("00-")
    assert ce["data"] == {"temp": 21.5} and "data_base64" not in ce
    assert ce["meshversion"] == "1.0"
    assert "meshstream" not in ce and "meshseq" not in ce and "meshheaders" not in ce


def test_to_cloudevent_omits_absent_optionals() -> None:
    ce = to_cloudevent(make())
    assert set(ce) == {"specversion", "id", "source", "type", "time", "meshversion"}


def test_to_cloudevent_bytes_as_data_base64() -> None:
    ce = to_cloudevent(make(data=b"\x00\x01binary", datacontenttype="application/octet-stream"))
    assert base64.b64decode(ce["data_base64"]) == b"\x00\x01binary"
    assert "data" not in ce and "meshdataenc" not in ce


def test_to_cloudevent_mesh_fields_as_lowercase_extensions() -> None:
    ev = make(stream="orders", seq=42, headers={"Tenant-Id": "acme"})
    ce = to_cloudevent(ev)
    assert ce["meshstream"] == "orders" and ce["meshseq"] == 42
    assert json.loads(ce["meshheaders"]) == {"Tenant-Id": "acme"}
    for name in ce:
        assert name == "data_base64" or (name.isascii() and name.isalnum() and name.islower())


def test_to_cloudevent_large_seq_is_a_string() -> None:
    # CloudEvents Integer is 32-bit signed: a larger seq travels as its decimal string.
    ce = to_cloudevent(make(seq=2**40))
    assert ce["meshseq"] == str(2**40)
    assert from_cloudevent(ce).seq == 2**40
    assert to_cloudevent(make(seq=2**31 - 1))["meshseq"] == 2**31 - 1


def test_to_cloudevent_non_json_data_is_msgpack_base64() -> None:
    data = {"blob": b"\xff", "n": [1, 2]}
    ce = to_cloudevent(make(data=data))
    assert ce["meshdataenc"] == "msgpack"
    assert msgpack.unpackb(base64.b64decode(ce["data_base64"])) == data
    assert from_cloudevent(ce).data == data


def test_to_cloudevent_extras_as_extensions_or_meshextras() -> None:
    extras = {
        "dataschema": "https://example.com/schema",
        "priority": 3,
        "flag": True,
        "BadName": "x",
        "nested": {"a": 1},
        "big": 2**40,
        "meshseq": "collides",
    }
    ce = to_cloudevent(make(extras=extras))
    assert ce["dataschema"] == "https://example.com/schema"
    assert ce["priority"] == 3 and ce["flag"] is True
    rest = msgpack.unpackb(base64.b64decode(ce["meshextras"]))
    assert rest == {"BadName": "x", "nested": {"a": 1}, "big": 2**40, "meshseq": "collides"}
    assert "meshseq" not in ce
    assert from_cloudevent(ce).extras == extras


def test_to_cloudevent_json_is_valid_json() -> None:
    ev = make(data="héllo", stream="s")
    text = to_cloudevent_json(ev)
    assert json.loads(text)["data"] == "héllo"
    assert from_cloudevent(text) == ev
    assert from_cloudevent(text.encode()) == ev


def test_to_cloudevent_refuses_non_event() -> None:
    with pytest.raises(MalformedEvent):
        to_cloudevent({"id": "x"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [None, "text", 0, -5, 1.5, True, False, [1, "a", None], {"k": {"n": [1.0]}}, b"", b"\x00"],
)
def test_cloudevent_round_trip_data(data: Any) -> None:
    ev = make(data=data, stream="s", seq=1, headers={"a": "b"}, correlationid="c")
    assert from_cloudevent(to_cloudevent(ev)) == ev
    assert from_cloudevent(to_cloudevent_json(ev)) == ev


def test_cloudevent_round_trip_nan_via_msgpack() -> None:
    ev = make(data=[float("inf")])
    ce = to_cloudevent(ev)
    assert ce["meshdataenc"] == "msgpack"
    assert from_cloudevent(ce) == ev


def test_cloudevent_round_trip_keeps_higher_minor() -> None:
    ev = make(version=(1, 4), extras={"newthing": "v"})
    back = from_cloudevent(to_cloudevent_json(ev))
    assert back == ev and back.version == (1, 4)


# --- from_cloudevent ------------------------------------------------------------------------


def test_from_cloudevent_spec_example() -> None:
    text = """{
        "specversion" : "1.0",
        "type" : "com.github.pull_request.opened",
        "source" : "https://github.com/cloudevents/spec/pull",
        "subject" : "123",
        "id" : "A234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "comexampleothervalue" : 5,
        "datacontenttype" : "text/xml",
        "data" : "<much wow=\\"xml\\"/>"
    }"""
    ev = from_cloudevent(text)
    assert ev.id == "A234-1234-1234" and ev.subject == "123"
    assert ev.time == datetime(2018, 4, 5, 17, 31, tzinfo=UTC)
    assert ev.data == '<much wow="xml"/>' and ev.datacontenttype == "text/xml"
    assert ev.extras == {"comexampleextension1": "value", "comexampleothervalue": 5}
    assert ev.stream == "" and ev.seq is None and ev.version == (1, 0)
    back = to_cloudevent(ev)
    assert back["comexampleextension1"] == "value" and back["comexampleothervalue"] == 5


def test_from_cloudevent_data_base64() -> None:
    ev = from_cloudevent(minimal(data_base64=base64.b64encode(b"\x00\xffraw").decode()))
    assert ev.data == b"\x00\xffraw"


def test_from_cloudevent_time_forms() -> None:
    assert from_cloudevent(minimal(time="2020-01-01T00:00:00.123456789Z")).time == datetime(
        2020, 1, 1, 0, 0, 0, 123456, tzinfo=UTC
    )
    t = from_cloudevent(minimal(time="2020-01-01T02:00:00+02:00")).time
    assert t == datetime(2020, 1, 1, tzinfo=UTC) and t.tzinfo is UTC
    assert from_cloudevent(minimal(time="2020-01-01t00:00:00.5z")).time.microsecond == 500000
    before = datetime.now(UTC)
    assert from_cloudevent(minimal()).time >= before - timedelta(milliseconds=1)
    tz = timezone(timedelta(hours=-5, minutes=-30))
    assert from_cloudevent(minimal(time="2020-01-01T00:00:00-05:30")).time == datetime(
        2020, 1, 1, tzinfo=tz
    )


def test_from_cloudevent_null_attributes_are_absent() -> None:
    ev = from_cloudevent(minimal(subject=None, data=None, time=None, meshseq=None))
    assert ev.subject is None and ev.data is None and ev.seq is None


@pytest.mark.parametrize(
    ("ce", "field"),
    [
        ({"id": "1", "source": "/x", "type": "t"}, "specversion"),
        (minimal(id=None), "id"),
        (minimal(id=""), "id"),
        (minimal(id=5), "id"),
        (minimal(source=None), "source"),
        (minimal(source=""), "source"),
        (minimal(type=None), "type"),
        (minimal(type=["t"]), "type"),
        (minimal(time="yesterday"), "time"),
        (minimal(time="2020-01-01T00:00:00"), "time"),  # no offset: not RFC 3339
        (minimal(time="2020-13-01T00:00:00Z"), "time"),
        (minimal(time="2020-01-01T00:00:00+25:00"), "time"),
        (minimal(time=1577836800), "time"),
        (minimal(subject=1), "subject"),
        (minimal(datacontenttype=True), "datacontenttype"),
        (minimal(traceparent=1), "traceparent"),
        (minimal(data="x", data_base64="eA=="), "data"),
        (minimal(data_base64="not base64!"), "data_base64"),
        (minimal(data_base64=123), "data_base64"),
        (minimal(data_base64="eA==", meshdataenc="zstd"), "meshdataenc"),
        (minimal(data_base64="wQ==", meshdataenc="msgpack"), "data_base64"),
        (minimal(meshseq=-1), "meshseq"),
        (minimal(meshseq="12a"), "meshseq"),
        (minimal(meshseq=1.5), "meshseq"),
        (minimal(meshstream=3), "meshstream"),
        (minimal(meshversion="one"), "meshversion"),
        (minimal(meshversion=1), "meshversion"),
        (minimal(meshheaders="{not json"), "meshheaders"),
        (minimal(meshheaders='["a"]'), "meshheaders"),
        (minimal(meshheaders='{"a": 1}'), "headers"),
        (minimal(meshextras="gQ=="), "meshextras"),  # a truncated map
        (minimal(meshextras="kQE="), "meshextras"),  # an array, not a map
        (minimal(**{"Bad-Name": "x"}), "extras"),
        (minimal(**{"": "x"}), "extras"),
        (minimal(ext=1.5), "ext"),
        (minimal(ext={"a": 1}), "ext"),
        (minimal(ext=[1]), "ext"),
    ],
)
def test_from_cloudevent_invalid_refused(ce: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedEvent) as ei:
        from_cloudevent(ce)
    assert ei.value.field == field


@pytest.mark.parametrize("text", ["", "{", "[]", "42", '"str"', "null", b"\xff\xfe", "[" * 100_000])
def test_from_cloudevent_not_a_json_object_refused(text: str | bytes) -> None:
    with pytest.raises(MalformedEvent):
        from_cloudevent(text)


def test_from_cloudevent_deep_data_refused() -> None:
    deep = "[" * 500 + "]" * 500
    with pytest.raises(MalformedEvent):
        from_cloudevent(
            '{"specversion":"1.0","id":"1","source":"s","type":"t","data":' + deep + "}"
        )


def test_from_cloudevent_other_specversion_refused() -> None:
    with pytest.raises(UnsupportedVersion) as ei:
        from_cloudevent(minimal(specversion="0.3"))
    assert ei.value.version == "0.3"


def test_from_cloudevent_other_mesh_major_refused() -> None:
    with pytest.raises(UnsupportedVersion):
        from_cloudevent(minimal(meshversion="2.0"))


def test_from_cloudevent_errors_are_codec_errors() -> None:
    for bad in (None, 5, [1], {"specversion": 1}):
        with pytest.raises(CodecError):
            from_cloudevent(bad)  # type: ignore[arg-type]


# --- CloudEvents 1.0.2 attribute rules ----------------------------------------------------

# Each is forbidden in a CloudEvents String: C0 and C1 controls, DEL, noncharacters, surrogates.
BAD_STRINGS = ["a\nb", "tab\t", "\x00", "\x7f", "x\x85", "\ufffe", "\ufdd0", "\U0010ffff",
               "\ud800", "lone\udc00"]


@pytest.mark.parametrize("field", ["subject", "datacontenttype"])
def test_empty_optional_attribute_refused_at_construction(field: str) -> None:
    with pytest.raises(MalformedEvent) as ei:
        make(**{field: ""})
    assert ei.value.field == field
    with pytest.raises(MalformedEvent):
        make().replace(**{field: ""})
    with pytest.raises(MalformedEvent):
        encode_new(type="t", source="s", stream="a", seq=0, **{field: ""})
    with pytest.raises(MalformedEvent):
        from_cloudevent(minimal(**{field: ""}))
    assert getattr(make(**{field: "x"}), field) == "x"


def test_empty_subject_refused_by_encode_new_many() -> None:
    with pytest.raises(MalformedEvent):
        encode_new_many([b"x"], type="t", source="s", stream="a", first_seq=0, subject="")


@pytest.mark.parametrize("bad", BAD_STRINGS)
@pytest.mark.parametrize("field", ["type", "source", "id", "subject", "datacontenttype",
                                   "correlationid", "causationid", "traceparent"])
def test_forbidden_characters_refused_at_construction(field: str, bad: str) -> None:
    with pytest.raises(MalformedEvent) as ei:
        make(**{field: bad})
    assert ei.value.field == field
    with pytest.raises(MalformedEvent):
        make().replace(**{field: bad})


@pytest.mark.parametrize("field", ["type", "source", "subject", "datacontenttype",
                                   "correlationid"])
def test_forbidden_characters_refused_by_encode_new(field: str) -> None:
    kw: dict[str, Any] = {"type": "t", "source": "s", field: "x\x85"}
    with pytest.raises(MalformedEvent):
        encode_new(stream="a", seq=0, **kw)


def test_non_ascii_and_percent_strings_are_valid() -> None:
    ev = make(subject="日本語 subject %2F/ 😀", type="é.t", source="/ü", correlationid="")
    assert from_cloudevent(to_cloudevent_json(ev)) == ev


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**32, 2**63])
def test_from_cloudevent_extension_integer_beyond_32_bits_refused(value: int) -> None:
    with pytest.raises(MalformedEvent) as ei:
        from_cloudevent(minimal(ext=value))
    assert ei.value.field == "ext"
    with pytest.raises(MalformedEvent):
        from_cloudevent(json.dumps(minimal(ext=value)))


def test_from_cloudevent_extension_integer_bounds_accepted() -> None:
    ev = from_cloudevent(minimal(lo=-(2**31), hi=2**31 - 1))
    assert ev.extras == {"lo": -(2**31), "hi": 2**31 - 1}


@pytest.mark.parametrize("text", [
    '{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a\\ud800"}',
    '{"specversion":"1.0","id":"1","source":"s","type":"t","data":"\\udc00"}',
    '{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"k":["\\ud83d"]}}',
    '{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"\\ud800":1}}',
    '{"specversion":"1.0","id":"1","source":"s","type":"t","ext":"\\ud800"}',
    '{"specversion":"1.0","id":"1","source":"s","type":"t","meshheaders":"{\\"a\\":\\"\\\\ud800\\"}"}',
])
def test_from_cloudevent_lone_surrogate_refused(text: str) -> None:
    with pytest.raises(MalformedEvent):
        from_cloudevent(text)
    with pytest.raises(MalformedEvent):
        from_cloudevent(json.loads(text))  # the parsed object: the same answer


def test_from_cloudevent_surrogate_pair_is_one_character() -> None:
    ev = from_cloudevent('{"specversion":"1.0","id":"1","source":"s","type":"t",'
                         '"subject":"\\ud83d\\ude00","data":"\\ud83d\\ude00"}')
    assert ev.subject == "😀" and ev.data == "😀"


@pytest.mark.parametrize("ce", [
    minimal(ext="a\nb"), minimal(ext="\x85"), minimal(ext="\ufffe"),
    minimal(dataschema=""), minimal(dataschema=5),
])
def test_from_cloudevent_invalid_extension_value_refused(ce: dict[str, Any]) -> None:
    with pytest.raises(MalformedEvent):
        from_cloudevent(ce)


def test_to_cloudevent_keeps_invalid_strings_out_of_attributes() -> None:
    extras = {"note": "line\nbreak", "dataschema": "", "c1": "\x85", "ok": "日本"}
    ev = make(extras=extras, headers={"k": "\x85 日本"})
    ce = to_cloudevent(ev)
    assert ce["ok"] == "日本"
    assert "note" not in ce and "dataschema" not in ce and "c1" not in ce  # in meshextras
    assert ce["meshheaders"].isascii() and ce["meshheaders"].isprintable()
    assert from_cloudevent(ce) == ev and from_cloudevent(to_cloudevent_json(ev)) == ev


def test_to_cloudevent_refuses_a_decoded_event_with_an_empty_subject() -> None:
    # An envelope written by another encoder: the decoder takes it, the CloudEvent refuses it.
    arr = [1, 0, "s", 1, "id-1", 0, "t", "src", "", None, None, None, None, {}, None]
    ev = decode(msgpack.packb(arr))
    assert ev.subject == ""
    with pytest.raises(MalformedEvent) as ei:
        to_cloudevent(ev)
    assert ei.value.field == "subject"
    arr[2] = "bad\x00stream"
    arr[8] = None
    with pytest.raises(MalformedEvent) as ei:
        to_cloudevent(decode(msgpack.packb(arr)))
    assert ei.value.field == "meshstream"


@pytest.mark.parametrize("ce", [
    minimal(time="٢٠٢٠-01-01T00:00:00Z"),  # Arabic-Indic digits: not RFC 3339
    minimal(time="2020-01-01T00:00:00\uff3a"),
    minimal(time="\uff12\uff10\uff12\uff10-01-01T00:00:00Z"),  # full-width digits
    minimal(meshversion="\uff11.0"),
])
def test_from_cloudevent_non_ascii_digits_refused(ce: dict[str, Any]) -> None:
    with pytest.raises(MalformedEvent):
        from_cloudevent(ce)
