"""Work queue durability: power cuts, deleted and damaged files, a full disk, the
queue logs' own namespace, and memory bounded by what is in flight. Real files, real sockets,
real child processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import msgpack
import pytest

from mesh.cli import main as cli_main
from mesh.errors import QueueStateMissing
from mesh.log import format as fmt
from mesh.node import Node, PresenceConfig
from patterns.pipeline.dispatch import DispatchConfig, Dispatcher
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.store import QueueStore, encode_task, journal_records, pipeline_root
from patterns.pipeline.worker import Worker
from tests.util import python_child, unique, wait_until

CHILD = "import tests.queue_store_child as c; c.main()"
PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)


class Child:
    """One run of tests/queue_store_child.py: its stdout lines, read on a thread."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], data: Path, mesh: str, queue: str,
                 n: int, work: bool, env: dict[str, str] | None = None) -> None:
        self.p = python_child(CHILD, str(data), mesh, queue, str(n), "1" if work else "0",
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(self.p)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 20.0) -> str:
        def found() -> str | None:
            if self.p.poll() is not None and not self._t.is_alive():
                err = self.p.stderr.read().decode() if self.p.stderr else ""
                raise AssertionError(f"child ended ({self.p.returncode}): {err[-2000:]}")
            return next((x for x in self.lines if x.startswith(prefix)), None)

        return wait_until(found, timeout=timeout, what=f"child line {prefix!r}")

    def acked(self) -> set[str]:
        return {x.split()[1] for x in self.lines if x.startswith("acked ")}

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(5)


def cut_log_at(log_dir: str, offset: int) -> None:
    """A power cut: the newest segment of ``log_dir`` cut back to the batch that starts at
    ``offset`` (the unsynced tail lost); index files dropped (rebuilt at open)."""
    segs = sorted(f for f in os.listdir(log_dir) if f.endswith(".log"))
    path = os.path.join(log_dir, segs[-1])
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0
    while pos < len(buf):
        hdr = fmt.check_batch(buf, pos)
        if hdr.base_offset == offset:
            break
        pos += hdr.length
    else:
        raise AssertionError(f"no batch starts at offset {offset} in {path}")
    os.truncate(path, pos)
    for f in os.listdir(log_dir):
        if f.endswith(".index"):
            os.unlink(os.path.join(log_dir, f))


