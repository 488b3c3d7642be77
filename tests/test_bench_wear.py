"""bench/wear.py (the SD-card wear of each fsync policy) runs and prints a well-formed table.
Only a tiny N: the figures are the benchmark's, never a timed test's; what is checked is the
table's shape and the counts that do not depend on the machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
COLUMNS = ["policy", "events", "write_bytes", "log_bytes", "fsyncs", "events/fsync", "WA",
           "WA/log", "device_bytes"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / "wear.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_wear_prints_one_row_per_policy(tmp_path: Path) -> None:
    n = 20
    r = _run("--events", str(n), "--dir", str(tmp_path), "--policy", "always", "--policy",
             "interval(10ms)", "--policy", "never")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"# {n} events of 100 B per policy"), lines[0]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[1:]]
    assert cells[0] == COLUMNS
    assert all(c == "---" for c in cells[1]) and len(cells[1]) == len(COLUMNS)
    rows = {c[0]: dict(zip(COLUMNS, c, strict=True)) for c in cells[2:]}
    assert list(rows) == ["always", "interval(10ms)", "never"]
    for row in rows.values():
        assert int(row["events"]) == n
        assert int(row["log_bytes"].replace(",", "")) > n * 100  # payloads, envelopes, framing
        assert int(row["write_bytes"].replace(",", "")) >= 0
        float(row["WA"])
        float(row["WA/log"])
        assert row["device_bytes"] == "-" or int(row["device_bytes"].replace(",", "")) >= 0
    # the counts that do not depend on the disk: always fsyncs at least once per event,
    # never does not fsync at all
    assert int(rows["always"]["fsyncs"]) >= n
    assert int(rows["never"]["fsyncs"]) == 0 and rows["never"]["events/fsync"] == "-"
    assert list(tmp_path.iterdir()) == []  # the children's data dirs are removed


def test_wear_refuses_bad_options() -> None:
    r = _run("--events", "0")
    assert r.returncode == 2 and "--events must be >= 1" in r.stderr
    r = _run("--policy", "sometimes")
    assert r.returncode == 2 and "invalid choice" in r.stderr
