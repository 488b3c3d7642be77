"""``mesh dlq``: list, show, redrive and discard against real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.cli import main
from mesh.node import Node
from patterns.pipeline.dispatch import DispatchConfig
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.store import pipeline_root
from patterns.pipeline.worker import Worker
from tests.util import unique, wait_until


def make_dead_letters(data_dir: Path, queue: str, n: int) -> None:
    with Node(data_dir=data_dir, mesh=unique("m"), interface="127.0.0.1", mdns=False) as node, \
            WorkQueue(node, queue, config=DispatchConfig(max_deliveries=1)) as q, \
            Worker(node, queue, credit=5) as w:
        for i in range(n):
            q.push(f"job-{i}".encode())
        done = 0
        while done < n:
            t = wait_until(lambda: w.get(timeout=0.05), timeout=10, what="task")
            try:
                raise RuntimeError("disk on fire")
            except RuntimeError as exc:
                t.nack(error=exc)
            done += 1
        w.flush()
        wait_until(lambda: len(q.dlq.list()) == n, timeout=10, what="dead letters")


def test_dlq_cli_list_show_redrive_discard(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    queue = unique("q")
    make_dead_letters(tmp_path, queue, 2)
    assert main(["dlq", "list", str(tmp_path), queue, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["payload"] for e in listed] == ["job-0", "job-1"]
    assert listed[0]["error_type"] == "RuntimeError" and listed[0]["status"] == "dead"
    assert main(["dlq", "show", str(tmp_path), queue, "0"]) == 0
    shown = capsys.readouterr().out
    assert "disk on fire" in shown and "Traceback" in shown
    assert main(["dlq", "redrive", str(tmp_path), queue, "0", "--json"]) == 0
    [done] = json.loads(capsys.readouterr().out)
    assert (done["offset"], done["status"], done["producer_running"]) == (0, "redriven", False)
    assert main(["dlq", "discard", str(tmp_path), queue, "1"]) == 0
    capsys.readouterr()
    # Both operations are recorded; the redriven task is a new record of the queue's log.
    assert main(["dlq", "list", str(tmp_path), queue, "--all", "--json"]) == 0
    statuses = [e["status"] for e in json.loads(capsys.readouterr().out)]
    assert statuses == ["redriven", "discarded"]
    tasks = pipeline_root(tmp_path).open(f"{queue}.tasks", readonly=True)
    try:
        assert tasks.next_offset == 3
    finally:
        tasks.close()
    # A second discard is a user mistake: one line on stderr, exit code 1.
    assert main(["dlq", "discard", str(tmp_path), queue, "1"]) == 1
    assert "already discarded" in capsys.readouterr().err
    assert main(["dlq", "show", str(tmp_path), queue, "99"]) == 1
    assert main(["dlq", "list", str(tmp_path), "no-such-queue"]) == 1  # says so, exits 1
    assert "no queue 'no-such-queue'" in capsys.readouterr().err


def test_cli_redrive_while_producer_runs_is_fulfilled_by_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = unique("q")
    make_dead_letters(tmp_path, queue, 1)
    with Node(data_dir=tmp_path, mesh=unique("m"), interface="127.0.0.1", mdns=False) as node, \
            WorkQueue(node, queue) as q, Worker(node, queue, credit=5) as w:
        # The running producer holds <queue>.tasks: the CLI records a request instead.
        assert main(["dlq", "redrive", str(tmp_path), queue, "0", "--json"]) == 0
        [done] = json.loads(capsys.readouterr().out)
        assert (done["offset"], done["status"], done["producer_running"]) == \
            (0, "redrive_requested", True)
        task = wait_until(lambda: w.get(timeout=0.05), timeout=10, what="redriven task")
        assert task.payload == b"job-0" and task.delivery == 1
        task.ack()
        w.flush()
        wait_until(lambda: q.stats().get("acked") == 1, timeout=5, what="ack")
        assert q.dlq.show(0).status == "redriven"
