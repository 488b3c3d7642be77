"""zeromesh against the CNCF CloudEvents SDK (PyPI ``cloudevents`` >= 2.2, a test dependency).

Both ways: the SDK parses every event zeromesh emits, in structured mode (``to_cloudevent_json``,
the bridge's structured payload) and in binary mode (the bridge's MQTT user properties and NATS
headers), and zeromesh reads back what the SDK writes.

The SDK has no MQTT or NATS converter. Binary mode is checked through the SDK's converters whose
encoding rules are the same as the binding's:

* MQTT (binding v1.0.2): user properties named as the attributes, values the canonical string,
  unencoded UTF-8; ``datacontenttype`` in the Content Type property. The SDK's Kafka binding has
  exactly these value rules (UTF-8 header values, ``datacontenttype`` in ``content-type``); only
  the names differ (``ce_`` prefix), so a user property ``x`` is handed to it as header ``ce_x``.
* NATS (binding 1.0.3-wip draft): ``ce-`` headers with percent-encoded values, the rule of the
  HTTP binding; ``ce-datacontenttype`` is handed to the SDK's HTTP binding as ``content-type``.

The SDK does not check the String character rules of the spec (no control characters,
noncharacters, lone surrogates) nor the NATS header alphabet: those are checked directly here.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.envelope import Event, from_cloudevent, to_cloudevent, to_cloudevent_json
from mesh.errors import MalformedEvent
from patterns.bridge.mapping import ORIGIN_ATTR, Message, event_to_message, message_to_event

T0 = datetime(2024, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
FMT = JSONFormat()
# Spec v1.0.2, type system, String: these MUST NOT appear.
FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")
# NATS / HTTP header value alphabet after percent-encoding: printable ASCII, no space, no '"'.
HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def make(**kw: Any) -> Event:
    base: dict[str, Any] = {"type": "com.example.thing", "source": "/node/1", "time": T0}
    base.update(kw)
    return Event(**base)


EVENTS = {
    "minimal": make(),
    "full": make(
        subject="日本語 subject", datacontenttype="application/json", correlationid="corr",
        causationid="cause", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        stream="orders.eu", seq=42, headers={"Tenant": "ü\x85 \"q\""},
        extras={"strext": "v %2F/ é 😀", "intmax": 2**31 - 1, "intmin": -(2**31), "flag": True,
                "off": False, "big": 2**40, "dataschema": "https://example.com/s"},
        data={"k": [1, "é", None], "n": 2.5},
    ),
    "percent_slash": make(subject="%2F/literal %41 100%", data=b"", datacontenttype="text/plain"),
    "binary_data": make(data=b"\x00\xff binary", datacontenttype="application/octet-stream"),
    "text": make(data="héllo", datacontenttype="text/plain", subject="a\"quoted\" one"),
    "none_data": make(data=None, subject="x"),
    "list_data": make(data=[1, 2, "three"]),
    "big_seq": make(stream="s", seq=2**40),
    "msgpack_data": make(data={"blob": b"\x01", "n": 1}),
    "euro": make(subject="Euro € 😀", source="/ü/ñ"),
}


def _sdk_attrs(ev: Any) -> dict[str, Any]:
    return dict(ev.get_attributes())


def _check_strings(attrs: dict[str, Any]) -> None:
    for name, value in attrs.items():
        assert re.fullmatch("[a-z0-9]+", name), name
        if isinstance(value, str):
            assert FORBIDDEN.search(value) is None, (name, value)


def _expected_structured(ev: Event) -> tuple[dict[str, Any], Any]:
    """The attributes (time as a datetime) and data the SDK must see in to_cloudevent(ev)."""
    ce = to_cloudevent(ev)
    data: Any = None
    if "data_base64" in ce:
        data = base64.b64decode(ce.pop("data_base64"))
    elif "data" in ce:
        data = ce.pop("data")
    ce["time"] = ev.time
    return ce, data


# --- zeromesh -> SDK, structured mode ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_sdk_parses_structured_json(name: str) -> None:
    ev = EVENTS[name]
    sdk = FMT.read(None, to_cloudevent_json(ev).encode("utf-8"))
    assert isinstance(sdk, CloudEvent)
    attrs, data = _expected_structured(ev)
    assert _sdk_attrs(sdk) == attrs
    assert sdk.get_data() == data
    _check_strings(attrs)
    # The SDK's own writer re-emits it, and zeromesh reads that back to the same event.
    assert from_cloudevent(FMT.write(sdk)) == ev


@pytest.mark.parametrize("name", sorted(EVENTS))
@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_sdk_parses_the_bridge_structured_payload(name: str, kind: str) -> None:
    ev = EVENTS[name]
    origin = "Zürich mesh/b"  # a mesh name may be any text: the NATS header is percent-encoded
    msg = event_to_message(ev, "t", kind=kind, mode="structured", origin=origin)  # type: ignore[arg-type]
    assert msg.content_type == "application/cloudevents+json"
    sdk = ce_http.from_structured(ce_http.HTTPMessage({"content-type": msg.content_type},
                                                      msg.payload), FMT)
    attrs, data = _expected_structured(ev.replace(extras={**ev.extras, ORIGIN_ATTR: origin}))
    assert _sdk_attrs(sdk) == attrs and sdk.get_data() == data
    repeated = dict(msg.attrs)
    if kind == "nats":
        assert all(c in HEADER_SAFE or c == "%" for v in repeated.values() for c in v)
        assert unquote(repeated["ce-bridgeorigin"]) == origin
    else:
        assert repeated["bridgeorigin"] == origin


# --- zeromesh -> SDK, binary mode -------------------------------------------------------------


def _expected_binary(ev: Event, origin: str = "O/b") -> dict[str, Any]:
    """The attributes a binary-mode receiver must see: canonical strings (time a datetime)."""
    ce, _ = _expected_structured(ev.replace(extras={**ev.extras, ORIGIN_ATTR: origin}))
    ce.pop("meshdataenc", None)  # binary mode sets its own (checked with the payload)
    out: dict[str, Any] = {}
    for k, v in ce.items():
        if k == "time":
            out[k] = v
        elif isinstance(v, bool):
            out[k] = "true" if v else "false"
        else:
            out[k] = v if isinstance(v, str) else str(v)
    return out


def _check_binary_data(ev: Event, payload: bytes, sdk_attrs: dict[str, Any]) -> None:
    enc = sdk_attrs.pop("meshdataenc", None)
    if isinstance(ev.data, bytes):
        assert enc is None and payload == ev.data
    elif ev.data is None:
        assert enc == "none" and payload == b""
    elif enc == "json":
        assert json.loads(payload) == ev.data
    else:
        assert enc == "msgpack"


def mqtt_as_kafka(msg: Message) -> ce_kafka.KafkaMessage:
    headers = {f"ce_{k}": v.encode("utf-8") for k, v in msg.attrs}
    if msg.content_type is not None:
        headers["content-type"] = msg.content_type.encode("utf-8")
    return ce_kafka.KafkaMessage(headers=headers, key=None, value=msg.payload)


def nats_as_http(msg: Message) -> ce_http.HTTPMessage:
    headers: dict[str, str] = {}
    for k, v in msg.attrs:
        if k.lower() == "ce-datacontenttype":
            headers["content-type"] = unquote(v, errors="strict")
        elif k.lower().startswith("ce-"):
            headers[k] = v
    return ce_http.HTTPMessage(headers=headers, body=msg.payload)


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_sdk_parses_the_bridge_mqtt_binary_message(name: str) -> None:
    ev = EVENTS[name]
    msg = event_to_message(ev, "site/x", kind="mqtt", mode="binary", origin="O/b")
    # The binding: names unchanged, datacontenttype only in the Content Type property.
    assert msg.content_type == ev.datacontenttype
    assert "datacontenttype" not in dict(msg.attrs)
    sdk = ce_kafka.from_binary(mqtt_as_kafka(msg), FMT)
    attrs = _sdk_attrs(sdk)
    _check_binary_data(ev, msg.payload, attrs)
    expected = _expected_binary(ev)
    assert attrs == expected  # values unencoded: "日本語", a literal "%2F" as is
    _check_strings(attrs)


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_sdk_parses_the_bridge_nats_binary_message(name: str) -> None:
    ev = EVENTS[name]
    msg = event_to_message(ev, "site.x", kind="nats", mode="binary", origin="O/b",
                           extra_attrs={"Nats-Msg-Id": ev.id})
    for k, v in msg.attrs:
        assert all(c in HEADER_SAFE or c == "%" for c in v), (k, v)  # percent-encoded
        assert k.lower() != "content-type"  # that header marks structured mode
    assert msg.content_type is None
    sdk = ce_http.from_binary(nats_as_http(msg), FMT)
    attrs = _sdk_attrs(sdk)
    _check_binary_data(ev, msg.payload, attrs)
    assert attrs == _expected_binary(ev)  # percent-decoded by the SDK: the original strings
    _check_strings(attrs)


def test_nats_header_encoding_matches_the_sdk_http_encoder() -> None:
    # The SDK's HTTP encoder implements the same percent-encoding rule: same bytes.
    ev = EVENTS["euro"]
    ours = dict(event_to_message(ev, "s", kind="nats", mode="binary", origin="O").attrs)
    assert ours["ce-subject"] == "Euro%20%E2%82%AC%20%F0%9F%98%80"  # the draft's own example
    assert ours["ce-subject"] == quote("Euro € 😀", safe=HEADER_SAFE)
    assert ours["ce-source"] == "/%C3%BC/%C3%B1"


# Anything the constructor accepts must be an event the SDK takes, in every mode. On a build
# that accepted subject="" or datacontenttype="" this fails at once.
any_text = st.none() | st.text(max_size=6)


@settings(max_examples=150, deadline=None)
@given(subject=any_text, dct=any_text, corr=any_text,
       extra=st.none() | st.text(max_size=4) | st.integers(-(2**40), 2**40) | st.booleans())
def test_every_event_the_constructor_accepts_is_one_the_sdk_parses(
        subject: str | None, dct: str | None, corr: str | None, extra: Any) -> None:
    try:
        ev = make(subject=subject, datacontenttype=dct, correlationid=corr,
                  extras=None if extra is None else {"ext": extra}, data={"a": 1})
    except MalformedEvent:
        return
    sdk = FMT.read(None, to_cloudevent_json(ev).encode("utf-8"))
    _check_strings(_sdk_attrs(sdk))
    m = event_to_message(ev, "t", kind="mqtt", mode="binary", origin="O")
    _check_strings(_sdk_attrs(ce_kafka.from_binary(mqtt_as_kafka(m), FMT)))
    n = event_to_message(ev, "t", kind="nats", mode="binary", origin="O")
    got = _sdk_attrs(ce_http.from_binary(nats_as_http(n), FMT))
    assert got.pop("meshdataenc") == "json" and got == _expected_binary(ev, "O")


# --- SDK -> zeromesh --------------------------------------------------------------------------

SDK_ATTRS: dict[str, Any] = {
    "id": "A234-1234-1234", "source": "https://example.com/src", "type": "com.example.t",
    "subject": "日本語 %2F/ subject", "time": T0, "dataschema": "https://example.com/schema",
    "comexampleextension1": "value é", "intext": 2**31 - 1, "negext": -(2**31),
    "boolext": True,
}
SDK_DATA: list[tuple[str | None, Any]] = [
    ("application/json", {"k": [1, "é"], "n": None}),
    ("text/plain", "plain text ü"),
    ("application/octet-stream", b"\x00\xff raw"),
    (None, None),
]


@pytest.mark.parametrize(("dct", "data"), SDK_DATA)
def test_zeromesh_reads_sdk_structured_events(dct: str | None, data: Any) -> None:
    attrs = dict(SDK_ATTRS)
    if dct is not None:
        attrs["datacontenttype"] = dct
    text = FMT.write(CloudEvent(dict(attrs), data))
    ev = from_cloudevent(text)
    assert (ev.id, ev.source, ev.type, ev.subject, ev.time) == (
        attrs["id"], attrs["source"], attrs["type"], attrs["subject"], T0)
    assert ev.datacontenttype == dct
    assert ev.extras == {k: attrs[k] for k in ("dataschema", "comexampleextension1", "intext",
                                                "negext", "boolext")}
    assert ev.data == data
    # And back: the SDK reads zeromesh's rendering of it with the same attributes and data.
    again = FMT.read(None, to_cloudevent_json(ev).encode())
    got = _sdk_attrs(again)
    assert got.pop("meshversion") == "1.0"
    assert got == {"specversion": "1.0", **attrs} and again.get_data() == data


@pytest.mark.parametrize(("dct", "data"), SDK_DATA)
def test_zeromesh_bridge_reads_sdk_binary_messages(dct: str | None, data: Any) -> None:
    attrs = dict(SDK_ATTRS)
    if dct is not None:
        attrs["datacontenttype"] = dct
    sdk_ev = CloudEvent(dict(attrs), data)
    # HTTP binding encoding (percent-encoded ce- headers) as a NATS binary message.
    h = ce_http.to_binary(sdk_ev, FMT)
    nats_attrs = [(k, v) for k, v in h.headers.items() if k != "content-type"]
    if "content-type" in h.headers:
        nats_attrs.append(("ce-datacontenttype", quote(h.headers["content-type"],
                                                         safe=HEADER_SAFE)))
    # Kafka binding encoding (unencoded UTF-8 values) as an MQTT 5 binary message.
    k = ce_kafka.to_binary(sdk_ev, FMT)
    mqtt_attrs = tuple((n[3:], v.decode()) for n, v in k.headers.items() if n.startswith("ce_"))
    ctype = k.headers.get("content-type")
    msgs = [("nats", Message("a.b", h.body, tuple(nats_attrs))),
            ("mqtt", Message("a/b", k.value, mqtt_attrs,
                             None if ctype is None else ctype.decode()))]
    for kind, msg in msgs:
        ev = message_to_event(msg, kind=kind, origin="O")  # type: ignore[arg-type]
        assert (ev.id, ev.source, ev.type, ev.subject, ev.time) == (
            attrs["id"], attrs["source"], attrs["type"], attrs["subject"], T0), kind
        assert ev.datacontenttype == dct, kind
        # Binary mode carries every extension as its canonical string.
        assert ev.extras == {"dataschema": attrs["dataschema"],
                             "comexampleextension1": "value é", "intext": str(2**31 - 1),
                             "negext": str(-(2**31)), "boolext": "True", ORIGIN_ATTR: "O"}, kind
        assert ev.data == msg.payload, kind  # no meshdataenc: the payload bytes as is


@pytest.mark.parametrize(("extra", "field"), [
    ({"bigext": 2**31}, "bigext"),  # the SDK writes any int; the spec's Integer is 32-bit
    ({"negext": -(2**31) - 1}, "negext"),
    ({"ctlext": "line\nbreak"}, "ctlext"),  # a control character in a String
    ({"subject": "tab\there"}, "subject"),
])
def test_zeromesh_refuses_sdk_output_that_breaks_the_spec(extra: dict[str, Any],
                                                           field: str) -> None:
    attrs = {"id": "1", "source": "/s", "type": "t", **extra}
    with pytest.raises(MalformedEvent) as ei:
        from_cloudevent(FMT.write(CloudEvent(attrs, None)))
    assert ei.value.field == field
