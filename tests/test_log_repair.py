"""``mesh log repair`` run as a real subprocess: damaged ranges are cut out, the log opens and
reads cleanly past them, and the hole keeps the LogCorruptedRange contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mesh.errors import LogCorrupted, LogCorruptedRange
from mesh.log import FsyncPolicy, Log, LogConfig
from mesh.log import format as fmt
from tests.util import REPO

CFG = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096)
REC = 60  # payload bytes: a one-record batch is 36 + 60 bytes


def mesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", "log", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=30)


def payload(i: int) -> bytes:
    return b"%06d" % i + b"p" * (REC - 6)


def _fill(path: Path, n: int, cfg: LogConfig = CFG) -> None:
    with Log.open(path, config=cfg) as lg:
        for i in range(n):
            lg.append(payload(i))


def _offsets(lg: Log, start: int) -> list[int]:
    return [r.offset for r in lg.read(start, 1000)]


def test_bit_flip_is_cut_out_and_reads_raise_the_same_range(data_dir: Path) -> None:
    _fill(data_dir, 30)
    seg = data_dir / fmt.segment_name(0)
    pos = 10 * (36 + REC)
    data = bytearray(seg.read_bytes())
    data[pos + 40] ^= 0x10
    seg.write_bytes(bytes(data))
    out = mesh("verify", str(data_dir))
    assert out.returncode == 1 and "offsets 10..10" in out.stdout and f"byte {pos}" in out.stdout

    out = mesh("repair", str(data_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"cut offsets 10..10 (1 records) from {seg} bytes {pos}.." in out.stdout
    assert "Traceback" not in out.stderr

    out = mesh("verify", str(data_dir))
    assert out.returncode == 0, out.stdout
    assert "hole: data offsets 10..10" in out.stdout
    with Log.open(data_dir, config=CFG) as lg:
        st = lg.stats()
        assert st.corrupt_regions == 0 and st.missing_records == 1
        assert _offsets(lg, 0) == list(range(10))
        with pytest.raises(LogCorruptedRange) as ei:
            lg.read(10)
        assert (ei.value.offset, ei.value.next_offset) == (10, 11)
        assert "repair" in ei.value.reason
        assert [r.payload for r in lg.read(11, 100)] == [payload(i) for i in range(11, 30)]
        assert lg.append(b"more") == 30


def test_cut_a_chosen_range_and_at_the_end_never_reuses_offsets(data_dir: Path) -> None:
    _fill(data_dir, 30)
    out = mesh("repair", str(data_dir), "--cut", "5..7")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cut offsets 5..7 (3 records)" in out.stdout
    with Log.open(data_dir, config=CFG) as lg:
        assert _offsets(lg, 0) == list(range(5))
        with pytest.raises(LogCorruptedRange) as ei:
            lg.read(5)
        assert (ei.value.offset, ei.value.next_offset) == (5, 8)
        assert _offsets(lg, 8) == list(range(8, 30))
    out = mesh("repair", str(data_dir), "--cut", "27..29")
    assert out.returncode == 0, out.stdout + out.stderr
    with Log.open(data_dir, config=CFG) as lg:
        assert lg.next_offset == 30  # the cut tail's offsets are not handed out again
        with pytest.raises(LogCorruptedRange) as ei:
            lg.read(27)
        assert (ei.value.offset, ei.value.next_offset) == (27, 30)
        assert lg.append(b"next") == 30
    assert mesh("verify", str(data_dir)).returncode == 0


def test_deleted_segments_are_acknowledged_and_keep_the_read_contract(data_dir: Path) -> None:
    _fill(data_dir, 200)
    segs = sorted(data_dir.glob("*.log"))
    a, b = int(segs[1].name[:20]), int(segs[2].name[:20])
    segs[1].unlink()
    last = int(segs[-1].name[:20])
    segs[-1].unlink()
    out = mesh("verify", str(data_dir))
    assert out.returncode == 1
    assert f"gap: data offsets {a}..{b - 1}" in out.stdout and f"offsets {last}..199" in out.stdout
    out = mesh("repair", str(data_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"acknowledged offsets {a}..{b - 1}" in out.stdout
    assert f"acknowledged offsets {last}..199" in out.stdout
    assert mesh("verify", str(data_dir)).returncode == 0
    with Log.open(data_dir, config=CFG) as lg:
        assert lg.lost_ranges == []
        with pytest.raises(LogCorruptedRange) as ei:
            lg.read(a)
        assert (ei.value.offset, ei.value.next_offset) == (a, b)


def test_an_interrupted_repair_is_finished_by_running_it_again(data_dir: Path) -> None:
    _fill(data_dir, 30)
    seg = data_dir / fmt.segment_name(0)
    data = seg.read_bytes()
    pos = 12 * (36 + REC)
    # What a repair cutting 10..11 leaves when killed between its two steps: the tail is
    # already its own segment, the original is not cut back yet.
    (data_dir / fmt.segment_name(12)).write_bytes(data[pos:])
    with pytest.raises(LogCorrupted):
        Log.open(data_dir, config=CFG)
    out = mesh("repair", str(data_dir), "--cut", "10..11")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "finished an interrupted repair" in out.stdout
    with Log.open(data_dir, config=CFG) as lg:
        assert _offsets(lg, 0) == list(range(10))
        with pytest.raises(LogCorruptedRange) as ei:
            lg.read(10)
        assert (ei.value.offset, ei.value.next_offset) == (10, 12)
        assert [r.payload for r in lg.read(12, 100)] == [payload(i) for i in range(12, 30)]


def test_repair_errors_are_one_line(data_dir: Path) -> None:
    _fill(data_dir, 5)
    with Log.open(data_dir, config=CFG):  # a running writer holds the lock
        out = mesh("repair", str(data_dir))
        assert out.returncode == 1 and "locked" in out.stderr.lower(), out.stderr
        assert "Traceback" not in out.stderr
    for bad in (["--cut", "x..y"], ["--cut", "9..3"]):
        out = mesh("repair", str(data_dir), *bad)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1
    out = mesh("repair", str(data_dir))
    assert out.returncode == 0 and "nothing to repair" in out.stdout
