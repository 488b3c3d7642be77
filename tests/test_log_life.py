"""The log over a long life: many streams, quiet streams, clock jumps, killed writers,
deleted segments and retention floors. Real files, real processes, real SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mesh.log.log as logmod
from mesh.log import FsyncPolicy, Log, LogConfig, Retention
from mesh.log import segment as segmod
from tests.util import REPO, python_child, wait_until

YEAR_NS = 365 * 86400 * 10**9


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _cpu_s() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 1. thousands of durable streams in one process --------------------------------------

@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """tmpfs when there is one (fsync nearly free: the test is about threads, fds and CPU)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="log-life-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def test_thousand_interval_logs_share_one_thread_bounded_fds_and_idle_cpu(
        fast_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = fast_dir
    if hasattr(logmod, "_WriteFds"):  # (the check against the old code runs without it)
        monkeypatch.setattr(logmod, "WRITE_FDS", logmod._WriteFds(64))
    read_cap = 16
    if hasattr(segmod, "ReadFds"):
        monkeypatch.setattr(segmod, "READ_FDS", segmod.ReadFds(read_cap))
    n = 1000
    threads0, fds0 = threading.active_count(), _fds()
    logs = []
    t0 = time.monotonic()
    try:
        for i in range(n):
            lg = Log.open(tmp_path / f"s{i}", config=LogConfig(fsync=FsyncPolicy.interval(10)))
            lg.append(b"x" * 100)
            logs.append(lg)
        created = time.monotonic() - t0
        # Every record is fsynced by the shared thread (the interval promise still holds).
        wait_until(lambda: all(lg.stats().durable_offset == 0 for lg in logs), 20,
                   what="every log fsynced")
        assert threading.active_count() - threads0 <= 1, "one background thread for all logs"
        held = _fds() - fds0
        # One lock descriptor per writer, plus the bounded write and read caches.
        assert held <= n + 64 + read_cap + 8, held
        for lg in logs[:200]:  # reads open descriptors on demand, bounded too
            assert lg.read(0)[0].payload == b"x" * 100
        bad: list[object] = []

        def read_all(part: list[Log]) -> None:  # threads share the bounded descriptor set
            for lg in part:
                if lg.read(0)[0].payload != b"x" * 100:
                    bad.append(lg)

        readers = [threading.Thread(target=read_all, args=(logs[k::4],)) for k in range(4)]
        for th in readers:
            th.start()
        for th in readers:
            th.join()
        assert not bad
        assert _fds() - fds0 <= n + 64 + read_cap + 8
        c0, w0 = _cpu_s(), time.monotonic()
        wait_until(lambda: time.monotonic() - w0 >= 1.0, 5, interval=0.2, what="1 s idle")
        idle = (_cpu_s() - c0) / (time.monotonic() - w0)
        assert idle < 0.05, f"idle CPU {idle:.1%} of a core"
        for lg in logs[-50:]:  # appends after an idle spell and after a closed fd still work
            assert lg.append(b"y") == 1
        assert logs[-1].read(1)[0].payload == b"y"
        assert created < 30
    finally:
        for lg in logs:
            lg.close()


# -- 2. age retention on a timer ------------------------------------------------------------

def test_age_retention_runs_on_a_quiet_stream(data_dir: Path) -> None:
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096,
                    retention=Retention(max_age_s=0.3))
    with Log.open(data_dir, config=cfg) as lg:
        for i in range(100):
            lg.append(b"old %d" % i)
        assert lg.first_offset == 0
        # No more appends: the background thread alone must age the records out.
        wait_until(lambda: lg.first_offset is None, 6, what="old records deleted by the timer")
        assert lg.next_offset == 100 and lg.append(b"new") == 100
        assert [r.payload for r in lg.iter()] == [b"new"]


# -- 3. clock jumps -------------------------------------------------------------------------

def test_a_future_stamp_does_not_freeze_later_timestamps_even_after_restart(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_800_000_000 * 10**9]
    monkeypatch.setattr(logmod, "_clock", lambda: now[0], raising=False)
    cfg = LogConfig(fsync=FsyncPolicy.never())
    with Log.open(data_dir, config=cfg) as lg:
        lg.append(b"a")
        lg.append(b"bogus", timestamp_ns=now[0] + YEAR_NS)
        now[0] += 10**9
        lg.append(b"b")
        assert lg.read(2)[0].timestamp_ns == now[0]
        now[0] += YEAR_NS  # the wall clock itself jumps a year ahead, then back
        lg.append(b"jumped")
        now[0] -= YEAR_NS
        now[0] += 10**9
        lg.append(b"c")
        assert lg.read(4)[0].timestamp_ns == now[0]
    now[0] += 10**9
    with Log.open(data_dir, config=cfg) as lg:
        lg.append(b"after restart")
        assert lg.read(5)[0].timestamp_ns == now[0]


