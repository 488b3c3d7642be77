"""Metrics: a small registry of counters, gauges and histograms, and the Prometheus text format.

Two ways to feed a :class:`Registry`:

* **Instruments** (:meth:`Registry.counter`, :meth:`Registry.gauge`, :meth:`Registry.histogram`)
  that code updates as things happen. An update is one lock round trip (about 0.1 µs); the lock
  makes ``+=`` exact when threads race (a bare ``x += 1`` on an attribute can lose updates).
* **Collectors** (:meth:`Registry.register_collector`): a function called at scrape time that
  reports values the code already counts (every pattern keeps its own stats). This is the
  preferred way: it costs nothing per event, only per scrape.

Rendering: :func:`render_prometheus` writes the text exposition format 0.0.4;
:func:`serve_prometheus` serves it on a stdlib HTTP thread (``GET``/``HEAD /metrics``), with the
same data as JSON on ``GET /metrics.json``; any other path is a 404. Connections are bounded (a
read timeout, a deadline, a cap per client address and in all; see :class:`MetricsServer`). :func:`parse_prometheus` reads the text format back
(``mesh stats`` and the tests use it). ``prometheus-client`` is not needed.

Example::

    reg = node.metrics
    jobs = reg.counter("jobs_total", "Jobs done.", ("kind",))
    jobs.labels(kind="resize").inc()
    server, port = serve_prometheus(node, port=9464)
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from mesh.budget import Budget, LogLimiter
from mesh.errors import ConfigError

__all__ = [
    "DEFAULT_BUCKETS",
    "Collect",
    "Counter",
    "Family",
    "Gauge",
    "Histogram",
    "MetricsServer",
    "Registry",
    "Sample",
    "parse_prometheus",
    "registry_of",
    "render_prometheus",
    "serve_prometheus",
]

Kind = Literal["counter", "gauge", "histogram"]

log = logging.getLogger("mesh.metrics")

#: Seconds: from 50 µs (a cheap in-process handler) to 10 s (a stuck one).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _check_name(name: str) -> None:
    ok = bool(name) and (name[0].isalpha() or name[0] in "_:") and all(
        c.isalnum() or c in "_:" for c in name) and name.isascii()
    if not ok:
        raise ConfigError(f"bad metric name {name!r}")


def _check_label(name: str) -> None:
    ok = bool(name) and (name[0].isalpha() or name[0] == "_") and all(
        c.isalnum() or c == "_" for c in name) and name.isascii() and not name.startswith("__")
    if not ok or name == "le":
        raise ConfigError(f"bad label name {name!r}")


# --- snapshots: what collectors report and renderers read -----------------------------------


@dataclass
class Sample:
    """One value of a family: ``labels`` -> ``value``; histograms carry their buckets.

    Attributes:
        labels: label name -> value.
        value: the counter/gauge value; for a histogram, the number of observations.
        buckets: histogram only: (upper bound, cumulative count) pairs ending with +Inf.
        sum: histogram only: the sum of the observations.
    """

    labels: dict[str, str]
    value: float
    buckets: list[tuple[float, int]] | None = None
    sum: float = 0.0


@dataclass
class Family:
    """A metric family: a name, a type, help text and its samples."""

    name: str
    kind: Kind
    help: str
    samples: list[Sample] = field(default_factory=list)


class Collect:
    """The builder a collector writes to: families of the same name merge across collectors.

    A collector reports what it knows (``out.counter("events_published_total", 12,
    stream="a")``); two publishers on one node report the same family with different labels.
    """

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def _family(self, name: str, kind: Kind, help: str) -> Family:
        fam = self.families.get(name)
        if fam is None:
            _check_name(name)
            fam = self.families[name] = Family(name, kind, help)
        elif fam.kind != kind:
            raise ConfigError(f"metric {name!r} reported as {kind} and as {fam.kind}")
        elif help and not fam.help:
            fam.help = help
        return fam

    def counter(self, name: str, value: float, help: str = "", /, **labels: object) -> None:
        """Report a counter sample (a total that only grows). Parameters are positional, so
        any label name (``name``, ``help``...) can be used."""
        self._family(name, "counter", help).samples.append(
            Sample({k: str(v) for k, v in labels.items()}, value))

    def gauge(self, name: str, value: float, help: str = "", /, **labels: object) -> None:
        """Report a gauge sample (a value that goes up and down)."""
        self._family(name, "gauge", help).samples.append(
            Sample({k: str(v) for k, v in labels.items()}, value))

    def histogram(self, name: str, bounds: Sequence[float], counts: Sequence[int], total: float,
                  help: str = "", /, **labels: object) -> None:
        """Report a histogram from per-bucket (not cumulative) counts.

        ``counts`` has one entry per bound plus a last one for the observations above every
        bound (the +Inf bucket).

        Raises:
            ConfigError: ``counts`` does not have ``len(bounds) + 1`` entries.
        """
        if len(counts) != len(bounds) + 1:
            raise ConfigError("histogram counts need len(bounds) + 1 entries")
        cum: list[tuple[float, int]] = []
        run = 0
        for bound, n in zip((*bounds, math.inf), counts, strict=True):
            run += n
            cum.append((bound, run))
        self._family(name, "histogram", help).samples.append(
            Sample({k: str(v) for k, v in labels.items()}, run, cum, total))

    def add(self, fam: Family) -> None:
        """Merge a ready family (its samples are appended)."""
        self._family(fam.name, fam.kind, fam.help).samples.extend(fam.samples)


# --- instruments ----------------------------------------------------------------------------


class _Child:
    __slots__ = ("lock", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = 0.0


class Counter:
    """A counter family; unlabelled counters are used directly, labelled ones via
    :meth:`labels`.
    """

    kind: Kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        _check_name(name)
        for ln in labelnames:
            _check_label(ln)
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        self._default = self._new_child() if not labelnames else None

    def _new_child(self) -> Any:
        return _Child()

    def labels(self, *values: object, **kw: object) -> Any:
        """The child for these label values (created once, then cached: keep it on hot paths).

        Raises:
            ConfigError: the wrong label names or number of values.
        """
        if kw:
            if values or set(kw) != set(self.labelnames):
                raise ConfigError(f"{self.name}: labels must be exactly {self.labelnames}")
            key = tuple(str(kw[n]) for n in self.labelnames)
        else:
            if len(values) != len(self.labelnames):
                raise ConfigError(f"{self.name}: labels must be exactly {self.labelnames}")
            key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return _Bound(self, child) if not isinstance(self, Histogram) else _BoundHist(self, child)

    def _only(self) -> Any:
        if self._default is None:
            raise ConfigError(f"{self.name} has labels {self.labelnames}: use .labels()")
        return self._default

    def inc(self, n: float = 1) -> None:
        """Add ``n`` (>= 0) to the unlabelled counter.

        Raises:
            ConfigError: the counter has labels, or ``n`` is negative.
        """
        if n < 0:
            raise ConfigError("a counter only goes up")
        c = self._only()
        with c.lock:
            c.value += n

    @property
    def value(self) -> float:
        """The unlabelled value."""
        return float(self._only().value)

    def _items(self) -> list[tuple[dict[str, str], Any]]:
        with self._lock:
            items = list(self._children.items())
        out = [(dict(zip(self.labelnames, k, strict=True)), c) for k, c in items]
        if self._default is not None:
            out.insert(0, ({}, self._default))
        return out

    def collect(self, out: Collect) -> None:
        """Report this family's samples into ``out``."""
        fam = out._family(self.name, self.kind, self.help)
        for labels, c in self._items():
            fam.samples.append(Sample(labels, c.value))


