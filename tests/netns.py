"""Network namespaces for tests: nodes on a bridge, joined by veth pairs (needs root).

``NetnsLab(n)`` creates a hub namespace with a bridge (multicast snooping off, so mDNS
floods every port) and ``n`` node namespaces, each with ``eth0`` = 10.77.0.<i>/24 plugged
into the bridge through ``v<i>`` in the hub. Names carry a per-run unique prefix; ``close()``
deletes every namespace it made (their veth ends go with them). ``available()`` says why
namespaces cannot be used here, for a clear skip.

``HostBridge(members)`` is the chaos suite's variant: the bridge lives in the *root* namespace
with an address of its own (:attr:`HostBridge.host`), so processes of the root namespace (the
test, its proxies, a hub node) reach every member, and every member reaches them and the other
members over layer 2 (no IP forwarding). Each member gets its own namespace and bridge port;
taking the port down (:meth:`HostBridge.link`) partitions that member from everything.
Names are ``zc<pid><letter>...`` (pid of the creating process): ``sweep_stale()`` removes what
a run killed before its cleanup left behind.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Sequence

from tests.util import REPO


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                          check=check)


def available() -> str | None:
    """None when ``ip netns add`` works here, else the reason it does not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"zmprobe-{uuid.uuid4().hex[:8]}"
    try:
        res = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run ip: {exc}"
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    try:
        # A veth pair into the namespace: the other thing every user here needs.
        veth = _ip("link", "add", probe[:15], "type", "veth", "peer", "name", "eth0", "netns",
                   probe, check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        _ip("link", "del", probe[:15], check=False)
        _ip("netns", "del", probe, check=False)
    return None


class NetnsLab:
    """A hub bridge and ``n`` node namespaces; node ``i`` (1-based) has :meth:`addr` ``(i)``."""

    def __init__(self, n: int) -> None:
        self.prefix = f"zm{uuid.uuid4().hex[:6]}"
        self.hub = f"{self.prefix}-hub"
        self.nodes = [f"{self.prefix}-n{i}" for i in range(1, n + 1)]
        self._made: list[str] = []
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.nodes, start=1):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    @staticmethod
    def addr(i: int) -> str:
        return f"10.77.0.{i}"

    def link(self, i: int, up: bool) -> None:
        """Take node ``i``'s bridge port down (a partition) or bring it back."""
        _ip("-n", self.hub, "link", "set", f"v{i}", "up" if up else "down")

    def popen(self, i: int, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start ``python argv...`` inside node ``i``'s namespace with the repo importable."""
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            ["ip", "netns", "exec", self.nodes[i - 1], sys.executable, *argv],
            cwd=REPO, env=env, **kw)

    def close(self) -> None:
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()


#: Names made by HostBridge: ``zc`` + creator pid + instance letter (+ suffix).
_OURS = re.compile(r"^zc(\d+)[a-z]")
_instances = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces and root links of HostBridges whose creating process is dead
    (a harness killed before its cleanup ran); return what was deleted."""
    gone: list[str] = []
    res = _ip("netns", "list", check=False)
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OURS.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    res = _ip("-o", "link", "show", check=False)
    for line in res.stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _OURS.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            gone.append(name)
    return gone


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.128.0.0/9 that no interface or route of the root namespace uses, picked
    from the pid so parallel runs start from different ones."""
    used = _ip("-o", "addr", "show", check=False).stdout + _ip("route", "show", check=False).stdout
    start = os.getpid() * 7 + next(_instances)
    for k in range(1 << 15):
        n = (start + k) % (1 << 15)
        net = ipaddress.IPv4Network(f"10.{128 + (n >> 8)}.{n & 255}.0/24")
        if f"10.{128 + (n >> 8)}.{n & 255}." not in used:
            return net
    raise RuntimeError("no free 10.128.0.0/9 subnet")  # pragma: no cover - 32k subnets in use


class HostBridge:
    """A bridge in the root namespace and one namespace per member, each on its own port.

    The bridge holds :attr:`host` (``.1`` of a free /24); member ``m`` has ``eth0`` =
    :meth:`addr` ``(m)`` in namespace :meth:`ns` ``(m)``, its veth's root end enslaved to the
    bridge. :meth:`link` ``(m, False)`` takes that root end down: every packet to and from
    the member is lost (a partition; established TCP connections stay open and retransmit),
    ``True`` heals it. :meth:`close` (also run at exit) deletes it all; use it in a
    try/finally.
    """

    def __init__(self, members: Sequence[str]) -> None:
        k = next(_instances)
        self.prefix = f"zc{os.getpid()}{chr(ord('a') + k % 26)}"
        self.bridge = f"{self.prefix}b"
        self.members = list(members)
        if len(self.members) > 250:
            raise ValueError("at most 250 members per bridge")
        self.subnet = _free_subnet()
        self.host = str(self.subnet.network_address + 1)
        self._links: list[str] = []
        self._ns: list[str] = []
        atexit.register(self.close)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def ns(self, member: str) -> str:
        """The namespace member ``member`` runs in."""
        return f"{self.prefix}-{member}"

    def port(self, member: str) -> str:
        """The root-namespace end of ``member``'s veth (its bridge port; <= 15 characters)."""
        return f"{self.prefix}v{self.members.index(member)}"

    def addr(self, member: str) -> str:
        """``member``'s address (on ``eth0`` inside its namespace)."""
        return str(self.subnet.network_address + 2 + self.members.index(member))

    def _setup(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for m in self.members:
            ns = self.ns(m)
            _ip("netns", "add", ns)
            self._ns.append(ns)
            _ip("link", "add", self.port(m), "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._links.append(self.port(m))
            _ip("link", "set", self.port(m), "master", self.bridge, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(m)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def link(self, member: str, up: bool) -> None:
        """Partition ``member`` (``up=False``: its bridge port down) or heal it."""
        _ip("link", "set", self.port(member), "up" if up else "down")

    def exec_argv(self, member: str) -> list[str]:
        """The argv prefix that runs a command inside ``member``'s namespace (``ip netns
        exec`` execs the command: the child's pid is the command's, signals reach it)."""
        return ["ip", "netns", "exec", self.ns(member)]

    def close(self) -> None:
        """Delete every namespace and link this bridge made (idempotent)."""
        for ns in reversed(self._ns):
            _ip("netns", "del", ns, check=False)
        self._ns.clear()
        # The veths died with their namespaces; deleting them again is harmless.
        for link in reversed(self._links):
            _ip("link", "del", link, check=False)
        self._links.clear()
        atexit.unregister(self.close)