def test_time_lookup_passes_over_a_bogus_future_record(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = 1_800_000_000 * 10**9
    now = [base]
    monkeypatch.setattr(logmod, "_clock", lambda: now[0], raising=False)
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096, index_interval_bytes=64)
    with Log.open(data_dir, config=cfg) as lg:
        for i in range(300):
            now[0] = base + i * 10**9
            if i == 20:
                lg.append(b"bogus", timestamp_ns=base + YEAR_NS)
            else:
                lg.append(b"r%d" % i)
        assert lg.offset_for_time(base + 250 * 10**9) == 250
        assert lg.offset_for_time(base + 21 * 10**9) == 21
        assert lg.offset_for_time(base + 100 * YEAR_NS) == 300
    with Log.open(data_dir, config=cfg, readonly=True) as lg:
        assert lg.offset_for_time(base + 250 * 10**9) == 250


def test_age_retention_is_not_pinned_by_a_future_stamp_across_restart(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time_ns()
    now = [real]
    monkeypatch.setattr(logmod, "_clock", lambda: now[0], raising=False)
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096,
                    retention=Retention(max_age_s=3600))
    with Log.open(data_dir, config=cfg) as lg:
        lg.append(b"bogus", timestamp_ns=real + YEAR_NS)
        for _ in range(60):
            lg.append(b"z" * 100)
        assert lg.stats().segments >= 2
    now[0] = real + 2 * 3600 * 10**9  # two hours later: everything sealed is past max_age
    with Log.open(data_dir, config=cfg) as lg:
        lg.enforce_retention()
        assert lg.first_offset is None or lg.first_offset > 0, "the bogus stamp pinned it"


# -- 4. honest durability after kill -9 ----------------------------------------------------

