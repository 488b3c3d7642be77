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


def test_zenoh_rows_say_why_they_are_skipped_without_the_binding() -> None:
    # The Zenoh rows are optional (the bench extra): without eclipse-zenoh the harness must
    # name what is missing and how to get it, not fail with an ImportError deep in a run.
    code = ("import sys; sys.modules['zenoh'] = None; sys.path.insert(0, sys.argv[1]); "
            "import zenoh_peer; print(zenoh_peer.available())")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "eclipse-zenoh is not installed" in out.stdout
    assert "zeromesh[bench]" in out.stdout


def test_run_all_help_names_the_zenoh_rows() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Zenoh" in out.stdout
