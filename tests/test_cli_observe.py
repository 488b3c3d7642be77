"""The observability CLI as real subprocesses on loopback: pub -> sub, push -> work, call,
streams, stats, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import Node
from mesh.metrics import serve_prometheus
from tests.util import REPO, unique, wait_until

LOOP = ["--interface", "127.0.0.1", "--no-mdns"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mesh(*args: str, timeout: float = 20, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True,
                          env=_env(env), timeout=timeout)


def ce_text(ce: dict[str, object]) -> str:
    """The data of a CloudEvents JSON event as text (bytes travel as data_base64)."""
    import base64

    if "data_base64" in ce:
        return base64.b64decode(str(ce["data_base64"])).decode()
    return str(ce["data"])


class Bg:
    """A long-running `mesh` command; its control endpoint is read from stderr."""

    def __init__(self, *args: str, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.err_path = tmp / f"err-{unique()}"
        self.err = open(self.err_path, "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen([sys.executable, "-m", "mesh", *args], stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=_env(env))

    def endpoint(self) -> str:
        def find() -> str | None:
            m = re.search(r"control (tcp://\S+)", self.err_path.read_text())
            return m.group(1) if m else None
        return wait_until(find, 10, what="control endpoint on stderr")

    def finish(self, timeout: float = 20) -> tuple[int, str, str]:
        out, _ = self.p.communicate(timeout=timeout)
        self.err.close()
        return self.p.returncode, out, self.err_path.read_text()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.err.close()


@pytest.fixture
def bgs() -> Iterator[list[Bg]]:
    procs: list[Bg] = []
    yield procs
    for b in procs:
        b.stop()


def test_pub_to_sub_round_trip_between_two_cli_processes(tmp_path: Path, bgs: list[Bg]) -> None:
    topic = unique("cli")
    sub = Bg("sub", topic, "--count", "2", "--timeout", "20", "--json", *LOOP, tmp=tmp_path)
    bgs.append(sub)
    ep = sub.endpoint()
    r = mesh("pub", topic, '{"c": 21.5}\nplain text', "--lines", "--peer", ep, *LOOP, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["seqs"] == [0, 1]
    rc, out, err = sub.finish()
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]  # CloudEvents JSON
    assert [ce_text(e) for e in events] == ['{"c": 21.5}', "plain text"]
    assert [e["meshseq"] for e in events] == [0, 1] and events[0]["meshstream"] == topic
    assert events[0]["specversion"] == "1.0" and events[0]["source"]


def test_push_to_work_between_two_cli_processes(tmp_path: Path, bgs: list[Bg]) -> None:
    queue = unique("q")
    work = Bg("work", queue, "--count", "2", "--timeout", "30", "--metrics-port", "0", *LOOP,
              tmp=tmp_path)
    bgs.append(work)
    ep = work.endpoint()
    r = mesh("push", queue, "resize img-7", "--peer", ep, *LOOP)
    assert r.returncode == 0, r.stderr
    assert "acked" in r.stdout
    # the worker's live metrics, through `mesh stats`
    url = wait_until(lambda: re.search(r"metrics on (http://\S+)", work.err_path.read_text()),
                     10, what="metrics URL").group(1)
    r = mesh("stats", "--url", url, "--json")
    assert r.returncode == 0, r.stderr
    consumed = json.loads(r.stdout)["events_consumed_total"]
    assert [s["value"] for s in consumed if s["labels"].get("stream") == queue] == [1]
    r = mesh("stats", "--url", url)
    assert f'event_processing_duration_seconds_count{{kind="pipeline",name="{queue}"}} 1' \
        in r.stdout
    r = mesh("push", queue, "second", "--peer", ep, *LOOP)
    assert r.returncode == 0, r.stderr
    rc, out, err = work.finish()
    assert rc == 0, err
    assert f"{queue} task 0 (delivery 1) resize img-7" in out


def test_call_against_a_service_in_this_process(tmp_path: Path) -> None:
    from patterns.reqrep import Service

    svc_name = unique("svc")
    with Node(data_dir=tmp_path / "n", interface="127.0.0.1", mdns=False) as node, \
            Service(node, svc_name, lambda req: b"echo:" + req.payload):
        ep = node.info().endpoints["control"][0]
        r = mesh("call", svc_name, "ping", "--peer", ep, *LOOP)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "echo:ping"
        r = mesh("call", svc_name, "x", "--peer", ep, *LOOP, "--json")
        assert json.loads(r.stdout) == {"service": svc_name, "reply": "echo:x"}


def test_streams_and_stats_read_a_data_dir_and_an_endpoint(tmp_path: Path) -> None:
    from patterns.pubsub import Publisher, Start, Subscriber

    a, b = tmp_path / "a", tmp_path / "b"
    topic = unique("s")
    with Node(data_dir=a, interface="127.0.0.1", mdns=False) as na, \
            Publisher(na, topic) as pub:
        pub.publish_many([b"x"] * 5)
        ep = na.info().endpoints["control"][0]
        with Node(data_dir=b, interface="127.0.0.1", mdns=False, static_peers=(ep,)) as nb, \
                Subscriber(nb, topic, durable="agg", start=Start.beginning(),
                           auto_commit=False) as sub:
            for _ in range(3):
                assert sub.recv(timeout=10) is not None
            sub.commit()  # past the third (the current one)
        wait_until(lambda: pub.stats().lag.get("agg") == 2, 10, what="ack reached publisher")
        server, port = serve_prometheus(na)
        try:
            r = mesh("streams", str(a), "--metrics", f"http://127.0.0.1:{port}/metrics", "--json")
            assert r.returncode == 0, r.stderr
            row = next(x for x in json.loads(r.stdout) if x["stream"] == topic)
            assert row["live_lag"] == {"agg": 2}
            r = mesh("stats", "--port", str(port), "--json")
            assert r.returncode == 0, r.stderr
            assert "metrics_collector_errors_total" in json.loads(r.stdout)
            r = mesh("stats", "--port", str(port), "--watch", "--interval", "0.1", "--count", "2")
            assert r.returncode == 0 and r.stdout.count("--") == 2, r.stderr
        finally:
            server.close()
    r = mesh("streams", str(a), "--json")
    assert r.returncode == 0, r.stderr
    row = next(x for x in json.loads(r.stdout) if x["stream"] == topic)
    assert row["head"] == 5 and row["records"] == 5 and row["first_offset"] == 0
    r = mesh("streams", str(a))
    assert f"{topic}: head 5, holds 0..4" in r.stdout
    r = mesh("streams", str(b), "--json")
    row = next(x for x in json.loads(r.stdout) if x["stream"] == topic)
    assert [(s["name"], s["position"], s["lag"]) for s in row["subscribers"]] == [("agg", 3, None)]
    r = mesh("stats", "--data-dir", str(a))
    assert f'log_records{{stream="{topic}"}} 5' in r.stdout


@pytest.mark.parametrize("args, msg", [
    (("sub", "x", "--from", "bogus", "--no-mdns"), "--from must be"),
    (("streams", "/nonexistent-dir"), "is not a directory"),
    (("stats",), "give --url, --port or --data-dir"),
    (("pub", "t", "@/nonexistent-file", "--no-mdns"), "cannot read"),
    (("push", "q", "x", "--peer", "bogus"), "--peer must be"),
])
def test_user_mistakes_are_one_line_errors(args: tuple[str, ...], msg: str) -> None:
    r = mesh(*args)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1


def test_sub_text_output_names_the_publisher(tmp_path: Path, bgs: list[Bg]) -> None:
    # two `mesh pub` runs both printed "topic #0": the publisher (the event's source) tells
    # them apart
    topic = unique("who")
    sub = Bg("sub", topic, "--count", "2", "--timeout", "30", *LOOP, tmp=tmp_path)
    bgs.append(sub)
    ep = sub.endpoint()
    for name in ("pub-a", "pub-b"):
        r = mesh("pub", topic, "x", "--name", name, "--peer", ep, *LOOP)
        assert r.returncode == 0, r.stderr
    rc, out, err = sub.finish()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{topic} #0 from pub-a ") and \
        lines[1].startswith(f"{topic} #0 from pub-b "), lines
