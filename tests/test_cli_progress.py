"""The stderr progress / status lines: drawn on a TTY only, erased before real output."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from mesh.cli._progress import Progress, StatusLine
from mesh.log import LogDirectory
from tests.util import REPO


def test_progress_draws_and_erases_when_forced() -> None:
    buf = io.StringIO()
    with Progress("verify", 2 << 20, items=2, stream=buf, force=True) as p:
        p.advance(1 << 20, item=True)
        p.advance(1 << 20, item=True)
    out = buf.getvalue()
    assert "\rverify  2.0/2.0 MiB  100%  2/2" in out
    assert out.endswith("\r\x1b[K")


def test_status_line_is_silent_off_a_tty() -> None:
    buf = io.StringIO()  # isatty() is False
    s = StatusLine(stream=buf)
    assert not s.due()
    s.show("catching up")
    s.clear()
    assert buf.getvalue() == ""


def test_log_verify_prints_no_progress_into_a_pipe(tmp_path: Path) -> None:
    lg = LogDirectory(tmp_path).open("s")
    lg.append_many([b"x" * 100] * 50)
    lg.close()
    r = subprocess.run([sys.executable, "-m", "mesh", "log", "verify", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "s: OK" in r.stdout and "\r" not in r.stderr + r.stdout
