"""Network namespaces for tests: nodes on a bridge, joined by veth pairs (needs root).

``NetnsLab(n)`` creates a hub namespace with a bridge (multicast snooping off, so mDNS
floods every port) and ``n`` node namespaces, each with ``eth0`` = 10.77.0.<i>/24 plugged
into the bridge through ``v<i>`` in the hub. Names carry a per-run unique prefix; ``close()``
deletes every namespace it made (their veth ends go with them). ``available()`` says why
namespaces cannot be used here, for a clear skip.
"""

from __future__ import annotations

import os
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
