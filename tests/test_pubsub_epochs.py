"""Seqs never silently go back: writer epochs against a lost tail, a wiped stream and a
restored backup, with real publisher processes killed with SIGKILL and real files cut.

Each test failed before epochs: the publisher handed out seqs the subscribers had passed, and
they dropped the new events as duplicates, forever and without a word."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.errors import SendFailed
from mesh.log import format as fmt
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, StreamGap, StreamReset, Subscriber
from tests.util import REPO, ctrl, make_node, poll_until, unique

CHILD = os.path.join(REPO, "tests", "pubsub_child.py")





def start_pub(procs: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, CHILD, "pub", *args], env=env,
                         stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    procs.append(p)
    assert p.stdout is not None
    while (line := p.stdout.readline()) != b"DONE\n":
        assert line.startswith(b"ACK"), line
    return p


def drain(sub: Subscriber, n: int, timeout: float = 20.0) -> list[object]:
    """The next n items: (seq, data) per event, or the StreamGap raised in order."""
    out: list[object] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            ev = sub.recv(timeout=0.5)
        except StreamGap as gap:
            out.append(gap)
            continue
        if ev is not None:
            out.append((ev.seq, ev.data))
    return out


def cut_log_to(stream_dir: Path, keep: int) -> None:
    """A power cut: the segment keeps only its first `keep` records (a batch boundary)."""
    seg = stream_dir / max(f for f in os.listdir(stream_dir) if f.endswith(".log"))
    buf = seg.read_bytes()
    p = 0
    while p < len(buf):
        hdr = fmt.read_header(buf, p)
        if hdr.base_offset >= keep:
            break
        p += hdr.length
    os.truncate(seg, p)
    for f in os.listdir(stream_dir):
        if f.endswith(".idx"):
            os.unlink(stream_dir / f)  # the index may point past the cut; it is rebuilt


def test_lost_unsynced_tail_is_a_reset_and_new_events_are_delivered(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    mesh = unique("ep")
    pdir = tmp_path / "pub"
    with make_node(tmp_path / "live", mesh) as nd, Subscriber(
            nd, "lt.s", start=Start.beginning(), on_gap="error") as live:
        p1 = start_pub(procs, str(pdir), mesh, ctrl(nd), "lt.s", "0", "200")
        assert drain(live, 200) == [(i, i) for i in range(200)]
        # A durable subscriber also saw everything and committed, then went away.
        with Subscriber(nd, "lt.s", durable="agg", on_gap="error") as agg:
            assert drain(agg, 200) == [(i, i) for i in range(200)]
            agg.commit()
        p1.send_signal(signal.SIGKILL)
        p1.wait(timeout=10)
        cut_log_to(pdir / "streams" / "lt.s", 150)   # events 150..199 were never fsynced
        p2 = start_pub(procs, str(pdir), mesh, ctrl(nd), "lt.s", "1000", "30")
        got = drain(live, 31)
        assert isinstance(got[0], StreamReset), got[:3]
        reset = got[0]
        assert (reset.start, reset.end, reset.resume_at, reset.delivered) == (150, 200, 150, 50)
        assert got[1:] == [(150 + i, 1000 + i) for i in range(30)]
        assert live.stats().resets == 1
        # The durable subscriber restarts from its cursor (150..199 committed): it is told,
        # and gets the new events under those seqs; both now agree on what seq N is.
        with Subscriber(nd, "lt.s", durable="agg", on_gap="error") as agg:
            got2 = drain(agg, 31)
            assert isinstance(got2[0], StreamReset) and got2[0].resume_at == 150, got2[:3]
            assert got2[1:] == got[1:]
            agg.commit()
        # And once more: the cursor is now under the new epoch; nothing is repeated.
        with Subscriber(nd, "lt.s", durable="agg", on_gap="error") as agg:
            # The subscriber works while it is iterated: receive until its first replay
            # answer came (nothing new may come: the cursor is at the head, same epoch).
            ok = poll_until(lambda: agg.recv(timeout=0.1) is not None
                            or agg.stats().replay_chunks >= 1, timeout=10)
            assert ok and agg.stats().replay_chunks >= 1 and agg.stats().resets == 0
            assert agg.recv(timeout=0.5) is None
        assert p2.stdin is not None
        p2.stdin.close()
        assert p2.wait(timeout=10) == 0


def test_a_subscriber_behind_the_lost_tail_is_told_what_it_will_never_see(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    mesh = unique("ep")
    pdir = tmp_path / "pub"
    with make_node(tmp_path / "agg", mesh) as nd:
        with Subscriber(nd, "lb.s", durable="agg", on_gap="error") as agg:
            p1 = start_pub(procs, str(pdir), mesh, ctrl(nd), "lb.s", "0", "100")
            assert drain(agg, 100) == [(i, i) for i in range(100)]
            agg.commit()
        p1.send_signal(signal.SIGKILL)
        p1.wait(timeout=10)
        cut_log_to(pdir / "streams" / "lb.s", 60)
        p2 = start_pub(procs, str(pdir), mesh, ctrl(nd), "lb.s", "500", "10")
        with Subscriber(nd, "lb.s", durable="agg", on_gap="error") as agg:
            got = drain(agg, 11)
        assert isinstance(got[0], StreamReset) and got[0].resume_at == 60
        assert got[1:] == [(60 + i, 500 + i) for i in range(10)]
        assert p2.stdin is not None
        p2.stdin.close()
        p2.wait(timeout=10)


def test_wiped_stream_directory_and_restored_backup_start_over_visibly(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    mesh = unique("ep")
    pdir = tmp_path / "pub"
    sdir = pdir / "streams" / "wp.s"

    def run(start: int, n: int) -> None:
        p = start_pub(procs, str(pdir), mesh, ctrl(nd), "wp.s", str(start), str(n))
        want.append(p)

    with make_node(tmp_path / "sub", mesh) as nd, Subscriber(
            nd, "wp.s", start=Start.beginning(), on_gap="error") as sub:
        want: list[subprocess.Popen[bytes]] = []
        run(0, 40)
        assert drain(sub, 40) == [(i, i) for i in range(40)]
        want[-1].kill()
        want[-1].wait(timeout=10)
        backup = tmp_path / "backup"
        shutil.copytree(sdir, backup)
        run(40, 20)
        assert drain(sub, 20) == [(i, i) for i in range(40, 60)]
        want[-1].kill()
        want[-1].wait(timeout=10)
        shutil.rmtree(sdir)                          # wiped; node.id stays
        run(2000, 5)
        got = drain(sub, 6)
        assert isinstance(got[0], StreamReset) and got[0].resume_at == 0, got[:2]
        assert got[1:] == [(i, 2000 + i) for i in range(5)]
        want[-1].kill()
        want[-1].wait(timeout=10)
        shutil.rmtree(sdir)
        shutil.copytree(backup, sdir)                # restored from the backup taken at 40
        run(3000, 3)
        got = drain(sub, 1 + 40 + 3)
        # The backup's epochs are unknown to what we last saw (the wiped log's): the whole
        # restored log is read again, then the new events.
        assert isinstance(got[0], StreamReset) and got[0].resume_at == 0, got[:2]
        assert got[1:] == [(i, i) for i in range(40)] + [(40 + i, 3000 + i) for i in range(3)]


def test_damaged_record_and_oversize_event_are_typed_gaps_not_stalls(tmp_path: Path) -> None:
    mesh = unique("ep")
    sdir = tmp_path / "pub" / "streams" / "dm.s"
    with make_node(tmp_path / "pub", mesh) as pnd, Publisher(pnd, "dm.s") as pub:
        for i in range(30):
            pub.publish(i)
    seg = sdir / next(f for f in os.listdir(sdir) if f.endswith(".log"))
    buf = bytearray(seg.read_bytes())
    p = 0
    while True:                                      # flip a byte inside record 10's batch
        hdr = fmt.read_header(bytes(buf), p)
        if hdr.base_offset == 10:
            buf[p + hdr.length - 3] ^= 0xFF
            break
        p += hdr.length
    seg.write_bytes(bytes(buf))
    with make_node(tmp_path / "sub", mesh) as nd, Subscriber(
            nd, "dm.s", start=Start.beginning(), on_gap="error", max_event_size=4096) as sub, \
            make_node(tmp_path / "pub", mesh, (ctrl(nd),)) as pnd, \
            Publisher(pnd, "dm.s", heartbeat_s=0.1) as pub:
        pub.publish("x" * 10_000)                    # seq 30: over the subscriber's limit
        pub.publish("after")                         # seq 31
        got = drain(sub, 10 + 1 + 19 + 1 + 1)
        assert pub.stats().replay_skipped >= 1
    assert got[:10] == [(i, i) for i in range(10)]
    gap = got[10]
    assert isinstance(gap, StreamGap) and gap.reason == "damaged" and gap.start == 10, gap
    assert got[11:30] == [(i, i) for i in range(11, 30)]
    big = got[30]
    assert isinstance(big, StreamGap) and big.reason == "oversize", big
    assert (big.start, big.end) == (30, 31)
    assert got[31] == (31, "after")


def test_publish_after_a_failed_send_keeps_seq_equal_to_log_offset(tmp_path: Path) -> None:
    with make_node(tmp_path / "pub", unique("ep")) as nd, Publisher(nd, "sf.s") as pub:
        pub.publish_many(list(range(5)))
        pub._hub.sock.close(linger=0)                # the data socket dies under it
        with pytest.raises(SendFailed) as err:
            pub.publish_many(list(range(5, 8)))
        assert err.value.durable and err.value.seqs == range(5, 8)
        assert "durable" in str(err.value) and "replayed" in str(err.value)
        assert pub.head == pub._log.next_offset == 8
        with pytest.raises(SendFailed):
            pub.publish(8)
        assert pub.head == pub._log.next_offset == 9
