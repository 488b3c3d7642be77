"""Writer epochs of the log (mesh/log/epochs.py): pure lookups and real files."""

from __future__ import annotations

import os
from pathlib import Path

from mesh.log import Log, LogConfig
from mesh.log import epochs as ep
from mesh.log.epochs import EpochHistory


def test_divergence_of_known_unknown_and_legacy_positions() -> None:
    h = EpochHistory([(0, 0), (11, 50), (22, 80), (33, 80)])
    assert h.current == 33
    assert h.end_of(11) == 80 and h.end_of(33) is None and h.end_of(99) is None
    assert h.divergence(11, 60) == 60          # inside its epoch: agrees
    assert h.divergence(11, 95) == 80          # its epoch ended at 80 (a lost tail)
    assert h.divergence(22, 120) == 80         # an empty epoch that was cut back
    assert h.divergence(33, 500) == 500        # the current epoch: no end yet
    assert h.divergence(None, 500) == 500      # no epoch known (older cursor): trusted
    assert h.divergence(77, 120) == 80         # unknown epoch: up to the newest start <= pos
    assert h.divergence(77, 10) == 0
    assert h.since(85) == [(33, 80)] and h.since(10) == h.entries


def test_every_writer_open_is_a_new_durable_epoch(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Log.open(d) as log:
        e1 = log.epoch
        assert e1 != 0 and log.epochs.entries == [(e1, 0)]
        log.append_many([b"a"] * 5)
    with Log.open(d) as log:
        e2 = log.epoch
        assert e2 not in (0, e1)
        assert log.epochs.entries == [(e1, 0), (e2, 5)]
    with Log.open(d, readonly=True) as ro:
        assert ro.epochs.entries == [(e1, 0), (e2, 5)]
    assert ep.load(str(d)) == [(e1, 0), (e2, 5)]


def test_a_lost_tail_ends_the_old_epoch_where_the_log_now_ends(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Log.open(d, config=LogConfig()) as log:
        e1 = log.epoch
        log.append_many([b"x" * 10] * 10)
        seg = next(f for f in os.listdir(d) if f.endswith(".log"))
        keep = os.path.getsize(d / seg)
        log.append_many([b"y" * 10] * 10)   # offsets 10..19
    os.truncate(d / seg, keep)                # the power cut lost 10..19
    with Log.open(d) as log:
        assert log.next_offset == 10
        h = log.epochs
        assert h.divergence(e1, 20) == 10     # a reader that saw 10..19 must go back to 10
        assert h.divergence(e1, 7) == 7


def test_a_wiped_directory_makes_every_old_epoch_unknown(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Log.open(d) as log:
        e1 = log.epoch
        log.append_many([b"a"] * 30)
    for f in os.listdir(d):
        os.unlink(d / f)
    with Log.open(d) as log:
        assert log.next_offset == 0
        assert not log.epochs.knows(e1)
        assert log.epochs.divergence(e1, 30) == 0


def test_a_log_from_before_epochs_gets_epoch_zero_for_its_records(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Log.open(d) as log:
        log.append_many([b"a"] * 4)
    os.unlink(d / ep.EPOCHS_NAME)
    with Log.open(d) as log:
        assert log.epochs.entries[0] == (0, 0) and log.epochs.entries[1][1] == 4
        assert log.epochs.divergence(0, 4) == 4


def test_a_damaged_history_starts_a_new_one(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Log.open(d) as log:
        log.append(b"a")
    (d / ep.EPOCHS_NAME).write_bytes(b"\xff garbage")
    with Log.open(d) as log:
        assert log.epoch != 0 and log.epochs.entries[0] == (0, 0)
