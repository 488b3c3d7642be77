"""mDNS discovery: announce this node with zeroconf and feed the peers it finds to the node.

Two classes:

* :class:`MdnsBrowser` browses and resolves ``_zeromesh._tcp.local.`` services, decodes their
  TXT records (:mod:`mesh.txt`), keeps the peers of one mesh (or of all meshes) and reports
  them through two callbacks. It never announces anything: ``mesh peers`` uses it alone.
* :class:`MdnsDiscovery` is what the node owns: it registers the node's service, runs an
  :class:`MdnsBrowser` and hands peers to ``node.peers.upsert(info, source="mdns")`` /
  ``node.peers.goodbye(node_id)``.

Threads. zeroconf runs its own asyncio loop thread; its browser calls handlers on its own
thread, where blocking resolution is allowed. Registration, re-announcement, record updates
and unregistration block for up to about half a second each, so they run on one worker thread
of :class:`MdnsDiscovery` ("zeromesh-mdns"); the node's reactor only ever enqueues a command
(``update()``) or waits a bounded time for the worker to finish (``close()``).

Presence is not decided here: mDNS record expiry does not mean a peer died (the node's
heartbeats do). Discovery only says "this peer exists, here is how to reach it" and "its record
said goodbye". mDNS is unauthenticated multicast, so anyone on the LAN can send a goodbye for
any instance name: the node counts a discovery goodbye and changes nothing (only the peer's own
control channel, BYE or silence past ``gone_s``, takes a peer away). A peer's record that is
heard again (a periodic re-announcement after a link came back) is upserted again, so that the
node can reconnect a peer its heartbeats declared gone.

Budgets (:mod:`mesh.budget`). Everything a LAN stranger can make discovery hold is bounded and
counted: accepted services (per announced address and in all, ``services_*``), resolves in
flight (``pending_resolves_*``; a resolve never blocks zeroconf's browser thread) and refreshes
queued for the worker (``pending_refreshes_*``). Every log line a record can trigger goes
through a :class:`mesh.budget.LogLimiter` (``log_suppressed``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    RecordUpdateListener,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceInfo

from mesh.budget import Budget, LogLimiter
from mesh.errors import ClosedError, ConfigError, MeshError, TxtRecordError
from mesh.metrics import Collect
from mesh.peers import PeerInfo
from mesh.txt import DEFAULT_TXT_BUDGET, EncodedTxt, TxtRecord, decode_txt, encode_txt

__all__ = [
    "ENV_INTERFACE",
    "ENV_SERVICE_TYPE",
    "SERVICE_TYPE",
    "DiscoveryConfig",
    "MdnsBrowser",
    "MdnsDiscovery",
    "choose_interfaces",
    "open_zeroconf",
]

log = logging.getLogger("mesh.discovery")

#: The DNS-SD service type every zeromesh node announces.
SERVICE_TYPE = "_zeromesh._tcp.local."
#: Environment variable naming the interface(s) mDNS uses when the config does not.
ENV_INTERFACE = "ZEROMESH_INTERFACE"
#: Environment variable overriding the default service type (test isolation).
ENV_SERVICE_TYPE = "ZEROMESH_SERVICE_TYPE"

_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "[*]")
_DNS_TYPE_TXT = 16  # RFC 1035


@dataclass(frozen=True)
class DiscoveryConfig:
    """Knobs of mDNS discovery (defaults suit a LAN).

    Attributes:
        service_type: DNS-SD type; default ``$ZEROMESH_SERVICE_TYPE`` else
            ``_zeromesh._tcp.local.``. Tests use a unique one each
            (``_zm-xxxxxxxx._tcp.local.``).
        interfaces: addresses or interface names for mDNS; None means the node's
            ``config.interface``, else the ``ZEROMESH_INTERFACE`` environment variable, else
            every suitable interface.
        txt_budget: bytes the TXT record may use (see :mod:`mesh.txt`).
        resolve_timeout: seconds to wait for a service's SRV/TXT after it appeared.
        close_timeout: seconds ``close()`` waits for the goodbye and zeroconf shutdown.
        reannounce_interval: seconds between unsolicited re-announcements of our record, so a
            peer behind a link that came back hears us again; None disables them.
        refresh_min_interval: a peer heard again (same record) is re-upserted at most this
            often.
        link_check_interval: seconds between checks of the mDNS interfaces' link state; on a
            link coming up we re-announce and browse afresh (RFC 6762 section 8.3). None
            disables the checks.
        max_services: accepted services held at once (budget ``services``); a record past it
            is ignored and counted (``services_refused``) until a name is removed.
        max_services_per_address: accepted services per announced control address (the host
            of the first control endpoint, ``ipc`` for ipc-only records). mDNS proves no
            sender, so this only stops one address taking the whole table.
        max_pending_resolves: services being resolved at once (budget ``pending_resolves``,
            one per name); past it a service is not resolved (``pending_resolves_refused``)
            until it is announced again.
        max_pending_refreshes: re-heard records queued for the worker (budget
            ``pending_refreshes``, one per name); past it a re-announcement is dropped
            (``pending_refreshes_refused``).
    """

    service_type: str = field(
        default_factory=lambda: os.environ.get(ENV_SERVICE_TYPE) or SERVICE_TYPE)
    interfaces: tuple[str, ...] | None = None
    txt_budget: int = DEFAULT_TXT_BUDGET
    resolve_timeout: float = 3.0
    close_timeout: float = 3.0
    reannounce_interval: float | None = 20.0
    refresh_min_interval: float = 1.0
    link_check_interval: float | None = 1.0
    max_services: int = 1024
    max_services_per_address: int = 64
    max_pending_resolves: int = 32
    max_pending_refreshes: int = 64

    def __post_init__(self) -> None:
        if not (self.service_type.endswith("._tcp.local.") and self.service_type.startswith("_")):
            raise ConfigError(f"service type {self.service_type!r} is not _name._tcp.local.")
        if self.reannounce_interval is not None and self.reannounce_interval < 1.0:
            # zeroconf refuses to re-multicast a record within 1 s of the last one anyway.
            raise ConfigError("reannounce_interval must be >= 1 s")
        if self.resolve_timeout <= 0 or self.close_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if min(self.max_services, self.max_services_per_address, self.max_pending_resolves,
               self.max_pending_refreshes) < 1:
            raise ConfigError("discovery budgets must be >= 1")


def _split_interface_spec(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def choose_interfaces(configured: str | None = None,
                      explicit: tuple[str, ...] | None = None) -> list[str] | None:
    """Resolve the interface choice to a list of IPv4 addresses, or None for "all".

    Order: ``explicit`` (DiscoveryConfig.interfaces), then ``configured`` (node config
    ``interface``), then the ``ZEROMESH_INTERFACE`` environment variable. Each is a
    comma-separated list of IPv4 addresses or interface names, or ``all`` (also ``*``).

    Raises:
        ConfigError: an address that is not IPv4 or a name that is not an interface with an
            IPv4 address.
    """
    items: list[str]
    if explicit is not None:
        items = list(explicit)
    elif configured:
        items = _split_interface_spec(configured)
    else:
        items = _split_interface_spec(os.environ.get(ENV_INTERFACE, ""))
    if not items or items in (["all"], ["*"], ["0.0.0.0"]):
        return None
    out: list[str] = []
    for item in items:
        try:
            out.append(str(ipaddress.IPv4Address(item)))
            continue
        except ValueError:
            pass
        out.extend(_addresses_of(item))
    return list(dict.fromkeys(out))


def _addresses_of(ifname: str) -> list[str]:
    import ifaddr  # a dependency of zeroconf

    for adapter in ifaddr.get_adapters():
        if adapter.nice_name == ifname or adapter.name == ifname:
            ips = [str(ip.ip) for ip in adapter.ips if ip.is_IPv4]
            if ips:
                return ips
            raise ConfigError(f"interface {ifname!r} has no IPv4 address")
    raise ConfigError(f"interface {ifname!r}: not an IPv4 address nor a known interface name")


def _all_lan_addresses() -> list[str]:
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and not ipaddress.IPv4Address(str(ip.ip)).is_loopback:
                out.append(str(ip.ip))
    return out


def open_zeroconf(addresses: list[str] | None) -> Any:
    """Open a ``zeroconf.Zeroconf`` (IPv4) on these addresses, or on all interfaces for None.

    Raises:
        ConfigError: the sockets cannot be opened there (no such address, no multicast).
    """
    try:
        if addresses is None:
            return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
        return Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise ConfigError(f"cannot open mDNS on {addresses or 'all interfaces'}: {exc}") from exc


class _Sink(Protocol):
    def upsert(self, info: PeerInfo, source: str = ...) -> object: ...

    def goodbye(self, node_id: str) -> object: ...


class MdnsBrowser:
    """Browse, resolve and decode zeromesh announcements (passive: announces nothing).

    Callbacks run on zeroconf's threads (its browser thread, or its event loop when a resolve
    completes) or on the discovery worker for refreshes; they must be quick and thread-safe.
    ``on_peer`` gets every accepted record, new or changed (or heard again when ``refresh`` is
    used); ``on_goodbye`` gets the node id of a peer whose service was removed (goodbye or
    expiry). A goodbye is unauthenticated (anyone on the LAN can send one): it is a hint, never
    proof that the peer left.

    Resolving never blocks zeroconf's browser thread: a record already in zeroconf's cache (a
    normal announcement carries PTR, SRV, TXT and addresses in one packet) is accepted at once;
    otherwise a resolve runs in zeroconf's event loop, at most ``max_pending_resolves`` at a
    time. Accepted services are bounded per announced address and in all. A record whose
    instance name is not ``<its id>.<service type>`` is ignored (``ignored_name_mismatch``).
    TXT records are read from their raw rdata (``ServiceInfo.text``), not from zeroconf's
    ``properties`` dict, so that RFC 6763's rules hold: keys compare case-insensitively and
    the first of a repeated key wins.

    Args:
        zc: an open ``zeroconf.Zeroconf``; the browser does not close it.
        service_type: the DNS-SD type to browse.
        mesh: keep only this mesh's peers; None keeps all meshes (for ``mesh peers``).
        on_peer: called with each accepted :class:`mesh.txt.TxtRecord`.
        on_goodbye: called with a node id.
        ignore_id: our own node id (ignored).
        resolve_timeout: seconds to wait for a service's records.
        max_services: accepted services held at once.
        max_services_per_address: accepted services per announced control address.
        max_pending_resolves: resolves in flight at once.
        limiter: rate limit for the log lines a record can trigger (one is made if None).

    Raises:
        ConfigError: a budget below 1.
    """

    def __init__(self, zc: Any, *, service_type: str = SERVICE_TYPE, mesh: str | None,
                 on_peer: Callable[[TxtRecord], None], on_goodbye: Callable[[str], None],
                 ignore_id: str | None = None, resolve_timeout: float = 3.0,
                 max_services: int = 1024, max_services_per_address: int = 64,
                 max_pending_resolves: int = 32, limiter: LogLimiter | None = None) -> None:
        self._zc = zc
        self._type = service_type
        self._mesh = mesh
        self._on_peer = on_peer
        self._on_goodbye = on_goodbye
        self._ignore_id = ignore_id
        self._resolve_ms = int(resolve_timeout * 1000)
        self._lock = threading.Lock()
        # service name -> (node id, budget key), for accepted records only
        self._names: dict[str, tuple[str, str]] = {}
        self._services = Budget("services", max_services_per_address, max_services)
        self._pending = Budget("pending_resolves", 1, max_pending_resolves)
        self._futures: dict[str, concurrent.futures.Future[bool]] = {}  # resolves in flight
        # (name, reason) of bad records already logged: each is logged once
        self._logged = Budget("malformed_seen", 1, 1024)
        self._limiter = limiter or LogLimiter(log)
        self._browser: Any = None
        self._closed = False
        self._stats: dict[str, int] = dict.fromkeys(
            ("resolved", "accepted", "goodbyes", "ignored_self", "ignored_other_mesh",
             "ignored_name_mismatch", "malformed", "resolve_failed", "callback_errors",
             "txt_skipped"), 0)

    def start(self) -> None:
        """Start browsing (returns at once; results arrive through the callbacks)."""
        # QM: the first QU query (unicast reply) gets lost in network namespaces (TESTING.md).
        self._browser = ServiceBrowser(self._zc, self._type, handlers=[self._handle],
                                       question_type=DNSQuestionType.QM)

    def close(self) -> None:
        """Stop browsing; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = list(self._futures.values())
        for fut in futures:  # resolves in flight end with the browser
            fut.cancel()
        if self._browser is not None:
            self._browser.cancel()

    def stats(self) -> dict[str, int]:
        """Counters: resolved, accepted, goodbyes, ignored_*, malformed, resolve_failed,
        callback_errors, txt_skipped (malformed or repeated TXT pieces skipped in records
        otherwise used); the budgets' ``services_*``, ``pending_resolves_*`` and
        ``malformed_seen_*`` (held, keys, refused); ``log_suppressed`` (lines the rate limit
        held back)."""
        with self._lock:
            out = dict(self._stats)
            out.update(self._services.stats())
            out.update(self._pending.stats())
            out.update(self._logged.stats())
        out["log_suppressed"] = self._limiter.suppressed
        return out

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _handle(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if self._closed:
            return
        try:
            if state_change is ServiceStateChange.Removed:
                with self._lock:
                    entry = self._names.pop(name, None)
                    if entry is not None:
                        self._services.give(entry[1])
                        self._stats["goodbyes"] += 1
                if entry is not None:
                    self._on_goodbye(entry[0])
                return
            info = ServiceInfo(service_type, name)
            if info.load_from_cache(zeroconf):
                self.accept(name, info.text)
            else:
                self._resolve(zeroconf, service_type, name)
        except Exception as exc:  # a bug in a callback must not kill zeroconf's browser thread
            self._count("callback_errors")
            self._limiter.log(logging.ERROR, "callback_error", "mdns: error handling %s %s: %r",
                              state_change, name, exc)

    def _resolve(self, zc: Any, service_type: str, name: str) -> None:
        """Ask for a service's records in zeroconf's loop, without waiting here."""
        with self._lock:
            if self._pending.held(name):
                return  # already being resolved
            taken = self._pending.take(name)
        if not taken:
            self._limiter.log(logging.INFO, "resolve_refused",
                              "mdns: %d resolves in flight; not resolving %s (counted)",
                              self._pending.total, name)
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            fut = asyncio.run_coroutine_threadsafe(
                info.async_request(zc, self._resolve_ms, question_type=DNSQuestionType.QM),
                zc.loop)
        except RuntimeError:  # zeroconf's loop is closed: we are closing too
            with self._lock:
                self._pending.give(name)
            return
        with self._lock:
            self._futures[name] = fut
        fut.add_done_callback(lambda f: self._resolved(name, info, f))

    def _resolved(self, name: str, info: Any, fut: concurrent.futures.Future[bool]) -> None:
        # zeroconf's loop thread: quick work only (accept decodes and hands over).
        with self._lock:
            self._pending.give(name)
            if self._futures.get(name) is fut:
                del self._futures[name]
        if self._closed:
            return
        try:
            ok = not fut.cancelled() and fut.exception() is None and fut.result()
            if not ok:
                self._count("resolve_failed")
                self._limiter.log(logging.INFO, "resolve_failed",
                                  "mdns: could not resolve %s within %d ms", name,
                                  self._resolve_ms)
                return
            self.accept(name, info.text)
        except Exception as exc:
            self._count("callback_errors")
            self._limiter.log(logging.ERROR, "callback_error", "mdns: error resolving %s: %r",
                              name, exc)

    def accept(self, name: str, record_txt: bytes | Mapping[Any, Any] | None) -> bool:
        """Decode a resolved record and report it; return whether it was accepted.

        Args:
            name: the service instance name.
            record_txt: the raw TXT rdata (``ServiceInfo.text``; RFC 6763 key rules, the first
                of a repeated key wins) or a mapping of its keys (see :func:`mesh.txt.decode_txt`).

        Used by the browser and by refreshes. Never raises for a bad record: it counts it
        under ``malformed`` and logs one line per distinct record and reason (rate-limited).
        A record whose ``id`` is not its instance name's label is refused first
        (``ignored_name_mismatch``), before it is compared with our own id or mesh. Pieces
        the codec skipped are counted in ``txt_skipped``. A record past the ``services``
        budget is counted (``services_refused``), not kept.
        """
        self._count("resolved")
        try:
            record = decode_txt(b"" if record_txt is None else record_txt)
        except TxtRecordError as exc:
            self._count("malformed")
            # A record repeated by a hostile or broken sender is logged once, and all such
            # lines together are rate-limited, so unique names cannot flood the log either.
            key = (name, str(exc))
            with self._lock:
                first = not self._logged.held(key)
                if first:  # past the budget a record is not remembered (counted): the
                    self._logged.take(key)  # rate limit still bounds its lines
            if first:
                self._limiter.warning("malformed",
                                      "mdns: ignoring malformed zeromesh record %s: %s", name, exc)
            return False
        node_id = record.info.node_id
        # First: a record claiming an id other than its name's (ours included) is a forgery
        # or a bug, whatever else it says. DNS names compare case-insensitively.
        if name.lower() != f"{node_id}.{self._type}".lower():
            self._count("ignored_name_mismatch")
            self._limiter.warning("name_mismatch",
                                  "mdns: ignoring %s: its record is for node %s", name, node_id)
            return False
        if node_id == self._ignore_id:
            self._count("ignored_self")
            return False
        if self._mesh is not None and record.info.mesh != self._mesh:
            self._count("ignored_other_mesh")
            self._limiter.log(logging.DEBUG, "other_mesh", "mdns: ignoring %s of mesh %r",
                              name, record.info.mesh)
            return False
        if record.skipped:
            with self._lock:
                self._stats["txt_skipped"] += len(record.skipped)
            self._limiter.log(logging.DEBUG, "txt_skipped", "mdns: %s: %s", name,
                              "; ".join(record.skipped))
        with self._lock:
            if self._closed:
                return False
            refused = False
            if name not in self._names:
                where = _address_key(record.info)
                refused = not self._services.take(where)
                if not refused:
                    self._names[name] = (node_id, where)
            if not refused:
                self._stats["accepted"] += 1
        if refused:
            self._limiter.warning("services_refused",
                                  "mdns: services budget full (%d, %d per address); ignoring %s",
                                  self._services.total, self._services.per_key, name)
            return False
        self._on_peer(record)
        return True

    def inherit(self, other: MdnsBrowser) -> None:
        """Take over another browser's counters, accepted names and services budget (used on
        link changes)."""
        with other._lock:
            stats, names, services = dict(other._stats), dict(other._names), other._services
        with self._lock:
            self._stats = stats
            self._names.update(names)
            self._services = services

    def known(self, name: str) -> bool:
        """Whether ``name`` is a service whose record was accepted and not removed."""
        with self._lock:
            return name in self._names


def _address_key(info: PeerInfo) -> str:
    """The budget key of a record: the host of its first control endpoint ("ipc" if none is
    tcp). Announced, not proven: mDNS carries no sender identity."""
    for ep in info.endpoints.get("control", ()):
        if ep.startswith("tcp://"):
            return ep[6:].rpartition(":")[0].lower()
    return "ipc"


class _RefreshListener(RecordUpdateListener):
    """Hears TXT records of our type arriving again unchanged (zeroconf's browser does not
    report those) and asks the discovery worker to re-upsert the peer. Runs in zeroconf's loop:
    it only enqueues (bounded: see ``MdnsDiscovery._post_refresh``)."""

    def __init__(self, service_suffix: str, post: Callable[[str], None]) -> None:
        super().__init__()
        self._suffix = service_suffix.lower()
        self._post = post

    def async_update_records(self, zc: Any, now: float, records: list[Any]) -> None:
        for update in records:
            rec = update.new
            if (update.old is not None and rec.type == _DNS_TYPE_TXT and rec.ttl > 0
                    and rec.name.lower().endswith(self._suffix)):
                self._post(rec.name)

    def async_update_records_complete(self) -> None:
        return None

    def update_record(self, zc: Any, now: float, record: Any) -> None:  # zeroconf's old API
        return None


@dataclass
class _Announce:
    """What we announce, as last built from ``node.info()``."""

    txt: EncodedTxt
    port: int
    addresses: list[str]
    info: Any = field(default=None)  # the zeroconf ServiceInfo


class MdnsDiscovery:
    """Announce a node on mDNS and feed the peers of its mesh into ``node.peers``.

    Args:
        node: the owning node. Used: ``id``, ``name``, ``mesh``, ``host``, ``config``
            (``interface``, ``mdns``), ``info()``, ``peers.upsert(info, source="mdns")`` and
            ``peers.goodbye(node_id)``.
        config: discovery knobs; defaults when None.
    """

    def __init__(self, node: Any, config: DiscoveryConfig | None = None) -> None:
        self._node = node
        self._config = config or DiscoveryConfig()
        self._commands: queue.Queue[tuple[str, str]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._zc: Any = None
        self._browser: MdnsBrowser | None = None
        self._refresh: _RefreshListener | None = None
        self._addresses: list[str] | None = None
        self._announce: _Announce | None = None
        self._last_upsert: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._stats: dict[str, int] = dict.fromkeys(
            ("registered", "reannounced", "updates_sent", "upserts", "refreshes",
             "link_changes", "truncated", "errors", "txt_bytes"), 0)
        self._instance = f"{node.id}.{self._config.service_type}"
        self._limiter = LogLimiter(log)
        self._refreshes = Budget("pending_refreshes", 1, self._config.max_pending_refreshes)

    # --- API used by the node ----------------------------------------------------------------

    def start(self) -> None:
        """Open mDNS on the chosen interfaces, start browsing, and announce in the background.

        Returns once zeroconf's sockets are open (milliseconds); the announcement (about
        0.5 s of blocking zeroconf work) happens on the discovery worker thread.

        Raises:
            ConfigError: a bad interface choice, or mDNS cannot open its sockets there.
        """
        with self._lock:
            if self._closed or self._thread is not None:
                return
            cfg_iface = getattr(self._node.config, "interface", None)
            self._addresses = choose_interfaces(cfg_iface, self._config.interfaces)
            self._zc = open_zeroconf(self._addresses)
            self._browser = self._new_browser()
            self._thread = threading.Thread(target=self._run, name="zeromesh-mdns", daemon=True)
            self._thread.start()

    def _new_browser(self) -> MdnsBrowser:
        cfg = self._config
        return MdnsBrowser(
            self._zc, service_type=cfg.service_type, mesh=self._node.mesh,
            on_peer=self._on_peer, on_goodbye=self._on_goodbye, ignore_id=self._node.id,
            resolve_timeout=cfg.resolve_timeout, max_services=cfg.max_services,
            max_services_per_address=cfg.max_services_per_address,
            max_pending_resolves=cfg.max_pending_resolves, limiter=self._limiter)

    def update(self) -> None:
        """The node's info changed: re-announce the new TXT record (in the background)."""
        self._commands.put(("update", ""))

    def close(self) -> None:
        """Say goodbye (unregister), stop browsing and close zeroconf; idempotent.

        Waits at most ``config.close_timeout`` seconds; past it the worker (a daemon thread)
        is left to finish on its own and an error is counted.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._commands.put(("close", ""))
        thread.join(self._config.close_timeout)
        if thread.is_alive():
            with self._lock:
                self._stats["errors"] += 1
            log.warning("mdns: close did not finish within %.1f s", self._config.close_timeout)

    def stats(self) -> dict[str, int]:
        """Counters of announcements and of what the browser accepted or ignored.

        Keys: registered, reannounced, updates_sent, upserts, refreshes, link_changes,
        truncated (1 when our own record had to set ``more=1``), errors, txt_bytes,
        ``pending_refreshes_{held,keys,refused}``, and the browser's resolved, accepted,
        goodbyes, ignored_self, ignored_other_mesh, ignored_name_mismatch, malformed,
        resolve_failed, callback_errors, txt_skipped, ``services_{held,keys,refused}``,
        ``pending_resolves_{held,keys,refused}``, ``malformed_seen_{held,keys,refused}`` and
        log_suppressed. The node reports them
        in ``node.stats()`` with the prefix ``mdns_`` and in its metrics (:meth:`collect`).
        """
        with self._lock:
            out = dict(self._stats)
            out.update(self._refreshes.stats())
        browser = self._browser
        if browser is not None:
            out.update(browser.stats())
        else:
            out["log_suppressed"] = self._limiter.suppressed
        return out

    def collect(self, out: Collect) -> None:
        """Report the counters as metric families (the node's collector calls this).

        ``discovery_records_total{result}`` (accepted, malformed, ignored_self,
        ignored_other_mesh, ignored_name_mismatch, resolve_failed, refused),
        ``discovery_goodbyes_total``, ``discovery_budget_refused_total{budget}``,
        ``discovery_budget_held{budget}``, ``discovery_errors_total{kind}``,
        ``discovery_log_lines_suppressed_total`` and ``discovery_txt_skipped_total``.
        """
        st = self.stats()
        help_records = "mDNS records decoded or resolved, by what was done with them."
        for result in ("accepted", "malformed", "ignored_self", "ignored_other_mesh",
                       "ignored_name_mismatch", "resolve_failed"):
            out.counter("discovery_records_total", st.get(result, 0), help_records,
                        result=result)
        out.counter("discovery_records_total", st.get("services_refused", 0), help_records,
                    result="refused")
        out.counter("discovery_goodbyes_total", st.get("goodbyes", 0),
                    "mDNS goodbyes heard for accepted services (a hint: presence is not "
                    "changed by them).")
        for budget in ("services", "pending_resolves", "pending_refreshes", "malformed_seen"):
            out.counter("discovery_budget_refused_total", st.get(f"{budget}_refused", 0),
                        "Discovery work refused because a budget was full.", budget=budget)
            out.gauge("discovery_budget_held", st.get(f"{budget}_held", 0),
                      "Units a discovery budget holds now.", budget=budget)
        for kind in ("callback_errors", "errors"):
            out.counter("discovery_errors_total", st.get(kind, 0),
                        "Discovery errors (callback: a record's handling raised; worker: "
                        "announcing or closing failed).",
                        kind="callback" if kind == "callback_errors" else "worker")
        out.counter("discovery_log_lines_suppressed_total", st.get("log_suppressed", 0),
                    "Discovery log lines a rate limit held back.")
        out.counter("discovery_txt_skipped_total", st.get("txt_skipped", 0),
                    "Malformed or repeated TXT pieces skipped in records otherwise used.")

    @property
    def interfaces(self) -> list[str] | None:
        """The IPv4 addresses mDNS runs on (None: all interfaces); known after start()."""
        return self._addresses

    # --- peers found -------------------------------------------------------------------------

    def _on_peer(self, record: TxtRecord) -> None:
        # A partial record (more=1) is upserted too: the node connects, and its HELLO
        # carries the full PeerInfo, which completes the entry.
        now = time.monotonic()
        with self._lock:
            self._stats["upserts"] += 1
            last = self._last_upsert
            if len(last) >= self._config.max_services:  # only rate-limits refreshes: prune
                horizon = now - self._config.refresh_min_interval
                for nid in [n for n, t in last.items() if t < horizon]:
                    del last[nid]
                if len(last) >= self._config.max_services:
                    last.clear()
            last[record.info.node_id] = now
        try:
            self._node.peers.upsert(record.info, source="mdns")
        except ClosedError:
            pass  # the node is closing; close() follows

    def _on_goodbye(self, node_id: str) -> None:
        # Reported as a hint: the node counts it and keeps the peer (anyone on the LAN can
        # send a goodbye for any instance name; the peer's control channel decides).
        with self._lock:
            self._last_upsert.pop(node_id, None)
        try:
            self._node.peers.goodbye(node_id)
        except ClosedError:
            pass

    # --- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._browser is not None
        try:
            self._browser.start()
            self._refresh = _RefreshListener(self._config.service_type, self._post_refresh)
            self._zc.add_listener(self._refresh, None)
            self._register()
            self._loop()
        except Exception:
            with self._lock:
                self._stats["errors"] += 1
            log.exception("mdns: discovery worker failed")
        finally:
            self._shutdown()

    def _post_refresh(self, name: str) -> None:
        # zeroconf's loop: a stranger can re-multicast records as fast as it likes, so at
        # most one refresh per name is queued, and at most max_pending_refreshes in all.
        if name.lower() == self._instance.lower():
            return
        with self._lock:
            if self._refreshes.held(name):
                return
            if not self._refreshes.take(name):
                return  # counted in pending_refreshes_refused
        self._commands.put(("refresh", name))

    def _loop(self) -> None:
        interval = self._config.reannounce_interval
        check = self._config.link_check_interval
        next_announce = None if interval is None else time.monotonic() + interval
        next_check = None if check is None else time.monotonic() + check
        links = self._link_states()
        while True:
            due = [t for t in (next_announce, next_check) if t is not None]
            timeout = None if not due else max(0.0, min(due) - time.monotonic())
            try:
                cmd, arg = self._commands.get(timeout=timeout)
            except queue.Empty:
                now = time.monotonic()
                if next_check is not None and check is not None and now >= next_check:
                    next_check = now + check
                    old, links = links, self._link_states()
                    came_up = [n for n, up in links.items() if up and not old.get(n, True)]
                    if not came_up:
                        continue
                    log.info("mdns: link up on %s: re-announcing and browsing afresh", came_up)
                    cmd, arg = "link-up", ""
                else:
                    cmd, arg = "reannounce", ""
            if cmd == "close":
                return
            try:
                if cmd == "link-up":
                    self._link_up()
                elif cmd == "update":
                    self._update()
                elif cmd == "refresh":
                    with self._lock:
                        self._refreshes.give(arg)
                    self._refresh_peer(arg)
                elif cmd == "reannounce" and self._announce is not None:
                    self._zc.send(self._zc.generate_service_broadcast(self._announce.info, None))
                    with self._lock:
                        self._stats["reannounced"] += 1
            except MeshError as exc:
                with self._lock:
                    self._stats["errors"] += 1
                self._limiter.warning(f"failed:{cmd}", "mdns: %s failed: %s", cmd, exc)
            if interval is not None and (cmd in ("reannounce", "update")
                                         or time.monotonic() >= (next_announce or 0)):
                next_announce = time.monotonic() + interval

    def _link_states(self) -> dict[str, bool]:
        """Whether each interface mDNS runs on is up (Linux sysfs; empty elsewhere)."""
        import ifaddr

        wanted = None if self._addresses is None else set(self._addresses)
        out: dict[str, bool] = {}
        for adapter in ifaddr.get_adapters():
            ips = {str(ip.ip) for ip in adapter.ips if ip.is_IPv4}
            if wanted is not None and not ips & wanted:
                continue
            try:
                with open(f"/sys/class/net/{adapter.name}/operstate") as f:
                    state = f.read().strip()
            except OSError:
                continue
            # "unknown" is what lo and some drivers always report: count it as up.
            out[str(adapter.name)] = state in ("up", "unknown")
        return out

    def _link_up(self) -> None:
        if self._announce is not None:
            self._zc.send(self._zc.generate_service_broadcast(self._announce.info, None))
        # A new browser queries at once and reports every cached service again (Added), so
        # the node redials peers it lost while the link was down.
        old = self._browser
        assert old is not None
        old.close()  # first: its handlers have stopped before the budgets change hands
        browser = self._new_browser()
        browser.inherit(old)
        self._browser = browser
        browser.start()
        with self._lock:
            self._stats["link_changes"] += 1

    def _build(self) -> _Announce:
        info: PeerInfo = self._node.info()
        addresses = self._addresses if self._addresses is not None else _all_lan_addresses()
        endpoints = {role: _expand_wildcards(eps, addresses)
                     for role, eps in info.endpoints.items()}
        info = PeerInfo(node_id=info.node_id, name=info.name, mesh=info.mesh,
                        version=info.version, host=info.host, endpoints=endpoints,
                        offers=info.offers, public_key=info.public_key,
                        incarnation=info.incarnation)
        txt = encode_txt(info, budget=self._config.txt_budget)
        port = _control_port(endpoints)
        zinfo = ServiceInfo(self._config.service_type, self._instance, port=port,
                            properties=txt.properties, server=f"zm-{info.node_id}.local.",
                            parsed_addresses=addresses[:8])
        with self._lock:
            self._stats["truncated"] = int(txt.truncated)
            self._stats["txt_bytes"] = txt.size
        if txt.truncated:
            log.info("mdns: TXT record truncated to %d bytes (more=1); peers use HELLO",
                     txt.size)
        return _Announce(txt=txt, port=port, addresses=addresses, info=zinfo)

    def _register(self) -> None:
        ann = self._build()
        # Instance names are 128-bit random node ids: probing for a name conflict buys nothing
        # and costs 1.7 s, so announce straight away as a cooperating responder.
        self._zc.register_service(ann.info, cooperating_responders=True)
        self._announce = ann
        with self._lock:
            self._stats["registered"] += 1

    def _update(self) -> None:
        while True:  # collapse a burst of update() calls into one announcement
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] != "update":
                self._commands.put(cmd)
                break
        ann = self._build()
        old = self._announce
        if old is not None and (old.txt.properties == ann.txt.properties
                                and old.port == ann.port and old.addresses == ann.addresses):
            return
        if old is None:
            self._zc.register_service(ann.info, cooperating_responders=True)
        else:
            self._zc.update_service(ann.info)
        self._announce = ann
        with self._lock:
            self._stats["updates_sent"] += 1

    def _refresh_peer(self, name: str) -> None:
        if self._browser is None or name.lower() == self._instance.lower():
            return
        node_id = name.split(".", 1)[0]
        with self._lock:
            last = self._last_upsert.get(node_id, 0.0)
        if time.monotonic() - last < self._config.refresh_min_interval:
            return
        info = ServiceInfo(self._config.service_type, name)
        if not info.load_from_cache(self._zc):
            return
        with self._lock:
            self._stats["refreshes"] += 1
        self._browser.accept(name, info.text)

    def _shutdown(self) -> None:
        try:
            if self._browser is not None:
                self._browser.close()
            if self._refresh is not None:
                self._zc.remove_listener(self._refresh)
            if self._announce is not None:
                self._zc.unregister_service(self._announce.info)  # the goodbye (TTL 0)
        except Exception:
            with self._lock:
                self._stats["errors"] += 1
            log.exception("mdns: error while saying goodbye")
        finally:
            self._zc.close()


def _expand_wildcards(endpoints: tuple[str, ...], addresses: list[str]) -> tuple[str, ...]:
    """``tcp://*:5000`` is how a node binds, not how a peer connects: announce one endpoint per
    address mDNS runs on instead."""
    out: list[str] = []
    for ep in endpoints:
        if ep.startswith("tcp://"):
            host, _, port = ep[6:].rpartition(":")
            if host in _WILDCARD_HOSTS:
                out.extend(f"tcp://{a}:{port}" for a in addresses)
                continue
        out.append(ep)
    return tuple(dict.fromkeys(out))


def _control_port(endpoints: Mapping[str, tuple[str, ...]]) -> int:
    for ep in endpoints.get("control", ()):
        if ep.startswith("tcp://"):
            port = ep.rpartition(":")[2]
            if port.isdigit():
                return int(port)
    return 0
