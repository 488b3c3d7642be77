"""`mesh log verify` progress: verify_log reports scanned bytes within a segment, and the CLI
line advances inside one stream (drawn only when stderr is a TTY)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

import mesh.log.verify as verify_mod
from mesh.cli import log_cmd
from mesh.cli._progress import segment_bytes
from mesh.log import LogDirectory, verify_log


def _stream(tmp_path: Path, name: str, n: int = 400) -> Path:
    lg = LogDirectory(tmp_path).open(name)
    for i in range(n):  # one batch per append: many batches to scan
        lg.append(bytes([i % 256]) * 500)
    lg.close()
    return tmp_path / "streams" / name


def test_verify_log_progress_adds_up_and_fires_within_a_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _stream(tmp_path, "s")
    monkeypatch.setattr(verify_mod, "PROGRESS_STEP", 10_000)
    calls: list[int] = []
    rep = verify_log(str(path), calls.append)
    assert rep.ok and rep.segments == 1
    assert len(calls) > 5  # many calls for one segment, not one per segment
    assert sum(calls) == rep.bytes == segment_bytes(str(path))
    assert verify_log(str(path)).records == rep.records  # the argument is optional


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_progress_advances_inside_one_stream_on_a_tty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stream(tmp_path, "only")
    monkeypatch.setattr(verify_mod, "PROGRESS_STEP", 10_000)
    err = _Tty()
    monkeypatch.setattr("sys.stderr", err)
    args = argparse.Namespace(dir=str(tmp_path), json=False)
    assert log_cmd.cmd_verify(args) == 0
    lines = [ln for ln in err.getvalue().split("\r") if ln.startswith("verify")]
    # The first draw comes after the first PROGRESS_STEP bytes of the only stream: a partial
    # percentage while 0 of 1 streams are done.
    first = lines[0]
    assert first.endswith("0/1\x1b[K") and "100%" not in first, lines
    assert any("100%  1/1" in ln for ln in lines), lines
    assert err.getvalue().endswith("\r\x1b[K")  # erased before the report
    assert "only: OK" in capsys.readouterr().out


def test_cli_verify_draws_nothing_off_a_tty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _stream(tmp_path, "s2", n=20)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert log_cmd.cmd_verify(argparse.Namespace(dir=str(tmp_path), json=True)) == 0
    assert err.getvalue() == ""
    assert '"ok": true' in capsys.readouterr().out
