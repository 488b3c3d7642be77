"""The partition machinery of the chaos suite (tests.netns.HostBridge), tested on its own:
a real ZeroMQ connection between this process and a child in a namespace is blocked both ways
by the link going down, and flows again (same connection, nothing lost) once it is up; and
nothing is left behind, even by a process killed before its cleanup."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import zmq

from tests import netns
from tests.util import REPO, wait_until

pytestmark = pytest.mark.netns

_why = netns.available()
skip_no_netns = pytest.mark.skipif(_why is not None,
                                   reason=f"no network namespaces here: {_why}")

# An echo ROUTER bound on the namespace's address; prints its endpoint, serves until stdin EOF.
ECHO = r"""
import sys, zmq
ctx = zmq.Context()
r = ctx.socket(zmq.ROUTER)
port = r.bind_to_random_port("tcp://" + sys.argv[1])
print(port, flush=True)
poller = zmq.Poller()
poller.register(r, zmq.POLLIN)
poller.register(sys.stdin, zmq.POLLIN)
while True:
    ev = dict(poller.poll())
    if r in ev:
        ident, msg = r.recv_multipart()
        r.send_multipart([ident, b"echo " + msg])
    if sys.stdin.fileno() in ev and not sys.stdin.buffer.read1(1):
        break
r.close(0)
ctx.term()
"""


def _ours(prefix: str) -> list[str]:
    """Namespaces and root links whose name starts with ``prefix``."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = [ln.split()[0] for ln in ns.splitlines() if ln.strip()]
    names += [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()]
    return [n for n in names if n.startswith(prefix)]


@pytest.fixture
def bridge() -> Iterator[netns.HostBridge]:
    br = netns.HostBridge(["echo", "other"])
    try:
        yield br
    finally:
        br.close()
    assert _ours(br.prefix) == [], "the bridge left namespaces or links behind"


@skip_no_netns
@pytest.mark.timeout(40)
def test_link_down_blocks_a_zmq_connection_both_ways_and_up_heals_it(
        bridge: netns.HostBridge) -> None:
    child = subprocess.Popen([*bridge.exec_argv("echo"), sys.executable, "-c", ECHO,
                              bridge.addr("echo")], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        d.connect(f"tcp://{bridge.addr('echo')}:{port}")
        d.send(b"1")
        assert d.poll(10_000), "no echo over the healthy link"
        assert d.recv() == b"echo 1"

        bridge.link("echo", up=False)
        d.send(b"2")  # queued on the established connection, lost on the wire
        assert not d.poll(1500), "a message crossed the partition"
        # The other direction too: nothing from the namespace reaches the bridge's address.
        probe = subprocess.run(
            [*bridge.exec_argv("echo"), sys.executable, "-c",
             "import socket,sys; socket.create_connection((sys.argv[1], 9), timeout=1)",
             bridge.host], capture_output=True, text=True, timeout=20)
        assert "timed out" in probe.stderr, probe.stderr  # lost, not refused
        assert child.poll() is None, "the partitioned process is alive, only cut off"

        bridge.link("echo", up=True)
        # TCP retransmits what the partition swallowed: the same connection carries on.
        assert d.poll(15_000), "no echo after the heal"
        assert d.recv() == b"echo 2"
        d.send(b"3")
        assert d.poll(10_000) and d.recv() == b"echo 3"
    finally:
        d.close(0)
        ctx.term()
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


@skip_no_netns
@pytest.mark.timeout(30)
def test_partition_is_per_member(bridge: netns.HostBridge) -> None:
    # Members reach each other over the bridge (layer 2, no forwarding in the root
    # namespace); taking one member's port down cuts it off and leaves the other reachable.
    code = ("import socket,sys\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()\n"
            "    print('ok')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n")
    srv = socket.create_server((bridge.host, 0))
    try:
        port = str(srv.getsockname()[1])

        def dial(member: str) -> str:
            return subprocess.run([*bridge.exec_argv(member), sys.executable, "-c", code,
                                   bridge.host, port], capture_output=True, text=True,
                                  timeout=20).stdout.strip()

        assert dial("echo") == "ok" and dial("other") == "ok"
        bridge.link("echo", up=False)
        assert dial("echo") == "TimeoutError"
        assert dial("other") == "ok"
        bridge.link("echo", up=True)
        wait_until(lambda: dial("echo") == "ok", 10, what="the healed member dials again")
    finally:
        srv.close()


@skip_no_netns
@pytest.mark.timeout(30)
def test_sweep_removes_what_a_killed_process_left() -> None:
    # A process that made a bridge is SIGKILLed: its atexit cleanup never runs.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests import netns; "
         "b = netns.HostBridge(['x', 'y']); print(b.prefix, flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    prefix = child.stdout.readline().strip()
    assert prefix and len(_ours(prefix)) == 5  # bridge, 2 ports, 2 namespaces
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert _ours(prefix), "the SIGKILLed process left nothing: the test proves nothing"
    removed = netns.sweep_stale()
    assert _ours(prefix) == [], removed
