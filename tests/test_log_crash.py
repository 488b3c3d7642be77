"""Tests that really break the log: SIGKILL, torn writes, truncation, bit flips, missing
segments and a full disk. No acknowledged record may be lost or returned damaged."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.errors import LogCorruptedRange
from mesh.log import FsyncPolicy, Log, LogConfig
from tests.log_child import payload_for
from tests.util import REPO, python_child

CHILD = os.path.join(REPO, "tests", "log_child.py")
CFG = LogConfig(fsync=FsyncPolicy.always(), segment_bytes=16384, index_interval_bytes=512)


def _check_all(path: Path, acked: int) -> Log:
    lg = Log.open(path, config=CFG)
    recs = list(lg.iter(0))
    assert len(recs) >= acked + 1, f"acknowledged offset {acked} lost ({len(recs)} records)"
    for i, r in enumerate(recs):
        assert r.offset == i and r.payload == payload_for(i)
    return lg


def _run_child(path: Path, mode: str, env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
    full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, CHILD, str(path), mode], stdout=subprocess.PIPE,
                            env=full)


@pytest.mark.parametrize("mode", ["one", "many"])
def test_sigkill_at_random_moments_loses_no_acknowledged_record(data_dir: Path,
                                                                 mode: str) -> None:
    rnd = random.Random(1234)
    acked = -1
    rounds = 50 if mode == "one" else 25
    for _ in range(rounds):
        child = _run_child(data_dir, mode)
        assert child.stdout is not None
        want = rnd.randint(1, 40)
        for _ in range(want):  # let it get a random way into its appends, then kill
            line = child.stdout.readline()
            if not line:
                break
            acked = int(line)
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=10)
        for line in rest.split():
            acked = int(line)  # acknowledged before the kill landed
        _check_all(data_dir, acked).close()
    assert acked > rounds


@pytest.mark.parametrize("mode", ["one", "many"])
def test_torn_write_is_truncated_and_reported(data_dir: Path, mode: str) -> None:
    child = _run_child(data_dir, mode, {"LOG_CHILD_TORN_AT": "30"})
    out, _ = child.communicate(timeout=20)
    assert child.returncode == -signal.SIGKILL
    acked = int(out.split()[-1])
    assert acked < 30
    with _check_all(data_dir, acked) as lg:
        st = lg.stats()
        assert st.truncated_bytes_on_recovery > 0
        assert lg.next_offset == acked + 1
        assert lg.append(payload_for(lg.next_offset)) == acked + 1  # carries on writing
    with Log.open(data_dir) as lg:
        assert lg.stats().truncated_bytes_on_recovery == 0


def _fill(path: Path, n: int, cfg: LogConfig = CFG) -> None:
    with Log.open(path, config=cfg) as lg:
        for o in range(n):
            lg.append(payload_for(o))


def test_truncating_the_tail_at_every_byte_keeps_the_records_before(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _fill(src, 5)
    seg = src / "00000000000000000000.log"
    data = seg.read_bytes()
    with Log.open(src, readonly=True) as lg:
        ends = []
        _, pos = 0, 0
        for r in lg.read(0, 10):
            pos += 36 + len(r.payload)
            ends.append(pos)
    for cut in range(ends[2], len(data)):
        seg.write_bytes(data[:cut])
        (src / "00000000000000000000.index").unlink()
        with Log.open(src, config=CFG) as lg:
            kept = sum(1 for e in ends if e <= cut)
            assert lg.next_offset == kept
            assert [r.payload for r in lg.iter()] == [payload_for(o) for o in range(kept)]
            assert lg.stats().truncated_bytes_on_recovery == cut - ends[kept - 1]


def _flip(path: Path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        b = f.read(1)
        f.seek(position)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("where", ["header", "payload"])
def test_bit_flip_in_the_middle_raises_with_location_and_keeps_later_records(
        data_dir: Path, where: str) -> None:
    _fill(data_dir, 40)
    seg = data_dir / "00000000000000000000.log"
    with Log.open(data_dir, readonly=True) as lg:
        pos = sum(36 + len(r.payload) for r in lg.read(0, 10))  # start of offset 10
    _flip(seg, pos + (14 if where == "header" else 40))
    with Log.open(data_dir, config=CFG) as lg:
        recs = lg.read(0, 100)
        assert [r.offset for r in recs] == list(range(10))  # good records before the damage
        with pytest.raises(LogCorruptedRange) as ei:
            lg.read(10, 100)
        err = ei.value
        assert (err.path, err.position, err.offset, err.next_offset) == (str(seg), pos, 10, 11)
        later = lg.read(11, 100)
        assert [r.payload for r in later] == [payload_for(o) for o in range(11, 40)]
        assert lg.append(b"more") == 40  # the tail was not truncated
        assert lg.stats().corrupt_regions == 1
    skip = LogConfig(fsync=FsyncPolicy.always(), corruption="skip")
    with Log.open(data_dir, config=skip) as lg:
        offs = [r.offset for r in lg.iter()]
        assert offs == [o for o in range(41) if o != 10]
        assert lg.stats().corrupt_records == 1
    out = subprocess.run([sys.executable, "-m", "mesh", "log", "verify", str(data_dir)],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 1 and f"at byte {pos}" in out.stdout


def test_a_segment_deleted_by_hand_is_reported_and_the_rest_stays_readable(
        data_dir: Path) -> None:
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096)
    _fill(data_dir, 120, cfg)
    segs = sorted(data_dir.glob("*.log"))
    assert len(segs) >= 4
    victim_base = int(segs[1].name[:20])
    next_base = int(segs[2].name[:20])
    segs[1].unlink()
    with Log.open(data_dir, config=cfg) as lg:
        st = lg.stats()
        assert st.missing_records == next_base - victim_base
        assert len(lg.read(0, 1000)) == victim_base  # stops before the hole
        with pytest.raises(LogCorruptedRange) as ei:
            lg.read(victim_base)
        assert ei.value.next_offset == next_base and "missing" in ei.value.reason
        assert lg.read(next_base, 1)[0].payload == payload_for(next_base)
    out = subprocess.run([sys.executable, "-m", "mesh", "log", "verify", str(data_dir)],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 1 and "gap" in out.stdout


FULL_CHILD = """
import os, resource, signal, sys
from mesh.errors import LogFull
from mesh.log import Log, LogConfig, FsyncPolicy
from tests.log_child import payload_for
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
lg = Log.open(sys.argv[1], config=LogConfig(fsync=FsyncPolicy.always()))
try:
    while True:
        lg.append(payload_for(lg.next_offset))
except LogFull as exc:
    print("full", lg.next_offset - 1, exc.errno, flush=True)
try:
    lg.append_many([payload_for(o) for o in range(lg.next_offset, lg.next_offset + 50)])
except LogFull:
    print("full-many", lg.next_offset - 1, flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
for _ in range(5):
    lg.append(payload_for(lg.next_offset))
print("ok", lg.next_offset - 1, flush=True)
lg.close()
"""


def test_full_disk_raises_log_full_leaves_nothing_partial_and_recovers(data_dir: Path) -> None:
    child = python_child(FULL_CHILD, str(data_dir), stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=30)
    lines = out.decode().split("\n")
    assert lines[0].startswith("full ") and lines[1].startswith("full-many"), out
    full_at = int(lines[0].split()[1])
    assert int(lines[1].split()[1]) == full_at  # the failed batch left nothing behind
    last = int(lines[2].split()[1])
    assert last == full_at + 5
    with Log.open(data_dir, config=CFG) as lg:
        assert lg.stats().truncated_bytes_on_recovery == 0
        assert [r.payload for r in lg.iter()] == [payload_for(o) for o in range(last + 1)]
