"""Every example runs to completion as its own process and prints what it promises.

The pipeline_* examples run in tests/test_pipeline_examples.py and bridge_mqtt.py (it needs a
broker) in tests/test_bridge_cli.py; this file runs every other one, and fails when an example
appears without an expectation here.
"""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from tests.util import REPO, python_child

EXPECT = {
    "pubsub_basic.py": b"sensors.temp 4",
    "reqrep_thumbs.py": b"remote error:",
    "edge_sensors.py": b"all 15 readings delivered, in order",
    "p2p_failover.py": b"every call answered",
    "ipc_local.py": b"10 events across processes over ipc://",
    "durable_resume.py": b"resumed after kill -9 without losing an event",
    "secured_mesh.py": b"intruder refused",
}
ELSEWHERE = ("pipeline_", "bridge_", "__init__")

ALL = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "examples", "*.py")))


def test_every_example_is_run_somewhere() -> None:
    missing = [n for n in ALL if n not in EXPECT and not n.startswith(ELSEWHERE)]
    assert not missing, f"examples without a test: {missing}"


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example_runs(name: str) -> None:
    path = os.path.join(REPO, "examples", name)
    module = "examples." + name.removesuffix(".py")
    with open(path) as f:
        text = f.read()
    assert text.startswith('"""') and f"python -m {module}" in text[:1500], "header: how to run"
    assert "sys.path" not in text, "no sys.path hack: run with python -m"
    p = python_child(f"import runpy; runpy.run_module({module!r}, run_name='__main__')",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        out, err = p.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{name} did not finish in 45 s: {err.decode()[-2000:]}")
    assert p.returncode == 0, err.decode()[-3000:]
    assert EXPECT[name] in out, out.decode()[-2000:]
