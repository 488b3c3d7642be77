"""Bridge configuration: frozen dataclasses and a TOML/JSON loader.

A config file (TOML, or JSON when the name ends in ``.json``)::

    name = "site-bridge"          # the durable subscription / DLQ / origin name
    kind = "mqtt"                 # or "nats"
    mode = "binary"               # or "structured"; default binary for mqtt, structured for nats

    [mqtt]                        # or [nats] with servers = ["nats://127.0.0.1:4222"]
    host = "127.0.0.1"
    port = 1883
    username = "edge"
    password = "secret"
    [mqtt.tls]
    ca_file = "/etc/ssl/site-ca.pem"

    [[routes]]
    mesh = "sensors.>"
    remote = "site/sensors/#"
    direction = "out"             # "in", "out" or "both"
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mesh.errors import ConfigError
from patterns.bridge.mapping import DEFAULT_MODE, Route

__all__ = ["BridgeConfig", "MqttConfig", "NatsConfig", "TlsConfig", "load_config"]


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the broker connection.

    Attributes:
        ca_file: CA bundle to verify the broker (None: the system's).
        cert_file: client certificate (mutual TLS).
        key_file: the client certificate's key.
        insecure: skip hostname verification (tests only).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def ssl_context(self) -> Any:
        """A client :class:`ssl.SSLContext` for these settings.

        Raises:
            ConfigError: a file cannot be loaded.
        """
        import ssl

        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS files cannot be loaded: {exc}") from exc
        if self.insecure:
            ctx.check_hostname = False
        return ctx


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT 5 broker connection.

    Attributes:
        host: broker host.
        port: broker port.
        client_id: MQTT client id (default ``zeromesh-<bridge name>``); must be stable, the
            broker keeps the inbound session (unacked QoS 1 messages) under it.
        username: credentials (optional).
        password: credentials (optional).
        tls: TLS settings, or None for plain TCP.
        keepalive_s: MQTT keepalive.
        session_expiry_s: how long the broker keeps the session while the bridge is away.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600


@dataclass(frozen=True)
class NatsConfig:
    """The NATS JetStream connection.

    Attributes:
        servers: server URLs (``nats://``, ``tls://``).
        user: credentials (optional).
        password: credentials (optional).
        token: auth token (optional).
        creds_file: NATS ``.creds`` file (JWT + NKey), optional.
        tls: TLS settings, or None.
        stream: the JetStream stream (outbound target, inbound source).
        create_stream: create ``stream`` over the outbound subjects when it does not exist.
        duplicate_window_s: the dedup window of a created stream.
        consumer: the durable pull consumer name (default ``zeromesh-<bridge name>``).
        ack_wait_s: the consumer's ack wait (redelivery after a bridge crash).
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    tls: TlsConfig | None = None
    stream: str = "MESH"
    create_stream: bool = True
    duplicate_window_s: float = 120.0
    consumer: str | None = None
    ack_wait_s: float = 30.0


@dataclass(frozen=True)
class BridgeConfig:
    """One bridge.

    Attributes:
        name: the bridge's name: durable subscription, DLQ stream (``<name>.dlq``) and origin.
        kind: ``"mqtt"`` or ``"nats"``.
        routes: the mappings.
        mode: ``"binary"`` or ``"structured"`` CloudEvents mode for outbound messages; None
            (the default) picks binary for MQTT and structured for NATS: the published
            CloudEvents NATS binding (v1.0.2) has only structured mode, binary mode is in its
            1.0.3-wip draft (which ``"binary"`` follows on NATS).
        mqtt: MQTT settings (kind mqtt).
        nats: NATS settings (kind nats).
        batch: events forwarded per broker round (acks awaited per batch).
        ack_timeout_s: how long to wait for broker acks before retrying the unacked ones.
        retry_s: pause between attempts while the broker is unreachable.
        origin: the loop-prevention origin id (default ``<mesh>/<name>``).
    """

    name: str
    kind: Literal["mqtt", "nats"]
    routes: tuple[Route, ...]
    mode: Literal["binary", "structured"] | None = None
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    batch: int = 500
    ack_timeout_s: float = 5.0
    retry_s: float = 0.5
    origin: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"bridge name must be [A-Za-z0-9._-]+, got {self.name!r}")
        if self.kind not in ("mqtt", "nats"):
            raise ConfigError(f"kind must be mqtt or nats, got {self.kind!r}")
        if self.mode is None and self.kind in DEFAULT_MODE:
            object.__setattr__(self, "mode", DEFAULT_MODE[self.kind])
        if self.mode not in ("binary", "structured"):
            raise ConfigError(f"mode must be binary or structured, got {self.mode!r}")
        if not self.routes:
            raise ConfigError("a bridge needs at least one route")
        for r in self.routes:
            if r.kind != self.kind:
                raise ConfigError(f"route {r.mesh!r} is {r.kind}, the bridge is {self.kind}")
        if self.batch <= 0 or self.ack_timeout_s <= 0 or self.retry_s <= 0:
            raise ConfigError("batch, ack_timeout_s and retry_s must be positive")


def _build(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    kw = dict(raw)
    if "tls" in kw and kw["tls"] is not None:
        kw["tls"] = _build(TlsConfig, kw["tls"], f"{where}.tls")
    if "servers" in kw:
        kw["servers"] = tuple(kw["servers"])
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def config_from_mapping(raw: Mapping[str, Any]) -> BridgeConfig:
    """Build a :class:`BridgeConfig` from parsed TOML/JSON.

    Raises:
        ConfigError: a missing, unknown or invalid setting.
    """
    kw = dict(raw)
    kind = kw.get("kind")
    routes = kw.pop("routes", None)
    if not isinstance(routes, list) or not routes:
        raise ConfigError("routes: a non-empty list of {mesh, remote, direction} is required")
    built: list[Route] = []
    for i, r in enumerate(routes):
        if not isinstance(r, Mapping) or "mesh" not in r or "remote" not in r:
            raise ConfigError(f"routes[{i}]: needs 'mesh' and 'remote'")
        built.append(Route(str(r["mesh"]), str(r["remote"]), r.get("direction", "out"),
                           r.get("kind", kind)))
    kw["routes"] = tuple(built)
    if "mqtt" in kw:
        kw["mqtt"] = _build(MqttConfig, kw["mqtt"], "mqtt")
    if "nats" in kw:
        kw["nats"] = _build(NatsConfig, kw["nats"], "nats")
    try:
        return BridgeConfig(**kw)
    except TypeError as exc:
        raise ConfigError(f"bridge config: {exc}") from exc


def load_config(path: str | Path) -> BridgeConfig:
    """Read a bridge config file (TOML, or JSON when it ends in ``.json``).

    Raises:
        ConfigError: unreadable or invalid file.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read bridge config {p}: {exc}") from exc
    try:
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {exc}"
                          ) from exc
    return config_from_mapping(raw)
