"""bench/bench_store.py (replicated streams vs raw pyzmq vs JetStream R3) runs end to end and
prints a well-formed table. Only a tiny N: the figures are the benchmark's, never a timed
test's; what is checked is the table's shape, that every row measured something, and that
no process or directory of a run outlives it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_store.py"
COLUMNS = ["system", "k / R", "events/s", "vs raw", "p50 µs", "p99 µs", "CPU s / 10k"]
NATS_SERVER = "/usr/sbin/nats-server"


def _run(*args: str, env: dict[str, str] | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def _table(out: str) -> dict[tuple[str, str], dict[str, str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert cells[0] == COLUMNS
    assert cells[1] == ["---"] * len(COLUMNS)
    return {(c[0], c[1]): dict(zip(COLUMNS, c, strict=True)) for c in cells[2:]}


def _nats_available() -> bool:
    try:
        import nats  # noqa: F401
    except ImportError:
        return False
    return os.access(NATS_SERVER, os.X_OK)


def _procs_mentioning(text: str) -> list[str]:
    """Command lines of live processes naming ``text`` (the run's data dir is in every
    child's arguments, the nats-servers' config paths included)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and pid != str(os.getpid()):
            found.append(cmd)
    return found


def test_bench_store_measures_every_system_and_cleans_up(tmp_path: Path) -> None:
    r = _run("--events", "2000", "--lat", "50", "--rounds", "1", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# 2,000 events of 100 B per throughput run"), r.stdout
    assert "load average at start" in r.stdout and "load average at end" in r.stdout
    rows = _table(r.stdout)
    want = [("raw pyzmq PUSH/PULL", "-"), ("zeromesh store", "k=1"), ("zeromesh store", "k=2"),
            ("zeromesh store, sync=write (opt-in)", "k=1")]
    if _nats_available():
        want.append(("NATS JetStream", "R3"))
        assert "# target throughput k=1 >= 3x JetStream R3:" in r.stdout
        assert "# target p50 k=1 < JetStream R3 p50:" in r.stdout
        assert "# opt-in sync=write (acked once written, as JetStream's PubAck)" in r.stdout
    else:
        assert "# NATS JetStream R3 skipped:" in r.stdout
    assert list(rows) == want
    assert rows[want[0]]["vs raw"] == "1.000"
    for row in rows.values():
        assert float(row["events/s"].replace(",", "")) > 0
        assert float(row["vs raw"]) > 0
        p50, p99 = (float(row[c].replace(",", "")) for c in ("p50 µs", "p99 µs"))
        assert 0 < p50 <= p99
        assert float(row["CPU s / 10k"]) >= 0
    # Every run's processes (stores, sink, the three nats-servers) and directories are gone.
    assert _procs_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_bench_store_skips_jetstream_with_a_line_when_the_server_is_missing(
        tmp_path: Path) -> None:
    r = _run("--events", "200", "--lat", "10", "--rounds", "1", "--systems", "raw,js3",
             "--dir", str(tmp_path), env={"NATS_SERVER": str(tmp_path / "no-nats-server")})
    assert r.returncode == 0, r.stderr
    assert f"# NATS JetStream R3 skipped: {tmp_path / 'no-nats-server'} not found" in r.stdout
    assert list(_table(r.stdout)) == [("raw pyzmq PUSH/PULL", "-")]
    assert "target" not in r.stdout


def test_bench_store_refuses_bad_options() -> None:
    r = _run("--events", "0", timeout=30)
    assert r.returncode == 2 and "--events must be >= 1" in r.stderr
    r = _run("--systems", "raw,kafka", timeout=30)
    assert r.returncode == 2 and "unknown system(s) kafka" in r.stderr


STAGES = Path(__file__).resolve().parent.parent / "bench" / "bench_store_stages.py"


def _stages(*args: str) -> tuple[list[str], float]:
    r = subprocess.run([sys.executable, str(STAGES), "--lat", "40", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    assert rows[0] == "| stage | p50 µs | p90 µs | mean µs |", r.stdout
    line = next(ln for ln in r.stdout.splitlines() if "store fsyncs per publish" in ln)
    return [ln.split("|")[1].strip() for ln in rows[2:]], float(line.rsplit(" ", 1)[1])


def test_bench_store_stages_profiles_the_ack_path_with_one_fsync_per_ack() -> None:
    names, fsyncs = _stages()
    # The ack leaves from the store thread: no stage through the store's reactor.
    assert names == ["publish -> data send", "-> store poll wakes", "-> replica append",
                     "-> end of round", "-> fsync done", "-> ack sent", "-> origin reactor",
                     "-> ack counted", "-> waiter notified", "-> publish returns"]
    assert 0.95 <= fsyncs <= 1.1, fsyncs  # one fsync per ack: no second one for the map
    names, fsyncs = _stages("--sync", "write")
    assert fsyncs < 0.5 and "-> fsync done" not in names
