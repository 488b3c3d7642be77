"""Smoke test of the benchmark driver's command line (no benchmark is run here: speed is
measured by the benchmarks, never by timed tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_run_all_help_lists_the_options() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for opt in ("--quick", "--peers", "--scaling", "--out"):
        assert opt in out.stdout


def test_run_all_rejects_an_unknown_option() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--no-such-flag"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unrecognized arguments" in out.stderr