KILLED = """
import os, signal, sys
from mesh.log import Log, LogConfig, FsyncPolicy
lg = Log.open(sys.argv[1], config=LogConfig(fsync=FsyncPolicy.interval(60_000)))
for i in range(50):
    lg.append(b"rec %d" % i)
print(lg.stats().durable_offset, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_durable_offset_after_kill_is_backed_by_an_fsync_at_open(data_dir: Path) -> None:
    child = python_child(KILLED, str(data_dir), stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert out.split()[0] == b"None"  # nothing was fsynced before the kill
    cfg = LogConfig(fsync=FsyncPolicy.interval(60_000))
    with Log.open(data_dir, config=cfg) as lg:
        st = lg.stats()
        assert st.next_offset == 50
        # The claim covers the tail only because the open fsynced it.
        assert st.durable_offset == 49 and st.fsyncs == 1
        lg.wait_durable(49)
        assert lg.stats().fsyncs == 1
    with Log.open(data_dir, config=LogConfig(fsync=FsyncPolicy.never())) as lg:
        assert lg.stats().durable_offset is None  # never fsyncs: claims nothing


# -- 5. a deleted last segment --------------------------------------------------------------

def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", "log", "verify", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=30)


def test_deleted_last_segment_is_detected_at_open_and_by_verify(data_dir: Path) -> None:
    cfg = LogConfig(fsync=FsyncPolicy.always(), segment_bytes=4096)
    with Log.open(data_dir, config=cfg) as lg:
        for i in range(200):
            lg.append(b"r" * 60 + b"%d" % i)
    segs = sorted(data_dir.glob("*.log"))
    assert len(segs) >= 3
    last_base = int(segs[-1].name[:20])
    segs[-1].unlink()
    out = _verify(data_dir)
    assert out.returncode == 1, out.stdout
    assert f"lost: data offsets {last_base}..199" in out.stdout, out.stdout
    with Log.open(data_dir, config=cfg, readonly=True) as ro:
        assert ro.lost_ranges == [(last_base, 200)]
    with Log.open(data_dir, config=cfg) as lg:
        assert lg.lost_ranges == [(last_base, 200)]
        st = lg.stats()
        assert st.lost_tail_records == 200 - last_base and st.lost_ranges == ((last_base, 200),)
        assert lg.next_offset == last_base
    with Log.open(data_dir, config=cfg) as lg:  # still known after a restart
        assert lg.lost_ranges == [(last_base, 200)]
    assert _verify(data_dir).returncode == 1


def test_deleted_only_segment_is_detected(data_dir: Path) -> None:
    cfg = LogConfig(fsync=FsyncPolicy.always())
    with Log.open(data_dir, config=cfg) as lg:
        for i in range(10):
            lg.append(b"%d" % i)
    (data_dir / "00000000000000000000.log").unlink()
    with Log.open(data_dir, config=cfg) as lg:
        assert lg.lost_ranges == [(0, 10)]
        assert lg.stats().lost_tail_records == 10
    out = _verify(data_dir)
    assert out.returncode == 1 and "offsets 0..9" in out.stdout


def test_verify_names_middle_gap_and_bit_flip_with_offset_ranges(data_dir: Path) -> None:
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096)
    with Log.open(data_dir / "gap", config=cfg) as lg:
        for i in range(200):
            lg.append(b"g" * 60 + b"%d" % i)
    segs = sorted((data_dir / "gap").glob("*.log"))
    a, b = int(segs[1].name[:20]), int(segs[2].name[:20])
    segs[1].unlink()
    out = _verify(data_dir / "gap")
    assert out.returncode == 1 and f"gap: gap offsets {a}..{b - 1} in" in out.stdout, out.stdout
    with Log.open(data_dir / "flip", config=cfg) as lg:
        for _ in range(40):
            lg.append(b"f" * 60)
    seg = data_dir / "flip" / "00000000000000000000.log"
    pos = 10 * (36 + 60)
    data = bytearray(seg.read_bytes())
    data[pos + 40] ^= 0x10
    seg.write_bytes(bytes(data))
    out = _verify(data_dir / "flip")
    assert out.returncode == 1
    assert f"corrupt: flip offsets 10..10 in {seg} at byte {pos}" in out.stdout, out.stdout


# -- 6. retention floors ---------------------------------------------------------------------

def test_floor_holds_data_across_restart_and_expires(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.time_ns()]
    monkeypatch.setattr(logmod, "_clock", lambda: now[0], raising=False)
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096,
                    retention=Retention(max_records=300), floor_ttl_s=3600)
    with Log.open(data_dir, config=cfg) as lg:
        for _ in range(10):
            lg.append_many([b"z" * 100] * 20)
        lg.set_retention_floor("peer/sub", 50)
    with Log.open(data_dir, config=cfg) as lg:  # a restarted publisher
        assert lg.retention_floors == {"peer/sub": 50}
        for _ in range(40):
            lg.append_many([b"z" * 100] * 20)
        assert lg.first_offset is not None and lg.first_offset <= 50
        assert lg.read(50)[0].offset == 50
        now[0] += 2 * 3600 * 10**9  # the subscriber never came back
        lg.append_many([b"z" * 100] * 40)
        lg.enforce_retention()
        assert lg.retention_floors == {}
        assert lg.first_offset is not None and lg.first_offset > 50
        assert lg.next_offset - lg.first_offset <= 300 + 60


def test_floor_keeps_at_most_floor_max_bytes(data_dir: Path) -> None:
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096,
                    retention=Retention(max_bytes=8192), floor_max_bytes=16384)
    with Log.open(data_dir, config=cfg) as lg:
        lg.set_retention_floor("dead/sub", 0)
        for _ in range(60):
            lg.append_many([b"z" * 100] * 10)
        assert lg.stats().bytes <= 8192 + 16384 + 2 * 4096
        assert lg.first_offset is not None and lg.first_offset > 0


def test_publisher_registers_acked_position_as_floor_across_restart(tmp_path: Path) -> None:
    from mesh.node import Node
    from patterns.pubsub.publisher import Publisher
    from patterns.pubsub.subscriber import Start, Subscriber
    from tests.util import unique

    mesh = unique("fl")
    stream = unique("fl.s")
    cfg = LogConfig(fsync=FsyncPolicy.never(), segment_bytes=4096,
                    retention=Retention(max_records=100))
    pub_dir = tmp_path / "pub"
    with Node(data_dir=pub_dir, name="pub", mesh=mesh, mdns=False,
              interface="127.0.0.1") as pn:
        ep = next(e for e in pn.info().endpoints["control"] if e.startswith("tcp://"))
        with Node(data_dir=tmp_path / "sub", name="sub", mesh=mesh, mdns=False,
                  interface="127.0.0.1", static_peers=(ep,)) as sn:
            wait_until(lambda: pn.peers.get(sn.id) is not None, 10, what="joined")
            pub = Publisher(pn, stream, log_config=cfg, heartbeat_s=0.1)
            sub = Subscriber(sn, stream, durable="slow", start=Start.beginning())
            try:
                pub.publish_many(range(30), type="n")
                got = [sub.recv(timeout=10) for _ in range(10)]
                assert [e.data for e in got if e is not None] == list(range(10))
                sub.commit()
                wait_until(lambda: any(v >= 10 for v in pub.stats().positions.values()), 10,
                           what="ack reached the publisher")
                floor = 10  # the acked position: everything from it must outlive retention
            finally:
                sub.close()
                pub.close()
            with Publisher(pn, stream, log_config=cfg, heartbeat_s=0.1) as pub2:
                for _ in range(20):
                    pub2.publish_many(range(30), type="more")
                lg = pub2._st.log
                assert lg.first_offset is not None and lg.first_offset <= floor
                assert lg.read(floor, 1)[0].offset == floor
