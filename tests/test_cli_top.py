"""``mesh top`` against a real mesh ("The mesh at a glance").

Two nodes on loopback (no mDNS): alpha runs a Publisher, a WorkQueue and a Service; beta a
durable Subscriber, a Worker and a Client, dialling alpha. ``mesh top`` is pointed at alpha
only (``--peer``), learns beta by gossip, and asks both for their stats over the control
channel. (a) ``--once --json`` is checked against what the mesh did; (b) the full-screen view
under tmux shows the nodes, the stream with its lag, the queue depth and the service, and
``q`` quits with exit code 0; a terminal too small and a mesh without peers say so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.node import Node
from patterns.pipeline import Backoff, DispatchConfig, Task, Worker, WorkQueue
from patterns.pubsub import Publisher, Start, Subscriber
from patterns.reqrep import Client, Incoming, Service
from patterns.reqrep.errors import RemoteError
from tests.util import REPO, ctrl, make_node, poll_until, unique, wait_until

PUBLISHED, HANDLED = 10, 4   # events published; events the durable subscriber committed
QUEUED = 4                    # tasks pushed after the worker stopped taking them
CALLS, FAILED = 5, 1          # service calls; of which the handler raised


@dataclass
class Busy:
    """A mesh that did known things."""

    alpha: Node
    beta: Node
    stream: str
    queue: str
    service: str
    wq: WorkQueue
    pub: Publisher


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ZEROMESH_CONFIG", None)
    return env


def _top_cmd(m: Busy, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mesh", "top", "--peer", ctrl(m.alpha), "--no-mdns",
            "--interface", "127.0.0.1", "--mesh", m.alpha.mesh, "--name", "topper", *extra]


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Busy]:
    tmp = tmp_path_factory.mktemp("top")
    mesh = unique("top")
    stream, queue, service = unique("temps"), unique("jobs"), unique("calib")
    alpha = make_node(tmp / "alpha", mesh)
    beta = make_node(tmp / "beta", mesh, (ctrl(alpha),))
    cfg = DispatchConfig(max_deliveries=1, backoff=Backoff(base=0.01, cap=0.02))

    def serve(req: Incoming) -> object:
        if req.payload == b"bad":
            raise ValueError("bad request")
        return b"ok"

    def work(t: Task) -> None:
        if t.payload == b"bad":
            raise ValueError("bad task")

    try:
        wait_until(lambda: alpha.peers.get(beta.id) and beta.peers.get(alpha.id), 10,
                   what="alpha and beta joined")
        with Publisher(alpha, stream) as pub, \
                Subscriber(beta, stream, durable="agg", start=Start.beginning(),
                           auto_commit=False) as sub, \
                WorkQueue(alpha, queue, config=cfg) as wq, \
                Service(alpha, service, serve), Client(beta) as client:
            pub.publish_many([{"i": i} for i in range(PUBLISHED)])
            for _ in range(HANDLED):
                assert sub.recv(timeout=10) is not None
            sub.commit()
            wait_until(lambda: pub.stats().lag.get("agg") == PUBLISHED - HANDLED, 10,
                       what="the publisher saw the durable subscriber's ack")
            with Worker(beta, queue) as w:
                for payload in (b"ok", b"ok", b"bad"):
                    wq.push(payload)
                for _ in range(3):
                    task = w.get(timeout=10)
                    assert task is not None
                    w.handle(task, work)
                w.flush()
                wait_until(lambda: wq.stats().get("acked") == 2 and wq.dlq.total() == 1, 10,
                           what="two acked, one dead-lettered")
            wait_until(lambda: wq.stats().get("workers", 1) == 0, 10, what="worker gone")
            for i in range(QUEUED):
                wq.push(b"later-%d" % i)
            wait_until(lambda: beta.who_offers("service", service), 10, what="service offered")
            for i in range(CALLS):
                if i < FAILED:
                    with pytest.raises(RemoteError):
                        client.request(service, b"bad", timeout=10)
                else:
                    assert client.request(service, b"x", timeout=10) == b"ok"
            yield Busy(alpha, beta, stream, queue, service, wq, pub)
    finally:
        beta.close()
        alpha.close()


def _once(m: Busy) -> dict[str, Any]:
    r = subprocess.run(_top_cmd(m, "--once", "--json", "--timeout", "10"), env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    view: dict[str, Any] = json.loads(r.stdout)
    return view


def test_once_json_matches_what_the_mesh_did(busy: Busy) -> None:
    m = busy
    view = _once(m)
    nodes = {n["name"]: n for n in view["nodes"]}
    assert {"alpha", "beta"} <= set(nodes), nodes  # beta was learnt by gossip, not --peer
    for name, nd in (("alpha", m.alpha), ("beta", m.beta)):
        assert nodes[name]["id"] == nd.id
        assert nodes[name]["state"] == "joined" and nodes[name]["stats"] == "ok"
        assert nodes[name]["uptime_s"] > 0 and nodes[name]["truncated"] == []
        assert nodes[name]["peers"] >= 2  # the other node and mesh top's own
    streams = {s["stream"]: s for s in view["streams"]}
    st = streams[m.stream]
    assert st["publishers"] == [{"node": "alpha", "published": PUBLISHED, "rate": None,
                                 "head": PUBLISHED}]
    (agg,) = st["subscribers"]
    assert agg["consumer"] == "agg" and agg["node"] == "beta"
    assert agg["lag"] == agg["lag_acked"] == PUBLISHED - HANDLED == m.pub.stats().lag["agg"]
    assert agg["consumed"] == PUBLISHED  # delivered to it (it committed HANDLED of them)
    queues = {q["queue"]: q for q in view["queues"]}
    q = queues[m.queue]
    real = m.wq.stats()
    assert q["node"] == "alpha"
    assert q["depth"] == real["pending"] and q["inflight"] == real["inflight"]
    assert q["depth"] + q["inflight"] == QUEUED
    assert q["dlq"] == 1 and q["acked"] == 2 and q["workers"] == 0
    svcs = {s["service"]: s for s in view["services"]}
    s = svcs[m.service]
    assert s["node"] == "alpha" and s["calls"] == CALLS and s["errors"] == FAILED
    assert s["calls_rate"] is None  # one snapshot: no rate yet


def test_once_text_and_no_peers(busy: Busy, tmp_path: Path) -> None:
    r = subprocess.run(_top_cmd(busy, "--once", "--timeout", "10"), env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for word in ("alpha", "beta", busy.stream, busy.queue, busy.service,
                 f"lag {PUBLISHED - HANDLED}"):
        assert word in r.stdout, (word, r.stdout)
    # nobody at the --peer: a line saying so, exit 1, no traceback
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "mesh", "top", "--once", "--no-mdns",
                        "--interface", "127.0.0.1", "--peer", f"tcp://127.0.0.1:{dead}",
                        "--timeout", "0.5"], env=_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "no peers found within 0.5 s" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mesh", "top", "--interval", "0"], env=_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "must be > 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mesh", "top", "--no-mdns"], env=_env(),
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "use --once or --json" in r.stderr


# --- tmux ----------------------------------------------------------------------------------------


class Tmux:
    """One tmux server of our own (``-L``), killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.sock = unique("top")
        self.tmp = tmp

    def run(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self, cmd: list[str], cols: int, rows: int) -> Path:
        rc = self.tmp / f"rc-{unique()}"
        script = self.tmp / f"run-{unique()}.sh"
        env = " ".join(f"{k}={shlex_quote(v)}" for k, v in
                       (("PYTHONPATH", _env()["PYTHONPATH"]), ("TERM", "xterm-256color")))
        # the shell outlives a Ctrl-C (its trap runs after the child exits) to write the
        # exit code, then keeps the pane for capture
        script.write_text(f"trap 'true' INT\n{env} {' '.join(map(shlex_quote, cmd))}\n"
                          f"echo $? > {rc}\nsleep 30\n")
        self.run("new-session", "-d", "-x", str(cols), "-y", str(rows), "-s", "top",
                 f"sh {script}")
        return rc

    def pane(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True,
                       timeout=10)


