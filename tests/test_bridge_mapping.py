"""Pure bridge logic: route wildcards, envelope mapping both ways, loops, config, extras."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.envelope import Event
from mesh.errors import ConfigError, MalformedEvent, UnsupportedVersion
from patterns.bridge.config import BridgeConfig, load_config
from patterns.bridge.mapping import (
    ORIGIN_ATTR,
    LoopGuard,
    Message,
    Route,
    event_to_message,
    message_to_event,
    origin_of,
)


def test_route_maps_wildcards_both_ways_mqtt() -> None:
    r = Route("sensors.*.temp", "site/+/temp", "both", "mqtt")
    assert r.to_remote("sensors.k1.temp") == "site/k1/temp"
    assert r.to_mesh("site/k1/temp") == "sensors.k1.temp"
    assert r.to_remote("sensors.k1.hum") is None
    assert r.to_mesh("site/k1/x/temp") is None
    assert r.subscription_prefix() == "sensors."


def test_route_maps_rest_wildcard_nats() -> None:
    r = Route("a.>", "x.y.>", "out", "nats")
    assert r.to_remote("a.b.c") == "x.y.b.c"
    assert r.to_mesh("x.y.q") == "a.q"
    assert r.to_remote("a") is None  # '>' needs at least one token
    exact = Route("a.b", "t/u", "out", "mqtt")
    assert exact.to_remote("a.b") == "t/u" and exact.to_remote("a.bc") is None
    assert exact.subscription_prefix() == "a.b"


def test_route_rejects_mismatched_wildcards() -> None:
    with pytest.raises(ConfigError):
        Route("a.*", "x/#", "out", "mqtt")
    with pytest.raises(ConfigError):
        Route("a.>.b", "x/#", "out", "mqtt")
    with pytest.raises(ConfigError):
        Route("a", "x", "sideways", "mqtt")  # type: ignore[arg-type]


def test_mqtt_empty_level_never_becomes_a_mesh_token() -> None:
    assert Route("a.*", "x/+", "in", "mqtt").to_mesh("x/") is None


@given(st.lists(st.text("abc-_0123456789", min_size=1, max_size=5), min_size=1, max_size=4))
def test_route_round_trip(tokens: list[str]) -> None:
    r = Route("m.>", "r/#", "both", "mqtt")
    stream = "m." + ".".join(tokens)
    remote = r.to_remote(stream)
    assert remote is not None and r.to_mesh(remote) == stream


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("data", [b"\x00raw", {"a": [1, 2]}, "text", None, {"b": b"\x01"}])
def test_event_round_trips(kind: str, mode: str, data: object) -> None:
    ev = Event(type="t", source="s", data=data, subject="su", correlationid="c",
               headers={"h": "v"}, datacontenttype="application/x" if data == "text" else None,
               stream="a.b", seq=7)
    msg = event_to_message(ev, "x", kind=kind, mode=mode, origin="O")  # type: ignore[arg-type]
    back = message_to_event(msg, kind=kind, origin="O")  # type: ignore[arg-type]
    assert back.id == ev.id and back.data == data and back.headers == {"h": "v"}
    assert back.subject == "su" and back.correlationid == "c" and back.time == ev.time
    assert back.extras[ORIGIN_ATTR] == "O"
    assert back.stream == "" and back.seq is None
    assert origin_of(msg, kind) == (ev.id, "O")  # type: ignore[arg-type]


def test_binary_mode_attribute_names() -> None:
    ev = Event(type="t", source="s", data=b"p", datacontenttype="image/png")
    m = event_to_message(ev, "x", kind="mqtt", mode="binary", origin="O")
    assert m.payload == b"p" and m.content_type == "image/png"
    assert ("id", ev.id) in m.attrs and ("specversion", "1.0") in m.attrs
    n = event_to_message(ev, "x", kind="nats", mode="binary", origin="O",
                         extra_attrs={"Nats-Msg-Id": ev.id})
    assert ("ce-id", ev.id) in n.attrs and ("Nats-Msg-Id", ev.id) in n.attrs
    # The NATS binding (1.0.3-wip draft) maps datacontenttype to ce-datacontenttype; a
    # content-type header would mark the message as structured mode.
    assert ("ce-datacontenttype", "image/png") in n.attrs and n.content_type is None
    assert all(k.lower() != "content-type" for k, _ in n.attrs)
    assert ("datacontenttype", "image/png") not in m.attrs  # MQTT: the Content Type property


def test_plain_broker_message_is_wrapped() -> None:
    ev = message_to_event(Message("site/a", b"21.5"), kind="mqtt", origin="O")
    assert ev.data == b"21.5" and ev.subject == "site/a" and ev.type == "mqtt.message"
    assert ev.source == "mqtt:site/a"


@pytest.mark.parametrize("msg", [
    Message("t", b"{not json", (), "application/cloudevents+json"),
    Message("t", b"\xff", (), "application/cloudevents+json"),
    Message("t", b"x", (("specversion", "1.0"), ("source", "s"))),  # no id, no type
    Message("t", b"x", (("specversion", "1.0"), ("id", "i"), ("source", "s"), ("type", "t"),
                        ("meshdataenc", "json"))),  # payload is not JSON
    Message("t", b"x", (("specversion", "1.0"), ("id", "i"), ("source", "s"), ("type", "t"),
                        ("meshdataenc", "rot13"))),
])
def test_malformed_messages_raise_malformed_event(msg: Message) -> None:
    with pytest.raises(MalformedEvent):
        message_to_event(msg, kind="mqtt", origin="O")


def test_unknown_specversion_is_refused() -> None:
    with pytest.raises(UnsupportedVersion):
        message_to_event(Message("t", b"", (("specversion", "2.0"), ("id", "i"),
                                            ("source", "s"), ("type", "t"))),
                         kind="mqtt", origin="O")


def test_loop_guard_by_origin_and_by_id() -> None:
    g = LoopGuard("me", remember=2)
    mine = Event(type="t", source="s", extras={ORIGIN_ATTR: "me"})
    other = Event(type="t", source="s", extras={ORIGIN_ATTR: "you"})
    assert g.outbound_is_loop(mine) and not g.outbound_is_loop(other)
    assert g.inbound_is_loop(None, "me") and not g.inbound_is_loop("x", "you")
    g.sent(["a", "b", "c"])
    assert g.inbound_is_loop("c", None) and not g.inbound_is_loop("a", None)  # bounded


def test_config_file_toml_and_json(tmp_path: Path) -> None:
    p = tmp_path / "b.toml"
    p.write_text('name = "site"\nkind = "mqtt"\n[mqtt]\nport = 1999\nusername = "u"\n'
                 '[mqtt.tls]\ninsecure = true\n'
                 '[[routes]]\nmesh = "s.>"\nremote = "s/#"\ndirection = "both"\n')
    cfg = load_config(p)
    assert cfg.mqtt.port == 1999 and cfg.mqtt.tls is not None and cfg.mqtt.tls.insecure
    assert cfg.routes[0].direction == "both" and cfg.routes[0].kind == "mqtt"
    j = tmp_path / "b.json"
    j.write_text('{"name": "n", "kind": "nats", "nats": {"servers": ["nats://h:1"]},'
                 ' "routes": [{"mesh": "a", "remote": "b"}]}')
    assert load_config(j).nats.servers == ("nats://h:1",)


@pytest.mark.parametrize("text", [
    'name = "x"\nkind = "amqp"\n[[routes]]\nmesh = "a"\nremote = "b"\n',
    'name = "x"\nkind = "mqtt"\n',
    'name = "x"\nkind = "mqtt"\nbogus = 1\n[[routes]]\nmesh = "a"\nremote = "b"\n',
    'name = "x"\nkind = "mqtt"\n[mqtt]\nprot = 1\n[[routes]]\nmesh = "a"\nremote = "b"\n',
    'name = "bad name"\nkind = "mqtt"\n[[routes]]\nmesh = "a"\nremote = "b"\n',
    'not toml [',
])
def test_bad_config_is_a_config_error(tmp_path: Path, text: str) -> None:
    p = tmp_path / "b.toml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        load_config(p)


@pytest.mark.parametrize("kind,module,extra", [("mqtt", "paho", "zeromesh[mqtt]"),
                                               ("nats", "nats", "zeromesh[nats]")])
def test_missing_client_library_names_the_extra(kind: str, module: str, extra: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from patterns.bridge.bridge import Bridge
    from patterns.bridge.mapping import Route as R

    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    cfg = BridgeConfig(name="x", kind=kind, routes=(R("a", "b", "out", kind),))  # type: ignore[arg-type]

    class FakeNode:
        mesh = "m"

    with pytest.raises(ConfigError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        Bridge(FakeNode(), cfg)


# --- CloudEvents protocol bindings: header value encoding ---------------------------------

TRICKY = ["日本語 subject", "a literal %2F and /", '"quoted" \\ back', "100%", "Euro € 😀", "x"]


def _attrs(msg: Message) -> dict[str, str]:
    return dict(msg.attrs)


@pytest.mark.parametrize("subject", TRICKY)
def test_nats_binary_headers_are_percent_encoded_and_decoded(subject: str) -> None:
    ev = Event(type="t", source="/ü", data=b"p", subject=subject, datacontenttype="text/plain; "
               "charset=utf-8", extras={"note": subject})
    msg = event_to_message(ev, "s", kind="nats", mode="binary", origin="Zürich/b")
    for k, v in msg.attrs:  # printable ASCII without space or '"' (NATS 1.0.3-wip, 3.1.3.2)
        assert all(0x21 <= ord(c) <= 0x7E and c != '"' for c in v), (k, v)
    assert _attrs(msg)["ce-source"] == "/%C3%BC"
    back = message_to_event(msg, kind="nats", origin="O")
    assert back.subject == subject and back.extras["note"] == subject
    assert back.source == "/ü" and back.datacontenttype == "text/plain; charset=utf-8"
    assert origin_of(msg, "nats") == (ev.id, "Zürich/b")


@pytest.mark.parametrize("subject", TRICKY)
def test_mqtt_binary_user_properties_are_unencoded_utf8(subject: str) -> None:
    # The MQTT binding (v1.0.2, 3.1.3.2): the canonical string, no percent-encoding.
    ev = Event(type="t", source="/ü", data=b"p", subject=subject)
    msg = event_to_message(ev, "s", kind="mqtt", mode="binary", origin="O")
    assert _attrs(msg)["subject"] == subject and _attrs(msg)["source"] == "/ü"
    assert message_to_event(msg, kind="mqtt", origin="O").subject == subject


def _nats_ce(**headers: str) -> Message:
    base = {"ce-specversion": "1.0", "ce-id": "i", "ce-source": "s", "ce-type": "t"}
    base.update(headers)
    return Message("a.b", b"x", tuple(base.items()))


@pytest.mark.parametrize(("raw", "value"), [
    ("%e6%97%a5", "日"),  # lower-case hex MUST be accepted
    ("%41BC", "ABC"),  # unnecessarily encoded: accepted
    ('"a \\"q\\" b"', 'a "q" b'),  # an RFC 7230 quoted-string (older senders)
    ('"50%25"', "50%"),  # quoted, then percent-decoded
    ("%2F", "/"),
])
def test_nats_header_decoding_rules(raw: str, value: str) -> None:
    assert message_to_event(_nats_ce(**{"ce-subject": raw}), kind="nats",
                            origin="O").subject == value


@pytest.mark.parametrize("raw", ["%C0%A0", "%E6%97", "%ZZ", "50%", "%ED%A0%80"])
def test_nats_header_bad_percent_encoding_is_malformed(raw: str) -> None:
    # %C0%A0: overlong; %E6%97: truncated; %ED%A0%80: a surrogate; '%' without two hex digits.
    with pytest.raises(MalformedEvent):
        message_to_event(_nats_ce(**{"ce-subject": raw}), kind="nats", origin="O")
    assert origin_of(_nats_ce(**{"ce-bridgeorigin": raw}), "nats") == ("i", None)


def test_nats_datacontenttype_header_and_older_content_type() -> None:
    m = _nats_ce(**{"ce-datacontenttype": "application/json%3B%20charset%3Dutf-8"})
    assert message_to_event(m, kind="nats", origin="O").datacontenttype == (
        "application/json; charset=utf-8")
    old = Message("a.b", b"x", (*_nats_ce().attrs, ("content-type", "image/png")), "image/png")
    assert message_to_event(old, kind="nats", origin="O").datacontenttype == "image/png"


def test_mqtt_content_type_property_wins_over_a_user_property() -> None:
    attrs = (("specversion", "1.0"), ("id", "i"), ("source", "s"), ("type", "t"),
             ("datacontenttype", "text/plain"))
    assert message_to_event(Message("a/b", b"x", attrs, "image/png"), kind="mqtt",
                            origin="O").datacontenttype == "image/png"
    assert message_to_event(Message("a/b", b"x", attrs), kind="mqtt",
                            origin="O").datacontenttype == "text/plain"


def test_plain_message_with_an_empty_content_type_is_wrapped() -> None:
    ev = message_to_event(Message("site/a", b"1", (), ""), kind="mqtt", origin="O")
    assert ev.datacontenttype is None and ev.data == b"1"


def test_default_mode_is_binary_for_mqtt_and_structured_for_nats() -> None:
    from mesh.cli import build_parser
    from mesh.cli.bridge_cmd import config_from_args

    r = (Route("a", "b", "out", "nats"),)
    assert BridgeConfig(name="n", kind="nats", routes=r).mode == "structured"
    assert BridgeConfig(name="n", kind="nats", routes=r, mode="binary").mode == "binary"
    assert BridgeConfig(name="m", kind="mqtt", routes=(Route("a", "b"),)).mode == "binary"
    common = ["bridge", "--data-dir", "d", "--out", "a=b"]
    assert config_from_args(build_parser().parse_args([*common, "--kind", "nats"])).mode == (
        "structured")
    assert config_from_args(build_parser().parse_args([*common, "--kind", "mqtt"])).mode == (
        "binary")
    assert config_from_args(build_parser().parse_args(
        [*common, "--kind", "nats", "--mode", "binary"])).mode == "binary"
