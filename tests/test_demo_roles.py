"""The processes of `mesh demo` (mesh.cli.demo_roles), run directly: real processes, CURVE,
the publisher as the static seed, and a kill -9 of the durable subscriber."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from mesh.cli.demo_cmd import _RULES, _make_keys
from tests.util import REPO, unique, wait_until


class _Role:
    """One demo role process and the latest report it printed."""

    def __init__(self, role: str, name: str, cfg: dict[str, Any]) -> None:
        self.last: dict[str, Any] = {}
        self.up = threading.Event()
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli.demo_roles", role, name, json.dumps(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("event") == "up":
                self.last["control"] = msg["control"]
                self.up.set()
            elif msg.get("event") != "peer":
                self.last = {**self.last, **msg}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def test_restarted_aggregator_reports_a_stream_it_consumed_to_the_end_before_the_kill(
        tmp_path: Path) -> None:
    # The demo's intermittent stall: under load sensor-1 (started first) had published all
    # its readings and the aggregator had consumed and committed all of them before it was
    # killed. The restarted aggregator then had nothing to replay from sensor-1, reported
    # nothing for that stream ("sensor-1 -/200"), and the demo waited for it until its
    # deadline. Made certain here: the kill comes after the publisher saw the commit (lag 0).
    names = ("sensor-1", "aggregator")
    keys = _make_keys(tmp_path, names)
    cfg: dict[str, Any] = {
        "root": str(tmp_path), "mesh": unique("roles"), "mdns": False, "count": 30,
        "rate": 300.0, "interface": "127.0.0.1", "jobs": "none", "calls": "none",
        "security": {"keys": str(tmp_path / "keys"), "allow": str(tmp_path / "allow"),
                     "permissions": {keys[n]: _RULES[n.rsplit("-", 1)[0]] for n in names}}}
    stream = "demo.readings.sensor-1"
    procs: list[_Role] = []
    try:
        sensor = _Role("sensor", "sensor-1", cfg)
        procs.append(sensor)
        assert sensor.up.wait(15), "sensor-1 did not start"
        seed = sensor.last["control"][:1]
        cfg = {**cfg, "seeds": seed}
        cfg["security"] = {**cfg["security"], "peer_keys": {seed[0]: keys["sensor-1"]}}
        agg = _Role("aggregator", "aggregator", cfg)
        procs.append(agg)
        # consumed to the end, committed, and the commit acked to the publisher
        wait_until(lambda: sensor.last.get("done") and agg.last.get("heads", {}).get(stream)
                   == 30 and sensor.last.get("lag", {}).get("aggregator") == 0, 20,
                   what=lambda: (sensor.last, agg.last))
        agg.kill()
        again = _Role("aggregator", "aggregator", cfg)
        procs.append(again)
        wait_until(lambda: "heads" in again.last, 15, what="a report of the restarted aggregator")
        # it resumes at its cursor (30): consumed 30, nothing left, no hole, nothing replayed
        assert again.last["heads"].get(stream) == 30, again.last
        assert again.last["first"].get(stream) == 30, again.last
        assert again.last["holes"] == 0
    finally:
        for p in procs:
            p.stop()