class Gauge(Counter):
    """A gauge family: :meth:`set`, :meth:`inc`, :meth:`dec`."""

    kind: Kind = "gauge"

    def inc(self, n: float = 1) -> None:
        """Add ``n`` (may be negative) to the unlabelled gauge."""
        c = self._only()
        with c.lock:
            c.value += n

    def dec(self, n: float = 1) -> None:
        """Subtract ``n`` from the unlabelled gauge."""
        self.inc(-n)

    def set(self, v: float) -> None:
        """Set the unlabelled gauge."""
        self._only().value = v


class _HistChild:
    __slots__ = ("counts", "lock", "sum")

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.counts = [0] * (n + 1)
        self.sum = 0.0


class Histogram(Counter):
    """A histogram with fixed bucket bounds (seconds by default, see :data:`DEFAULT_BUCKETS`).

    An observation is one ``bisect`` and one lock round trip.
    """

    kind: Kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets if b != math.inf)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ConfigError("histogram buckets must be increasing and not empty")
        self.bounds = bounds
        super().__init__(name, help, labelnames)

    def _new_child(self) -> Any:
        return _HistChild(len(self.bounds))

    def observe(self, v: float) -> None:
        """Record one observation in the unlabelled histogram."""
        _observe(self.bounds, self._only(), v)

    def collect(self, out: Collect) -> None:
        """Report this family's samples into ``out``."""
        for labels, c in self._items():
            with c.lock:
                counts, total = list(c.counts), c.sum
            out.histogram(self.name, self.bounds, counts, total, self.help, **labels)


