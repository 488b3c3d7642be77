"""The queue's files: task records, journal recovery and compaction (real files)."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from mesh.errors import LogError
from patterns.pipeline.dispatch import Attempt
from patterns.pipeline.store import (
    QueueStore,
    decode_task,
    encode_task,
    journal_records,
    pipeline_root,
)


def test_task_records_round_trip_and_refuse_garbage() -> None:
    assert decode_task(encode_task(None, b"abc")) == (None, b"abc")
    assert decode_task(encode_task("k", b"\x00")) == ("k", b"\x00")
    assert decode_task(encode_task(b"bk", b"")) == (b"bk", b"")
    for bad in (b"", b"\x07zz", b"\x01\xc1", b"\x01" + msgpack.packb(["k", "str"])):
        with pytest.raises(LogError):
            decode_task(bad)


def owed(store: QueueStore) -> dict[int, tuple[int, int]]:
    return {t[0]: (t[3], len(t[4])) for t in store.recover().tasks}


def test_recovery_and_compaction_keep_exactly_the_owed_tasks(tmp_path: Path) -> None:
    s = QueueStore(tmp_path, "jobs", compact_after=10)
    s.tasks.append_many([encode_task(None, f"t{i}".encode()) for i in range(50)])
    att = Attempt(1, "w", 1.0, 2.0, "nack", "ValueError", "bad", None)
    recs = journal_records([(i, 1) for i in range(50)], [], [], [])
    for i in range(40):
        if i != 5:
            recs += journal_records([], [i], [], [])  # one record per ack: a long journal
    recs += journal_records([(5, 2)], [], [(5, att)], [])
    recs += journal_records([], [], [], [45])  # 45 dead-lettered: done, not owed
    s.journal.append_many(recs)
    s.close()

    s = QueueStore(tmp_path, "jobs", compact_after=10)
    first = owed(s)  # recovers, then compacts (the journal had > 10 records)
    assert first == {5: (2, 1), **{i: (1, 0) for i in range(40, 50) if i != 45}}
    assert s.gen == 1
    assert not os.path.isdir(pipeline_root(tmp_path).path_for("jobs.journal"))
    s.close()

    s = QueueStore(tmp_path, "jobs", compact_after=10)
    assert owed(s) == first  # from the snapshot, identical
    assert s.gen == 1 and s.journal.next_offset <= 3
    s.journal.append_many(journal_records([], [5, 41], [], []))
    s.close()
    s = QueueStore(tmp_path, "jobs", compact_after=10)
    assert set(owed(s)) == {40, 42, 43, 44, 46, 47, 48, 49}
    s.close()
