"""What users see of dead letters, through real `mesh` processes: `mesh push --wait` on a task
that is dead-lettered, and `mesh dlq redrive` with and without a running producer."""

from __future__ import annotations

import json
from pathlib import Path

from mesh.node import Node
from patterns.pipeline.queue import WorkQueue
from tests.test_cli_observe import LOOP, Bg, mesh
from tests.test_pipeline_dlq import write_dead_letters
from tests.util import unique


def test_push_wait_reports_a_dead_lettered_task_with_its_error_and_fails(tmp_path: Path) -> None:
    queue = unique("q")
    # A worker that nacks every delivery: the task is dead-lettered after 5 (the default).
    work = Bg("work", queue, "--fail", "--count", "10", "--timeout", "60", *LOOP, tmp=tmp_path)
    try:
        ep = work.endpoint()
        r = mesh("push", queue, "doomed", "--peer", ep, "--wait", "30", "--json", *LOOP,
                 timeout=60)
        assert r.returncode == 1, (r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert out["status"] == "dead_lettered" and out["acked"] == 0 and out["dead"] == 1
        [d] = out["dead_lettered"]
        assert (d["id"], d["reason"], d["deliveries"]) == (0, "max_deliveries", 5)
        assert (d["error_type"], d["error_message"]) == ("RuntimeError", "mesh work --fail")
        r = mesh("push", queue, "doomed-too", "--peer", ep, "--wait", "30", *LOOP, timeout=60)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "acked" in r.stdout and "1 dead-lettered" in r.stdout
        assert "task 0 dead-lettered (max_deliveries, 5 deliveries" in r.stdout
        assert "RuntimeError: mesh work --fail" in r.stdout
    finally:
        work.stop()


def test_dlq_redrive_says_whether_the_producer_runs(tmp_path: Path) -> None:
    queue = unique("q")
    write_dead_letters(tmp_path, queue, 3)
    want = (f"queued for redrive: the producer of {queue} is not running; "
            f"it will redeliver when it starts")
    r = mesh("dlq", "redrive", str(tmp_path), queue, "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"0: {want} (task 0)"
    r = mesh("dlq", "redrive", str(tmp_path), queue, "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"offset": 1, "status": "redriven", "task_id": 1,
                                     "producer_running": False, "note": want}]
    with Node(data_dir=tmp_path, mesh=unique("m"), interface="127.0.0.1", mdns=False) as node, \
            WorkQueue(node, queue) as q:
        assert q.recovered == 2  # the two redriven tasks waited in the queue's log
        r = mesh("dlq", "redrive", str(tmp_path), queue, "2", "--json")
        assert r.returncode == 0, r.stderr
        [m] = json.loads(r.stdout)
        assert (m["status"], m["producer_running"]) == ("redrive_requested", True)
        assert "running producer" in m["note"]
