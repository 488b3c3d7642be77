"""`mesh pub TOPIC - --lines` and `mesh push QUEUE - --lines` send each stdin line as it
arrives (like `mosquitto_pub -l`), not at end of input; bad numbers are usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from tests.test_cli_observe import LOOP, Bg, _env, ce_text, mesh
from tests.util import unique, wait_until


class Lines:
    """Collects a process's stdout lines as they come (a reader thread)."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
        self.got: list[str] = []
        assert p.stdout is not None
        out = p.stdout
        self.t = threading.Thread(target=lambda: self.got.extend(iter(out.readline, "")) or None,
                                  daemon=True)
        self.t.start()


def _feeder(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mesh", *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def test_pub_lines_from_stdin_go_out_one_by_one(tmp_path: Path) -> None:
    topic, m = unique("lines.t"), unique("m")
    sub = Bg("sub", topic, "--count", "3", "--timeout", "40", "--json", "--mesh", m, *LOOP,
             tmp=tmp_path)
    feeder = None
    try:
        ep = sub.endpoint()
        seen = Lines(sub.p)
        feeder = _feeder(["pub", topic, "-", "--lines", "--peer", ep, "--mesh", m, *LOOP,
                          "--wait", "10", "--linger", "5"])
        assert feeder.stdin is not None
        for i, word in enumerate(["one", "two", "three"]):
            feeder.stdin.write(word + "\n")
            feeder.stdin.flush()
            # each line is delivered while stdin is still open (before: all came at EOF)
            wait_until(lambda i=i: len(seen.got) > i, 20, what=f"line {i + 1} delivered")
        feeder.stdin.close()
        assert feeder.wait(20) == 0, feeder.stderr.read() if feeder.stderr else ""
        assert [ce_text(json.loads(x)) for x in seen.got] == ["one", "two", "three"]
        assert sub.p.wait(20) == 0
    finally:
        if feeder is not None and feeder.poll() is None:
            feeder.kill()
        sub.stop()


def test_push_lines_from_stdin_are_worked_while_stdin_is_open(tmp_path: Path) -> None:
    queue, m = unique("q"), unique("m")
    work = Bg("work", queue, "--count", "2", "--timeout", "40", "--json", "--mesh", m, *LOOP,
              tmp=tmp_path)
    feeder = None
    try:
        ep = work.endpoint()
        seen = Lines(work.p)
        feeder = _feeder(["push", queue, "-", "--lines", "--peer", ep, "--mesh", m, *LOOP,
                          "--wait", "20"])
        assert feeder.stdin is not None
        feeder.stdin.write("first\n")
        feeder.stdin.flush()
        wait_until(lambda: len(seen.got) >= 1, 20, what="first task worked")
        feeder.stdin.write("second\n")
        feeder.stdin.close()
        assert feeder.wait(30) == 0, feeder.stderr.read() if feeder.stderr else ""
        assert [json.loads(x)["data"] for x in seen.got] == ["first", "second"]
    finally:
        if feeder is not None and feeder.poll() is None:
            feeder.kill()
        work.stop()


def test_negative_waits_and_timeouts_are_usage_errors() -> None:
    for argv in (["pub", "t", "x", "--wait", "-1"], ["pub", "t", "x", "--linger", "nan"],
                 ["push", "q", "x", "--wait", "-1"], ["sub", "t", "--timeout", "-5"],
                 ["work", "q", "--timeout", "0"], ["call", "s", "x", "--timeout", "inf"]):
        r = mesh(*argv)
        assert r.returncode == 2 and "seconds" in r.stderr and "Traceback" not in r.stderr, (
            argv, r.stderr)


def test_one_shot_pub_that_nobody_can_hear_does_not_wait_or_linger(tmp_path: Path) -> None:
    # No mDNS and no --peer: no subscriber can ever connect, so neither --wait (30 s here)
    # nor --linger (30 s) is spent; the old code sat out both (the 20 s timeout fails it).
    out = mesh("pub", unique("t"), "hello", "--no-mdns", "--wait", "30", "--linger", "30",
               "--json", "--data-dir", str(tmp_path / "d"), timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["seqs"] == [0]
    assert "no subscriber can be found (no mDNS, no --peer)" in out.stderr
