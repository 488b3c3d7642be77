"""``mesh log info|tail|verify`` run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mesh.log import FsyncPolicy, LogConfig, LogDirectory
from tests.util import REPO


def mesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", "log", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=30)


def _make(data_dir: Path) -> None:
    d = LogDirectory(data_dir)
    cfg = LogConfig(fsync=FsyncPolicy.never())
    with d.open("orders", cfg) as lg:
        for i in range(20):
            lg.append(b"order %d" % i, timestamp_ns=(1_700_000_000 + i) * 10**9)
        lg.append(b"\x00\xffbinary", timestamp_ns=1_700_000_100 * 10**9)
    with d.open("empty", cfg):
        pass


def test_info_and_verify_ok(data_dir: Path) -> None:
    _make(data_dir)
    r = mesh("info", str(data_dir), "--json")
    assert r.returncode == 0, r.stderr
    info = {s["stream"]: s for s in json.loads(r.stdout)}
    assert info["orders"]["records"] == 21 and info["orders"]["last_offset"] == 20
    assert info["empty"]["first_offset"] is None
    r = mesh("info", str(data_dir))
    assert "orders: offsets 0..20, 21 records" in r.stdout
    r = mesh("verify", str(data_dir))
    assert r.returncode == 0 and "orders: OK" in r.stdout


def test_tail_from_since_and_binary_payloads(data_dir: Path) -> None:
    _make(data_dir)
    r = mesh("tail", str(data_dir), "orders", "--limit", "2", "--json")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["offset"] for x in lines] == [19, 20]
    assert lines[0]["text"] == "order 19" and lines[1]["hex"] == "00ff62696e617279"
    r = mesh("tail", str(data_dir), "orders", "--from", "3", "--limit", "2")
    assert [x.split("\t")[0] for x in r.stdout.splitlines()] == ["3", "4"]
    r = mesh("tail", str(data_dir), "orders", "--since", "2023-11-14T22:13:35")
    assert r.stdout.splitlines()[0].startswith("15\t")
    r = mesh("tail", str(data_dir / "streams" / "orders"), "--from", "20")
    assert "binary" not in r.stdout and "00ff" in r.stdout


def test_verify_reports_corruption_with_location_and_exit_1(data_dir: Path) -> None:
    _make(data_dir)
    seg = data_dir / "streams" / "orders" / "00000000000000000000.log"
    raw = bytearray(seg.read_bytes())
    raw[100] ^= 0xFF
    seg.write_bytes(bytes(raw))
    r = mesh("verify", str(data_dir), "--json")
    assert r.returncode == 1
    orders = next(s for s in json.loads(r.stdout) if s["stream"] == "orders")
    assert orders["problems"][0]["kind"] == "corrupt"
    assert orders["problems"][0]["path"] == str(seg)


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    r = mesh("info", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = mesh("tail", str(tmp_path), "x")
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_info_shows_the_writer_epochs(tmp_path: Path) -> None:
    from mesh.log import LogDirectory

    for _ in range(2):                     # two writer incarnations: two epochs
        with LogDirectory(tmp_path).open("ep.s") as lg:
            lg.append(b"x")
    r = mesh("info", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    row = next(x for x in json.loads(r.stdout) if x["stream"] == "ep.s")
    assert [s for _e, s in row["epochs"]] == [0, 1] and all(e for e, _s in row["epochs"])
    r = mesh("info", str(tmp_path))
    assert f"epoch {row['epochs'][-1][0]} from offset 1 (2 epoch(s))" in r.stdout


def test_tail_json_events_are_cloudevents_data_and_since_takes_an_age(data_dir: Path) -> None:
    from mesh.envelope import Event, encode

    d = LogDirectory(data_dir)
    with d.open("ev", LogConfig(fsync=FsyncPolicy.never())) as lg:
        lg.append(encode(Event(type="t", source="sensor-1", stream="ev", data={"c": 21.5})))
    r = mesh("tail", str(data_dir), "ev", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    # before: "event" held a Python repr in a string
    assert row["event"]["data"] == {"c": 21.5} and row["event"]["source"] == "sensor-1"
    assert row["event"]["specversion"] == "1.0"
    r = mesh("tail", str(data_dir), "ev", "--since", "10m")  # the same forms as `mesh sub`
    assert r.returncode == 0 and r.stdout.startswith("0\t"), r.stderr
    for bad in (["--from", "-5"], ["--limit", "0"]):
        r = mesh("tail", str(data_dir), "ev", *bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r.stderr)