def _observe(bounds: tuple[float, ...], c: _HistChild, v: float) -> None:
    i = bisect.bisect_left(bounds, v)  # le semantics: v == bound falls in that bucket
    with c.lock:
        c.counts[i] += 1
        c.sum += v


class _Bound:
    """A labelled child of a counter or gauge."""

    __slots__ = ("_c", "_m")

    def __init__(self, m: Counter, c: _Child) -> None:
        self._m = m
        self._c = c

    def inc(self, n: float = 1) -> None:
        if n < 0 and self._m.kind == "counter":
            raise ConfigError("a counter only goes up")
        c = self._c
        with c.lock:
            c.value += n

    def dec(self, n: float = 1) -> None:
        if self._m.kind != "gauge":
            raise ConfigError("only a gauge goes down")
        self.inc(-n)

    def set(self, v: float) -> None:
        if self._m.kind != "gauge":
            raise ConfigError("only a gauge can be set")
        self._c.value = v

    @property
    def value(self) -> float:
        return float(self._c.value)


class _BoundHist:
    __slots__ = ("_bounds", "_c")

    def __init__(self, m: Histogram, c: _HistChild) -> None:
        self._bounds = m.bounds
        self._c = c

    def observe(self, v: float) -> None:
        _observe(self._bounds, self._c, v)


# --- the registry ---------------------------------------------------------------------------


class Registry:
    """Instruments and collectors of one node (``node.metrics``); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, Counter] = {}
        self._collectors: dict[int, Callable[[Collect], None]] = {}
        self._next = 0
        self.collector_errors = 0

    def _get(self, cls: type[Counter], name: str, help: str, labelnames: Sequence[str],
             **kw: Any) -> Any:
        with self._lock:
            m = self._metrics.get(name)
            if m is None:
                m = self._metrics[name] = cls(name, help, labelnames, **kw)
            elif type(m) is not cls or m.labelnames != tuple(labelnames):
                raise ConfigError(f"metric {name!r} already registered differently")
            return m

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Get or create a counter.

        Raises:
            ConfigError: bad name, or the name exists with another type or labels.
        """
        m: Counter = self._get(Counter, name, help, labelnames)
        return m

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Get or create a gauge.

        Raises:
            ConfigError: bad name, or the name exists with another type or labels.
        """
        m: Gauge = self._get(Gauge, name, help, labelnames)
        return m

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        """Get or create a histogram.

        Raises:
            ConfigError: bad name or buckets, or the name exists with another type or labels.
        """
        m: Histogram = self._get(Histogram, name, help, labelnames, buckets=buckets)
        return m

    def register_collector(self, fn: Callable[[Collect], None]) -> Callable[[], None]:
        """Call ``fn(out)`` at every scrape; returns the function that unregisters it.

        A collector that raises is counted (``metrics_collector_errors_total``) and skipped,
        so one broken component cannot blank the whole scrape.
        """
        with self._lock:
            key = self._next
            self._next += 1
            self._collectors[key] = fn

        def unregister() -> None:
            with self._lock:
                self._collectors.pop(key, None)

        return unregister

    def collect(self) -> list[Family]:
        """Every family, instruments first, then collectors' (sorted by name)."""
        out = Collect()
        with self._lock:
            metrics = list(self._metrics.values())
            collectors = list(self._collectors.values())
        for m in metrics:
            m.collect(out)
        for fn in collectors:
            try:
                fn(out)
            except Exception:
                self.collector_errors += 1
        out.counter("metrics_collector_errors_total", self.collector_errors,
                    "Collectors that raised during a scrape.")
        return sorted(out.families.values(), key=lambda f: f.name)

    def as_dict(self) -> dict[str, Any]:
        """The families as plain data: ``{name: {"type", "help", "samples": [...]}}``; a
        sample is ``{"labels", "value"}`` (histograms add ``"sum"`` and ``"buckets"`` as
        ``[[upper, cumulative], ...]`` with ``"+Inf"`` last)."""
        return families_to_dict(self.collect())