def shlex_quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: the full-screen view is not tested")
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.close()


def test_screen_under_tmux_shows_the_mesh_and_q_quits(busy: Busy, tmux: Tmux) -> None:
    m = busy
    rc = tmux.start(_top_cmd(m, "--interval", "0.3"), 160, 50)
    lag = f"lag {PUBLISHED - HANDLED}"

    def shown() -> str | None:
        text = tmux.pane()
        lines = text.splitlines()
        ok = (any("alpha" in ln and "joined" in ln and " ok " in ln for ln in lines)
              and any("beta" in ln and "joined" in ln and " ok " in ln for ln in lines)
              and any(m.stream in ln and "alpha" in ln for ln in lines)
              and any("sub agg" in ln and lag in ln and "beta" in ln for ln in lines)
              and any(ln.split()[:3] == [m.queue, "alpha", "4"] or
                      (m.queue in ln and ln.split()[2:4] in (["4", "0"], ["0", "4"]))
                      for ln in lines)
              and any(ln.split()[:3] == [m.service, "alpha", str(CALLS)] for ln in lines))
        return text if ok else None

    text = wait_until(shown, 20, what="the pane shows nodes, stream lag, queue, service")
    # rates after two snapshots: the service row's CALLS/s is a number, not "-"
    svc_line = wait_until(lambda: next((ln for ln in tmux.pane().splitlines()
                                        if ln.startswith(m.service)
                                        and ln.split()[3] != "-"), None), 10,
                          what="a calls/s rate")
    assert float(svc_line.split()[3]) == 0.0
    assert "Traceback" not in text
    tmux.run("send-keys", "-t", "top", "q")
    wait_until(lambda: rc.exists() and rc.read_text().strip(), 10, what="mesh top exited")
    assert rc.read_text().strip() == "0"


