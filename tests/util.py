"""Helpers shared by the tests: waiting on conditions, unique names, child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mesh.node import Node

T = TypeVar("T")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def poll_until(
    cond: Callable[[], T], timeout: float, interval: float = 0.005, *, cap: float = 0.05,
    between: Callable[[], object] | None = None,
) -> T | None:
    """Poll ``cond`` until it returns a truthy value (returned) or ``timeout`` passes (None).

    The one poll loop of the tests, the chaos harness and its roles: ``between`` runs between
    two polls (the harness samples its processes there); the interval grows by half up to
    ``cap`` so a long wait does not steal the CPU from the processes under test, and never
    runs past the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            return None
        if between is not None:
            between()
        time.sleep(min(interval, max(0.0, deadline - now)))  # a poll interval, not a wait
        interval = min(interval * 1.5, cap)


def wait_until(
    cond: Callable[[], T], timeout: float = 5.0, interval: float = 0.005,
    what: str | Callable[[], object] = "",
) -> T:
    """Poll ``cond`` until it returns a truthy value; return it, or fail after ``timeout``.

    This is the only way tests wait: on a condition with a deadline, never a fixed sleep.
    ``what`` says what was awaited in the failure: a string, or a callable whose value at the
    deadline is shown (the stats, a count).
    """
    value = poll_until(cond, timeout, interval)
    if not value:
        shown = what() if callable(what) else what
        raise AssertionError(f"condition not met within {timeout}s: {shown or cond!r}")
    return value


def unique(prefix: str = "t") -> str:
    """A name no other test (or parallel run) uses: for topics, meshes, queues."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def python_child(code: str, *args: str, env: dict[str, str] | None = None,
                 **popen: object) -> subprocess.Popen[bytes]:
    """Start ``python -c code args...`` with this repository importable."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", code, *args], env=full_env, **popen
    )


def make_node(path: os.PathLike[str] | str, mesh: str, peers: tuple[str, ...] = ()) -> Node:
    """A node of mesh ``mesh`` on loopback (no mDNS), named after its directory, dialling
    ``peers`` (control endpoints) as static peers."""
    from mesh.node import Node
    return Node(data_dir=path, name=os.path.basename(os.fspath(path)), mesh=mesh, mdns=False,
                interface="127.0.0.1", static_peers=peers)


def ctrl(nd: Node) -> str:
    """The node's tcp control endpoint (what another node's ``static_peers`` takes)."""
    return next(e for e in nd.info().endpoints["control"] if e.startswith("tcp://"))


def drain(sub: Any, n: int, timeout: float = 20.0, poll_s: float = 0.2) -> list[Any]:
    """Up to ``n`` events from ``sub.recv_batch`` (a Subscriber), within ``timeout``."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(sub.recv_batch(timeout=poll_s))
    return out


def go_live(pub: Any, sub: Any, data: Any = -1, **fields: Any) -> None:
    """Publish ``data`` until ``sub`` receives one live (the subscription has reached the
    publisher, within 5 s), then drain what else came: what the test publishes next is live."""
    wait_until(lambda: (pub.publish(data, **fields), sub.recv(timeout=0.05))[1] is not None, 5,
               what="subscribed")
    while sub.recv(timeout=0.2) is not None:
        pass


class CurveHub:
    """CURVE nodes of one fresh mesh on 127.0.0.1 that dial a hub node: a keypair per name
    (``tmp/keys``; the public keys in the allowlist ``tmp/allow``), short presence, tcp only.
    ``node(name, perms, hub_ep)`` starts one (``hub_ep`` None: the hub itself, named "hub");
    ``close()`` closes them newest first."""

    def __init__(self, tmp: Any, names: tuple[str, ...]) -> None:
        from mesh.security.keys import Keypair, generate_keypair, write_keypair
        self.tmp = tmp
        self.keys = {n: generate_keypair() for n in names}
        self.allow = tmp / "allow"
        for n, kp in self.keys.items():
            write_keypair(tmp / "keys", n, kp)
            write_keypair(self.allow, n, Keypair(kp.public, kp.secret))
            (self.allow / f"{n}.key_secret").unlink()
        self.mesh = unique("sec")
        self.nodes: list[Node] = []

    def node(self, name: str, perms: dict[str, Any], hub_ep: str | None) -> Node:
        from mesh.node import Node, PresenceConfig
        from mesh.security import SecurityConfig
        peer_keys = {hub_ep: self.keys["hub"].public} if hub_ep else {}
        sec = SecurityConfig(key_file=self.tmp / "keys" / f"{name}.key_secret",
                             allowlist_dir=self.allow, permissions=perms, peer_keys=peer_keys)
        nd = Node(data_dir=self.tmp / name, name=name, mesh=self.mesh, mdns=False,
                  transports=("tcp",), interface="127.0.0.1", security=sec,
                  static_peers=(hub_ep,) if hub_ep else (),
                  presence=PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6))
        self.nodes.append(nd)
        return nd

    def close(self) -> None:
        for nd in reversed(self.nodes):
            nd.close()