def families_to_dict(families: Iterable[Family]) -> dict[str, Any]:
    """Families as JSON-ready data (see :meth:`Registry.as_dict`)."""
    out: dict[str, Any] = {}
    for fam in families:
        samples: list[dict[str, Any]] = []
        for s in fam.samples:
            d: dict[str, Any] = {"labels": dict(s.labels), "value": s.value}
            if s.buckets is not None:
                d["sum"] = s.sum
                d["buckets"] = [[_fmt(b), n] for b, n in s.buckets]
            samples.append(d)
        out[fam.name] = {"type": fam.kind, "help": fam.help, "samples": samples}
    return out


def registry_of(obj: Any) -> Registry:
    """The registry of a node (``node.metrics``), or ``obj`` itself if it is a registry.

    Raises:
        ConfigError: ``obj`` is neither.
    """
    if isinstance(obj, Registry):
        return obj
    reg = getattr(obj, "metrics", None)
    if isinstance(reg, Registry):
        return reg
    raise ConfigError(f"{obj!r} has no metrics registry")


# --- text format 0.0.4 ----------------------------------------------------------------------


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _esc_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str], extra: tuple[str, str] | None = None) -> str:
    items = [f'{k}="{_esc_label(v)}"' for k, v in labels.items()]
    if extra is not None:
        items.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(items) + "}" if items else ""


def render_prometheus(registry: Any) -> str:
    """The registry (or a node's) in the Prometheus text exposition format 0.0.4.

    Raises:
        ConfigError: ``registry`` is neither a registry nor a node.
    """
    lines: list[str] = []
    for fam in registry_of(registry).collect():
        help_ = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {fam.name} {help_}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for s in fam.samples:
            if s.buckets is not None:
                for bound, n in s.buckets:
                    lines.append(f"{fam.name}_bucket{_labels(s.labels, ('le', _fmt(bound)))} {n}")
                lines.append(f"{fam.name}_sum{_labels(s.labels)} {_fmt(s.sum)}")
                lines.append(f"{fam.name}_count{_labels(s.labels)} {_fmt(s.value)}")
            else:
                lines.append(f"{fam.name}{_labels(s.labels)} {_fmt(s.value)}")
    return "\n".join(lines) + "\n"