def test_power_cut_tasks_tail_lost_new_tasks_never_take_old_journal_facts(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    mesh, queue, data = unique("qd"), unique("q"), tmp_path / "p"
    # 1. 200 tasks pushed (4 log batches) and acked; then kill -9.
    a = Child(procs, data, mesh, queue, 200, work=True)
    a.wait_for("idle")
    a.kill()
    # 2. Power cut: .tasks loses its tail from id 100 on; the journal keeps the acks of 100..199.
    cut_log_at(pipeline_root(data).path_for(f"{queue}.tasks"), 100)
    # 3. A producer with no worker pushes 200 new tasks: ids 100..299 are handed out again.
    b = Child(procs, data, mesh, queue, 200, work=False)
    stats = json.loads(b.wait_for("stats ")[6:])
    assert b.wait_for("pushed ") == "pushed 100 299"
    assert stats["lost_tasks"] == 100 and stats["lost_ranges"] == [[100, 200]]
    b.kill()
    # 4. A producer with a worker: every one of the 200 new tasks runs (none is taken for
    # acked by the old journal's facts about ids 100..199).
    c = Child(procs, data, mesh, queue, 0, work=True)
    want = {f"{b.p.pid}-{i}" for i in range(200)}
    wait_until(lambda: want <= c.acked(), timeout=20,
               what=f"the new tasks run ({len(want & c.acked())} of 200)")
    c.wait_for("idle")
    assert not ({x for x in c.acked() if x.startswith(f"{a.p.pid}-")})  # old ones stay done


def _filled_store(tmp_path: Path, queue: str, n: int = 10, acked: int = 4) -> None:
    s = QueueStore(tmp_path, queue)
    s.tasks.append_many([encode_task(None, b"t%d" % i) for i in range(n)])
    s.journal.append_many(journal_records([], list(range(acked)), [], [], s.tasks.epoch))
    s.close()


def _verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli_main(["log", "verify", str(path)])
    return rc, capsys.readouterr().out


def test_deleted_task_log_is_refused_at_open_and_reported_by_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _filled_store(tmp_path, "jobs")
    assert _verify(tmp_path, capsys)[0] == 0
    shutil.rmtree(pipeline_root(tmp_path).path_for("jobs.tasks"))
    rc, out = _verify(tmp_path, capsys)
    assert rc == 1 and "missing" in out and "jobs.tasks" in out
    with pytest.raises(QueueStateMissing, match="task log"):
        QueueStore(tmp_path, "jobs")
    s = QueueStore(tmp_path, "jobs", accept_loss=True)
    try:
        rec = s.recover()
        # The old journal's facts name ids of a task log that is gone: none applies to the
        # new one, and the ids they named are reported lost.
        assert rec.tasks_missing and rec.lost_ranges == [(0, 4)] and rec.stale_facts == 4
        tid = s.tasks.append(encode_task(None, b"new"))
        assert tid == 0
    finally:
        s.close()
    s = QueueStore(tmp_path, "jobs")  # the journal's stale facts were dropped for good
    try:
        assert [t[0] for t in s.recover().tasks] == [0]
    finally:
        s.close()


def test_deleted_journal_is_refused_at_open_and_reported_by_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _filled_store(tmp_path, "jobs")
    shutil.rmtree(pipeline_root(tmp_path).path_for("jobs.journal"))
    rc, out = _verify(tmp_path, capsys)
    assert rc == 1 and "missing" in out and "jobs.journal" in out
    with pytest.raises(QueueStateMissing, match="journal"):
        QueueStore(tmp_path, "jobs")
    s = QueueStore(tmp_path, "jobs", accept_loss=True)
    try:
        rec = s.recover()
        assert rec.journal_missing and len(rec.tasks) == 10  # all owed again, and said so
    finally:
        s.close()


def test_damaged_journal_record_is_skipped_counted_and_repairable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = QueueStore(tmp_path, "jobs")
    s.tasks.append_many([encode_task(None, b"t%d" % i) for i in range(10)])
    for i in range(5):  # five journal batches: acks of 0, 1, 2, 3, 4
        s.journal.append_many(journal_records([], [i], [], [], s.tasks.epoch))
    s.close()
    jdir = pipeline_root(tmp_path).path_for("jobs.journal")
    seg = os.path.join(jdir, sorted(f for f in os.listdir(jdir) if f.endswith(".log"))[0])
    with open(seg, "rb") as f:
        buf = f.read()
    pos = 0
    for _ in range(2):  # the third batch (the ack of task 2)
        pos += fmt.check_batch(buf, pos).length
    with open(seg, "r+b") as f:  # flip a byte in its middle
        f.seek(pos + fmt.check_batch(buf, pos).length // 2)
        f.write(bytes([buf[pos + fmt.check_batch(buf, pos).length // 2] ^ 0xFF]))
    s = QueueStore(tmp_path, "jobs")
    try:
        rec = s.recover()
        assert rec.journal_corrupt_records == 1
        # The lost fact costs a re-run of task 2, nothing else.
        assert sorted(t[0] for t in rec.tasks) == [2, 5, 6, 7, 8, 9]
    finally:
        s.close()
    rc, out = _verify(tmp_path, capsys)
    assert rc == 1 and "corrupt" in out
    assert cli_main(["log", "repair", str(tmp_path), "queues/jobs.journal"]) == 0
    capsys.readouterr()
    assert _verify(tmp_path, capsys)[0] == 0


def test_queue_logs_have_their_own_namespace_and_old_data_dirs_migrate(
    tmp_path: Path,
) -> None:
    # An older layout: the queue's logs in streams/, beside a user stream.
    from mesh.log import LogDirectory

    old = LogDirectory(tmp_path)
    t = old.open("jobs.tasks")
    t.append_many([encode_task(None, b"t%d" % i) for i in range(5)])
    t.close()
    j = old.open("jobs.journal")
    j.append_many(journal_records([], [0, 1], [], [], None))  # facts without an epoch
    j.close()
    old.open("jobs.dlq").close()
    old.open("other.tasks").close()  # a user stream that only looks like one
    s = QueueStore(tmp_path, "jobs")
    try:
        assert sorted(t[0] for t in s.recover().tasks) == [2, 3, 4]
    finally:
        s.close()
    root = pipeline_root(tmp_path)
    assert root.path_for("jobs.tasks") == str(tmp_path / "queues" / "streams" / "jobs.tasks")
    assert root.path_for("jobs.dlq") == str(tmp_path / "queues" / "streams" / "jobs.dlq")
    assert set(os.listdir(tmp_path / "streams")) == {"other.tasks"}
    assert os.path.isdir(tmp_path / "queues" / "streams" / "jobs.dlq")
    # A user stream named like a queue log no longer collides with the queue's.
    user = LogDirectory(tmp_path).open("jobs.tasks")
    try:
        user.append(b"user data")
    finally:
        user.close()
    s = QueueStore(tmp_path, "jobs")
    try:
        assert sorted(t[0] for t in s.recover().tasks) == [2, 3, 4]
    finally:
        s.close()


def test_deadline_memory_follows_tasks_in_flight_not_ack_rate() -> None:
    # ack_wait 30 s, one worker of credit 100 acking at once: 200k tasks go through in
    # (fake) milliseconds. The deadline queue must not keep the acked ids until they expire.
    d = Dispatcher(DispatchConfig(ack_wait=30.0), 0.0)
    d.worker_ready(b"w", 100)
    now = 0.0
    d.add_batch(range(200_000), None, [None] * 200_000)
    while True:
        sends = d.dispatch(now)
        if not sends:
            break
        for ident, items in sends:
            d.on_ack(ident, [i[0] for i in items], now)
        d.take_effects()
        now += 0.0001
        d.tick(now)
    assert d.stats()["acked"] == 200_000
    held = sum(len(ids) for _, ids in d._deadlines)
    assert held <= 10_000, f"{held} ids still held by the deadline queue"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_full_disk_on_the_journal_pauses_and_resumes_by_itself(tmp_path: Path) -> None:
    queue = unique("q")
    jdir = tmp_path / "n" / "queues" / "streams" / f"{queue}.journal"
    if not _mount_tmpfs(jdir, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    node = Node(data_dir=tmp_path / "n", name="n", mesh=unique("qf"), interface="127.0.0.1",
                mdns=False, presence=PRESENCE)
    try:
        with WorkQueue(node, queue, config=DispatchConfig(ack_wait=5.0)) as q, \
                Worker(node, queue, credit=50) as w:
            done: set[int] = set()
            stop = threading.Event()

            def work() -> None:
                while not stop.is_set():
                    task = w.get(timeout=0.05)
                    if task is not None:
                        task.ack()
                        done.add(task.id)

            th = threading.Thread(target=work, daemon=True)
            th.start()
            q.push_many([b"a"] * 100)
            wait_until(lambda: len(done) == 100, timeout=10, what="first tasks acked")
            filler = jdir / "filler"
            with open(filler, "wb") as f:  # fill the journal's disk
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            q.push_many([b"b"] * 2000)
            wait_until(lambda: q.stats()["disk_full"], timeout=10, what="disk full seen")
            assert q.stats()["disk_full_events"] >= 1
            before = len(done)
            os.unlink(filler)  # space returns
            wait_until(lambda: len(done) == 2100, timeout=20,
                       what=f"every task acked after space returned ({len(done)})")
            assert before < 2100
            wait_until(lambda: not q.stats()["disk_full"], timeout=5, what="resumed")
            q.push_many([b"c"] * 10)  # and the queue is alive
            wait_until(lambda: len(done) == 2110, timeout=10, what="later tasks acked")
            stop.set()
            th.join(5)
        # Every ack reached the journal: nothing runs again after a restart.
        with WorkQueue(node, queue) as q2:
            assert q2.recovered == 0
    finally:
        node.close()
        subprocess.run(["umount", "-l", str(jdir)], capture_output=True)


def test_journal_records_carry_the_task_log_epoch(tmp_path: Path) -> None:
    s = QueueStore(tmp_path, "jobs")
    try:
        rec = journal_records([], [1], [], [3], s.tasks.epoch)
        assert [msgpack.unpackb(r)[-1] for r in rec] == [s.tasks.epoch] * 2
    finally:
        s.close()


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


def test_long_life_disk_follows_what_is_owed_and_restart_is_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import patterns.pipeline.queue as qmod
    import patterns.pipeline.store as smod

    monkeypatch.setattr(smod, "TASKS_SEGMENT_BYTES", 64 << 10)
    monkeypatch.setattr(qmod, "COMPACT_BYTES", 32 << 10)
    queue = unique("q")
    node = Node(data_dir=tmp_path / "n", name="n", mesh=unique("ql"), interface="127.0.0.1",
                mdns=False, presence=PRESENCE)
    n = 40_000
    try:
        with WorkQueue(node, queue) as q, Worker(node, queue, credit=200) as w:
            done = 0
            stop = threading.Event()

            def work() -> None:
                nonlocal done
                while not stop.is_set():
                    task = w.get(timeout=0.05)
                    if task is not None:
                        task.ack()
                        done += 1

            th = threading.Thread(target=work, daemon=True)
            th.start()
            for _b in range(0, n, 500):
                q.push_many([b"x" * 40] * 500)
            wait_until(lambda: q.stats().get("unacked") == 0 and q.stats().get("added") == n,
                       timeout=60, what="every task acked")
            q.push_many([b"y" * 40] * 500)  # one more segment roll: trims .tasks
            wait_until(lambda: q.stats().get("unacked") == 0
                       and q.stats().get("added") == n + 500, timeout=10, what="acked")
            stop.set()
            th.join(5)
            root = pipeline_root(node.data_dir)
            tasks_bytes = _dir_bytes(root.path_for(f"{queue}.tasks"))
            journal_bytes = sum(_dir_bytes(os.path.join(root.streams_dir, d))
                                for d in os.listdir(root.streams_dir)
                                if d.startswith(f"{queue}.journal"))
        # 40k tasks of ~60 bytes = 2.4 MB of .tasks and ~0.5 MB of journal over their life;
        # what is kept is bounded by the segment / compaction sizes, not by that history.
        assert tasks_bytes < 4 * (64 << 10), tasks_bytes
        assert journal_bytes < 4 * (32 << 10) + 8192, journal_bytes
        with WorkQueue(node, queue) as q2:
            assert q2.recovered == 0
            assert q2._store.tasks.next_offset == n + 500  # ids are never reused
    finally:
        node.close()


def test_power_cut_below_a_journal_snapshot_keeps_new_tasks_owed(tmp_path: Path) -> None:
    s = QueueStore(tmp_path, "jobs")
    s.tasks.append_many([encode_task(None, b"a%d" % i) for i in range(50)])
    s.tasks.append_many([encode_task(None, b"a%d" % i) for i in range(50, 100)])
    s.journal.append_many(journal_records([], list(range(50)), [], [], s.tasks.epoch))
    s.journal.append_many(journal_records([], list(range(50, 99)), [], [], s.tasks.epoch))
    s.close()
    s = QueueStore(tmp_path, "jobs", compact_after=1)
    assert [t[0] for t in s.recover().tasks] == [99]  # and compacted: "done below 100 but 99"
    assert s.gen == 1
    s.close()
    cut_log_at(pipeline_root(tmp_path).path_for("jobs.tasks"), 50)  # power cut: 50.. lost
    s = QueueStore(tmp_path, "jobs")
    try:
        rec = s.recover()
        assert rec.tasks == [] and rec.lost_ranges == [(50, 100)]
        assert list(s.tasks.append_many([encode_task(None, b"b%d" % i) for i in range(60)])) \
            == list(range(50, 110))
    finally:
        s.close()
    s = QueueStore(tmp_path, "jobs")
    try:  # the snapshot's "done below 100" does not cover the new tasks 50..99
        assert [t[0] for t in s.recover().tasks] == list(range(50, 110))
    finally:
        s.close()


def test_power_cut_of_both_files_at_different_points_loses_no_acked_task(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    mesh, queue, data = unique("qd"), unique("q"), tmp_path / "p"
    a = Child(procs, data, mesh, queue, 300, work=True)
    a.wait_for("idle")
    a.kill()
    root = pipeline_root(data)
    cut_log_at(root.path_for(f"{queue}.tasks"), 200)  # .tasks lost 200..299
    jdir = root.path_for(f"{queue}.journal")  # the journal lost its newest third of batches
    seg = os.path.join(jdir, sorted(f for f in os.listdir(jdir) if f.endswith(".log"))[-1])
    with open(seg, "rb") as f:
        buf = f.read()
    starts, pos = [], 0
    while pos < len(buf):
        hdr = fmt.check_batch(buf, pos)
        starts.append(hdr.base_offset)
        pos += hdr.length
    cut_log_at(jdir, starts[len(starts) * 2 // 3])
    b = Child(procs, data, mesh, queue, 100, work=False)  # new tasks get ids 200..299
    assert b.wait_for("pushed ") == "pushed 200 299"
    stats = json.loads(b.wait_for("stats ")[6:])
    b.kill()
    c = Child(procs, data, mesh, queue, 0, work=True)
    c.wait_for("idle")
    # No new task was taken for an old one (all 100 new payloads ran), and every task still
    # in .tasks whose ack the journal lost ran again (at-least-once), never lost.
    assert {f"{b.p.pid}-{i}" for i in range(100)} <= c.acked()
    assert stats["lost_tasks"] is not None and stats["lost_tasks"] <= 100