def test_screen_too_small_says_so_and_ctrl_c_exits_0(busy: Busy, tmux: Tmux) -> None:
    rc = tmux.start(_top_cmd(busy, "--interval", "0.3"), 40, 6)
    seen: list[str] = []
    found = poll_until(lambda: seen.append(tmux.pane()) or "terminal too small" in seen[-1], 20)
    assert found, f"no too-small message in {seen[-1:]}"
    tmux.run("send-keys", "-t", "top", "C-c")
    wait_until(lambda: rc.exists() and rc.read_text().strip(), 10, what="mesh top exited")
    assert rc.read_text().strip() == "0"
    assert "Traceback" not in tmux.pane()


def test_json_lines_carry_rates_and_sigint_exits_0(busy: Busy) -> None:
    import signal

    m = busy
    proc = subprocess.Popen(_top_cmd(m, "--json", "--interval", "0.3"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        rated = None
        for line in proc.stdout:  # one object per interval; ends if the process dies
            view = json.loads(line)
            svc = next((s for s in view["services"] if s["service"] == m.service), None)
            if svc is not None and svc["calls_rate"] is not None:
                rated = view
                break
        assert rated is not None, proc.stderr.read() if proc.stderr else ""
        (svc,) = [s for s in rated["services"] if s["service"] == m.service]
        assert svc["calls_rate"] == 0.0 and svc["calls"] == CALLS  # nothing called meanwhile
        (st,) = [s for s in rated["streams"] if s["stream"] == m.stream]
        assert st["publishers"][0]["rate"] == 0.0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_screen_without_peers_says_so_and_q_quits(tmux: Tmux) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rc = tmux.start([sys.executable, "-m", "mesh", "top", "--no-mdns", "--interface",
                     "127.0.0.1", "--peer", f"tcp://127.0.0.1:{dead}", "--interval", "0.3"],
                    100, 30)
    wait_until(lambda: "no peers yet" in tmux.pane(), 20, what="the no-peers line")
    tmux.run("send-keys", "-t", "top", "q")
    wait_until(lambda: rc.exists() and rc.read_text().strip(), 10, what="mesh top exited")
    assert rc.read_text().strip() == "0"


def test_a_stopped_node_shows_stale_then_ok_again(tmp_path: Path) -> None:
    """SIGSTOP is a slow, alive peer: its last numbers stay, marked stale; SIGCONT: ok."""
    import signal

    from tests.node_child import CODE
    from tests.util import python_child

    mesh = unique("top")
    child = python_child(CODE, json.dumps({"data_dir": str(tmp_path / "frozen"),
                                           "name": "frozen", "mesh": mesh,
                                           "interface": "127.0.0.1"}),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    top = None
    try:
        assert child.stdout is not None
        ready = json.loads(child.stdout.readline())
        ep = next(e for e in ready["endpoints"]["control"] if e.startswith("tcp://"))
        top = subprocess.Popen([sys.executable, "-m", "mesh", "top", "--json", "--interval",
                                "0.3", "--no-mdns", "--interface", "127.0.0.1", "--mesh", mesh,
                                "--peer", ep], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        assert top.stdout is not None

        def until(stats: str, timeout: float = 15.0) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            for line in top.stdout:  # type: ignore[union-attr]  # a line every 0.3 s
                assert time.monotonic() < deadline, f"frozen never showed {stats}"
                rows = [n for n in json.loads(line)["nodes"] if n["name"] == "frozen"]
                if rows and rows[0]["stats"] == stats:
                    return rows[0]
            raise AssertionError(f"mesh top ended before frozen showed {stats}")

        until("ok")
        child.send_signal(signal.SIGSTOP)
        row = until("stale")
        assert row["state"] in ("joined", "evasive") and row["uptime_s"] is not None
        child.send_signal(signal.SIGCONT)
        assert until("ok")["state"] == "joined"
        top.send_signal(signal.SIGINT)
        assert top.wait(timeout=10) == 0
    finally:
        child.send_signal(signal.SIGCONT)
        for p in (top, child):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