def _parse_labels(text: str, pos: int, line: str) -> tuple[dict[str, str], int]:
    labels: dict[str, str] = {}
    i = pos + 1
    while True:
        while i < len(text) and text[i] in " ,":
            i += 1
        if i < len(text) and text[i] == "}":
            return labels, i + 1
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= len(text) or text[eq + 1] != '"':
            raise ConfigError(f"bad metrics line: {line!r}")
        name = text[i:eq].strip()
        j = eq + 2
        buf: list[str] = []
        while j < len(text) and text[j] != '"':
            if text[j] == "\\" and j + 1 < len(text):
                buf.append({"n": "\n", "\\": "\\", '"': '"'}.get(text[j + 1], text[j + 1]))
                j += 2
            else:
                buf.append(text[j])
                j += 1
        if j >= len(text):
            raise ConfigError(f"bad metrics line: {line!r}")
        labels[name] = "".join(buf)
        i = j + 1


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse the text format into ``{sample name: [(labels, value), ...]}`` (histogram
    series appear under ``name_bucket`` / ``name_sum`` / ``name_count``).

    Raises:
        ConfigError: a line is not valid text format.
    """
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            labels, end = _parse_labels(line, brace, line)
            rest = line[end:].split()
        else:
            name, labels, rest = line[:space], {}, line[space:].split()
        if not rest or not name:
            raise ConfigError(f"bad metrics line: {line!r}")
        try:
            value = float(rest[0])  # float() reads +Inf, -Inf and NaN too
        except ValueError as exc:
            raise ConfigError(f"bad metrics value in {line!r}") from exc
        out.setdefault(name, []).append((labels, value))
    return out


# --- the HTTP endpoint ----------------------------------------------------------------------

_REFUSED_BODY = b"too many open connections\n"
_REFUSED = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_REFUSED_BODY)
            + _REFUSED_BODY)


class MetricsServer(ThreadingHTTPServer):
    """The scrape endpoint; :meth:`close` stops the thread and frees the port.

    Bounded against idle or slow clients (anyone who can reach the port): each connection has
    a read timeout (``read_timeout_s`` per read) and a deadline (``deadline_s`` from accept,
    after which the server cuts it), and at most ``max_connections`` are open at once, at most
    ``max_per_source`` from one address (a :class:`mesh.budget.Budget`), each on its own
    thread. A connection past a cap gets a 503 and is closed at once (counted ``refused``).
    One request per connection (HTTP/1.0). Counters: :meth:`stats`, and the families
    ``metrics_http_*`` in the registry served.

    Args:
        server_address: ``(host, port)``.
        handler: the request handler class.
        max_connections: connections (and handler threads) open at once.
        max_per_source: connections open at once from one client address.
        read_timeout_s: seconds one read (or write) of a connection may block.
        deadline_s: seconds a connection may stay open in all.

    Raises:
        ConfigError: a bound below 1 (a timeout not positive).
        OSError: the address cannot be bound.
    """

    daemon_threads = True
    block_on_close = False  # close() cuts open connections instead of waiting for them
    request_queue_size = 128
    registry: Registry
    thread: threading.Thread

    def __init__(self, server_address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 *, max_connections: int = 16, max_per_source: int = 8,
                 read_timeout_s: float = 5.0, deadline_s: float = 30.0) -> None:
        if read_timeout_s <= 0 or deadline_s <= 0:
            raise ConfigError("metrics server timeouts must be positive")
        self._budget = Budget("connections", max_per_source, max_connections)
        self.read_timeout_s = read_timeout_s
        self.deadline_s = deadline_s
        self._conn_lock = threading.Lock()
        self._open: dict[int, list[Any]] = {}  # id(socket) -> [socket, source, opened, cut]
        self._counts: dict[str, int] = dict.fromkeys(
            ("accepted", "refused", "timed_out", "cut", "errors", "open_peak"), 0)
        self._codes: dict[int, int] = {}
        self.limiter = LogLimiter(log)
        self._unregister: Callable[[], None] | None = None
        super().__init__(server_address, handler)

    # socketserver hooks (the accept thread: verify_request, service_actions; any handler
    # thread: shutdown_request, handle_error)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        source = str(client_address[0])
        with self._conn_lock:
            ok = self._budget.take(source)
            if ok:
                self._open[id(request)] = [request, source, time.monotonic(), False]
                self._counts["accepted"] += 1
                self._counts["open_peak"] = max(self._counts["open_peak"], len(self._open))
            else:
                self._counts["refused"] += 1
        if not ok:
            try:
                request.setblocking(False)
                request.send(_REFUSED)  # a fresh socket's buffer is empty: never blocks
            except OSError:
                pass
            self.limiter.warning("refused", "metrics: connection from %s refused (%d open, "
                                 "at most %d, %d per source)", source, self._budget.held(),
                                 self._budget.total, self._budget.per_key)
        return ok

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            entry = self._open.pop(id(request), None)
            if entry is not None:
                self._budget.give(entry[1])
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Cut connections open longer than ``deadline_s`` (runs every poll interval)."""
        horizon = time.monotonic() - self.deadline_s
        with self._conn_lock:
            late = [e for e in self._open.values() if e[2] < horizon and not e[3]]
            for e in late:
                e[3] = True
                self._counts["cut"] += 1
        for e in late:
            self._cut(e[0])

    @staticmethod
    def _cut(sock: Any) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the handler's blocked read or write returns
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        with self._conn_lock:
            self._counts["errors"] += 1
        self.limiter.log(logging.INFO, "error", "metrics: error serving %s: %r",
                         client_address[0] if client_address else "?", exc)

    def _counted(self, key: str) -> None:
        with self._conn_lock:
            self._counts[key] += 1

    def _code(self, code: int) -> None:
        with self._conn_lock:
            self._codes[code] = self._codes.get(code, 0) + 1

    def stats(self) -> dict[str, int]:
        """``accepted``, ``refused``, ``timed_out`` (a read or write timed out), ``cut`` (past
        the deadline), ``errors``, ``open`` (connections now), ``open_peak`` (most open at
        once), ``log_suppressed`` and ``requests_<code>`` per HTTP status sent."""
        with self._conn_lock:
            out = dict(self._counts)
            out["open"] = self._budget.held()
            out.update({f"requests_{c}": n for c, n in sorted(self._codes.items())})
        out["log_suppressed"] = self.limiter.suppressed
        return out

    def collect(self, out: Collect) -> None:
        """Report :meth:`stats` as ``metrics_http_*`` families (registered on the registry
        served)."""
        st = self.stats()
        for result in ("accepted", "refused"):
            out.counter("metrics_http_connections_total", st[result],
                        "Connections to the metrics endpoint (refused: past a cap).",
                        result=result)
        out.gauge("metrics_http_connections_open", st["open"],
                  "Connections to the metrics endpoint open now.")
        out.counter("metrics_http_timeouts_total", st["timed_out"],
                    "Metrics connections closed by a timeout.", kind="read")
        out.counter("metrics_http_timeouts_total", st["cut"],
                    "Metrics connections closed by a timeout.", kind="deadline")
        out.counter("metrics_http_errors_total", st["errors"],
                    "Metrics connections that failed (reset, broken pipe).")
        for k, v in st.items():
            if k.startswith("requests_"):
                out.counter("metrics_http_requests_total", v,
                            "Metrics requests answered, by HTTP status.", code=k[9:])

    def close(self) -> None:
        """Stop serving, cut open connections and close the socket. Idempotent."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        if self._unregister is not None:
            self._unregister()
        self.shutdown()
        self.server_close()
        with self._conn_lock:
            socks = [e[0] for e in self._open.values()]
        for s in socks:
            self._cut(s)
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        # StreamRequestHandler.setup applies the class attribute ``timeout``: this connection's
        # per read (or write) timeout comes from the server instead.
        self.request.settimeout(self.server.read_timeout_s)
        super().setup()

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = render_prometheus(self.server.registry).encode()
            ctype = CONTENT_TYPE
        elif path == "/metrics.json":
            body = json.dumps(self.server.registry.as_dict()).encode()
            ctype = "application/json"
        else:
            self.send_error(404, "try /metrics or /metrics.json")
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if isinstance(code, int):  # counted, not logged
            self.server._code(code)

    def log_error(self, format: str, *args: Any) -> None:
        if format.startswith("Request timed out"):
            self.server._counted("timed_out")
        # other errors are the client's (a bad request line, 404): answered, never logged

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds must not fill stderr


def serve_prometheus(node_or_registry: Any, host: str = "127.0.0.1", port: int = 0, *,
                     max_connections: int = 16, max_per_source: int = 8,
                     read_timeout_s: float = 5.0,
                     deadline_s: float = 30.0) -> tuple[MetricsServer, int]:
    """Serve ``GET``/``HEAD`` ``/metrics`` (text format 0.0.4) and ``/metrics.json`` on a daemon
    thread; any other path is a 404.

    Args:
        node_or_registry: a node (its ``metrics``) or a :class:`Registry`.
        host: the address to bind (default loopback only).
        port: the port; 0 lets the OS choose.
        max_connections: connections (and threads) open at once; more get a 503, counted.
        max_per_source: connections open at once from one client address.
        read_timeout_s: seconds one read or write of a connection may block.
        deadline_s: seconds a connection may stay open in all.

    Returns:
        The server (call ``close()`` to stop it) and the bound port.

    Raises:
        ConfigError: not a node or registry, a bad bound, or the address cannot be bound.
    """
    reg = registry_of(node_or_registry)
    try:
        server = MetricsServer((host, port), _Handler, max_connections=max_connections,
                               max_per_source=max_per_source, read_timeout_s=read_timeout_s,
                               deadline_s=deadline_s)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    server.registry = reg
    server._unregister = reg.register_collector(server.collect)
    server.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                     name="zeromesh-metrics", daemon=True)
    server.thread.start()
    return server, int(server.server_address[1])
