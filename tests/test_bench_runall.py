"""Smoke test of the benchmark driver's command line (no benchmark is run here: speed is
measured by the benchmarks, never by timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.util import poll_until

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


# --- the targets table: computed from a run's results (pure code, fake results) ---------------

def _runall() -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import run_all
    return run_all


def _fake_results(sub_us: float = 2.42, zm1_eps: float = 401_216.0,
                  b200: int = 3088) -> dict[str, Any]:
    """A run's results as run_all writes them, with figures like BENCHMARKS.md's."""
    ra = _runall()
    rows = []
    for tr, ceil, figs in (("tcp", 1_259_691.0, (276_622.0, 105_585.0, 238_268.0)),
                           ("ipc", 1_425_383.0, (176_449.0, 102_046.0, 314_153.0))):
        rows.append(ra.row("pubsub", ra.CEILING, tr, 100, "plain", ceil, "msg/s", None,
                           ceiling=ceil))
        for label, thr in zip(("best-effort publish()", "durable publish()",
                               "durable publish_many(100)"), figs, strict=True):
            rows.append(ra.row("pubsub", f"zeromesh {label}", tr, 100, "plain", thr, "msg/s",
                               250_000.0, ceiling=ceil))
    rows.append(ra.row("pubsub", "zeromesh best-effort publish()", "tcp", 1024, "plain",
                       211_110.0, "msg/s", 238_417.0, ceiling=643_820.0))
    for size, z in ((100, 1_229_328.0), (1024, 666_938.0)):
        rows.append(ra.row("pubsub", "Zenoh put/subscribe (peer, BLOCK)", "tcp", size, "plain",
                           z, "msg/s", 250_000.0))
    one = [{"system": s, "p50_us": p50, "p99_us": p99, "cpu_client_us": 75.0,
            "cpu_server_us": 81.0} for s, p50, p99 in (
        ("raw pyzmq DEALER/ROUTER", 74.0, 310.0),
        ("Python floor (ZRR decode/encode echo)", 95.0, 494.0),
        ("zeromesh (default service)", 190.0, 851.0),
        ("zeromesh (inline service)", 143.0, 670.0),
        ("zeromesh latency mode (inline, spin_us=200 both sides)", 124.0, 654.0),
        ("NATS request/reply (nats-py, Python responder)", 276.0, 1208.0),
        ("Zenoh get (Python queryable, peer mode)", 148.0, 657.0))]
    pipe = [{"system": s, "rate": rate, "p50_us": 1000.0, "p99_us": 3000.0} for s, rate in (
        ("raw pyzmq DEALER/ROUTER", 68_591.0),
        ("Python floor (ZRR decode/encode echo)", 36_358.0),
        ("zeromesh (default service), AsyncClient", 29_807.0),
        ("zeromesh (inline service), AsyncClient", 38_876.0),
        ("zeromesh (service latency mode, spin_us=200), AsyncClient", 45_039.0))]
    store = [{"system": "raw pyzmq PUSH/PULL", "kr": "-", "eps": 1_193_256.0, "p50_us": 115.0,
              "p99_us": 510.0, "cpu10k": 0.011},
             {"system": "zeromesh store", "kr": "k=1", "eps": zm1_eps, "p50_us": 737.0,
              "p99_us": 1287.0, "cpu10k": 0.034},
             {"system": "zeromesh store, sync=write (opt-in)", "kr": "k=1", "eps": 1.0,
              "p50_us": 384.0, "p99_us": 900.0, "cpu10k": 0.03},
             {"system": "NATS JetStream", "kr": "R3", "eps": 42_857.0, "p50_us": 373.0,
              "p99_us": 859.0, "cpu10k": 0.354}]

    def mesh(n: int, b: int) -> dict[str, Any]:
        return {"nodes": n, "control_bytes_out_per_node_per_s": b, "all_joined_s": 4.6,
                "min_peers_seen": n - 1, "rss_per_node_mib": 7.3, "killed_nodes": 10,
                "all_see_killed_gone_s": 43.9, "killed_gone_everywhere": True,
                "heartbeat_s": 4.0, "gone_s_setting": 40.0}

    log = {"records": 10_000_000, "replayed": 10_000_000, "replay_per_s": 6_972_591.0,
           "reopen_s": 0.005, "rss_after_open_mib": 39.2, "peak_rss_mib": 44.5}
    return {"rows": rows,
            "cells": {"subcpu": {"n": 200_000, "proc_us": sub_us, "thread_us": 2.17,
                                 "rate": 400_000.0, "runs": [{}, {}, {}]},
                      "rrpipe": {"one_at_a_time": one, "pipelined": pipe},
                      "store": {"rows": store, "skipped": [], "notes": []}},
            "scaling": {"mesh": [mesh(50, 203), mesh(200, b200)], "log": log}}


def _by_target(ts: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {t["target"]: t for t in ts}


def test_targets_are_computed_from_the_results_every_target_once() -> None:
    ra = _runall()
    ts = _by_target(ra.targets(_fake_results()))
    assert len(ts) == 17, sorted(ts)
    t = ts["subscriber CPU per delivered 100 B event <= 2 µs"]
    assert (t["status"], t["figure"].split(" µs")[0]) == ("NOT met", "2.42")
    t = ts["durable publish_many(100) >= 0.5x the single-frame ceiling (100 B)"]
    assert (t["status"], t["figure"]) == ("NOT met", "tcp 0.19x, ipc 0.22x")
    assert ts["durable publish() >= 0.25x the single-frame ceiling (100 B)"]["figure"] \
        == "tcp 0.08x, ipc 0.07x"
    t = ts["best-effort publish() ahead of Zenoh put/subscribe (tcp)"]
    assert (t["status"], t["figure"]) == ("NOT met", "100 B 0.23x Zenoh's rate, "
                                                     "1 KiB 0.32x Zenoh's rate")
    t = ts["request/reply p50 <= 1.15x the Python-floor echo (default service)"]
    assert (t["status"], t["figure"]) == ("NOT met", "default 2.00x, inline 1.51x, "
                                                     "latency mode 1.31x")
    t = ts["pipelined (64 in flight) >= 0.4x raw (default service)"]
    assert (t["status"], t["figure"]) == ("met", "default 0.43x, inline 0.57x, "
                                                 "latency mode 0.66x")
    assert ts["request/reply p50 under NATS request/reply's (default service)"]["status"] \
        == "met"
    assert ts["request/reply p50 under Zenoh get's (default service)"]["status"] == "NOT met"
    assert ts["opt-in latency mode reported (p50, p99, CPU)"]["status"] == "reported"
    t = ts["replicated k=1 throughput >= 3x JetStream R3"]
    assert (t["status"], t["figure"].split(" ")[0]) == ("met", "9.4x")
    t = ts["replicated k=1 p50 publish-to-replicated under JetStream R3's publish-ack p50"]
    # judged on the default store (an fsynced copy); the opt-in row is shown beside it
    assert t["status"] == "NOT met"
    assert t["figure"] == "737 µs against 373 µs; sync=write (opt-in): 384 µs"
    t = ts["idle control bytes per node grow at most linearly with N"]
    assert t["status"] == "NOT met" and "15.2x for 4x the nodes" in t["figure"]
    assert ts["200 nodes: all see all, control bytes/node/s, RSS/node, SIGKILL detection"][
        "status"] == "met"
    assert ts["durable log at 10 M records: replay rate, restart time, RSS"]["status"] \
        == "reported"


def test_a_target_flips_with_its_figure() -> None:
    """The status follows the figure (nothing typed in): the same results with the figures
    on the other side of each threshold."""
    ra = _runall()
    ts = _by_target(ra.targets(_fake_results(sub_us=1.9, zm1_eps=100_000.0, b200=800)))
    assert ts["subscriber CPU per delivered 100 B event <= 2 µs"]["status"] == "met"
    assert ts["replicated k=1 throughput >= 3x JetStream R3"]["status"] == "NOT met"
    assert ts["idle control bytes per node grow at most linearly with N"]["status"] == "met"


def test_a_ratio_rounding_to_its_threshold_shows_which_side_it_is_on() -> None:
    ra = _runall()
    res = _fake_results()
    for p in res["cells"]["rrpipe"]["pipelined"]:
        if "default" in p["system"]:
            p["rate"] = 0.398 * 68_591.0
    t = _by_target(ra.targets(res))["pipelined (64 in flight) >= 0.4x raw (default service)"]
    assert (t["status"], t["figure"].split(",")[0]) == ("NOT met", "default 0.398x")


def test_missing_parts_are_not_measured_and_a_partial_200_node_run_is_not_met() -> None:
    ra = _runall()
    res = _fake_results()
    del res["cells"]["store"], res["cells"]["subcpu"]
    res["cells"]["rrpipe"]["one_at_a_time"] = [
        r for r in res["cells"]["rrpipe"]["one_at_a_time"] if "NATS" not in r["system"]]
    res["scaling"]["mesh"][1]["min_peers_seen"] = 150
    res["scaling"]["log"].update(records=1_000_000, replayed=1_000_000)
    ts = _by_target(ra.targets(res))
    for name in ("subscriber CPU per delivered 100 B event <= 2 µs",
                 "replicated k=1 throughput >= 3x JetStream R3",
                 "request/reply p50 under NATS request/reply's (default service)",
                 "durable log at 10 M records: replay rate, restart time, RSS"):
        assert ts[name]["status"] == "not measured", name
    assert ts["200 nodes: all see all, control bytes/node/s, RSS/node, SIGKILL detection"][
        "status"] == "NOT met"
    # nothing at all: every target is there, not measured
    empty = ra.targets({"rows": [], "cells": {}, "scaling": None})
    assert len(empty) == 17 and {t["status"] for t in empty} == {"not measured"}
    table = ra.targets_table(empty).splitlines()
    assert table[0] == "| target | this run | met? | from |" and len(table) == 19


def test_the_separate_benchmarks_outputs_are_read() -> None:
    ra = _runall()
    sub = ra.parse_sub_cpu(
        "subscriber CPU per event: 100 B, tcp, publish_many(100), 2000 events, 2 runs\n"
        "  run 1: got 2000, process 2.50 µs/event, receiving thread 2.10 µs/event, "
        "123,456 ev/s (wall, provisional), load 1.00\n"
        "  run 2: got 2000, process 2.30 µs/event, receiving thread 2.00 µs/event, "
        "100,000 ev/s (wall, provisional), load 1.00\n")
    assert (sub["proc_us"], sub["thread_us"], sub["rate"]) == (2.4, 2.05, 111_728.0)
    with pytest.raises(ValueError, match="no run"):
        ra.parse_sub_cpu("Traceback ...")
    store = ra.parse_store_table(
        "# 2,000 events\n| system | k / R | events/s | vs raw | p50 µs | p99 µs | CPU s / 10k |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        "| zeromesh store | k=1 | 401,216 | 0.336 | 737 | 1,287 | 0.034 |\n")
    assert store == [{"system": "zeromesh store", "kr": "k=1", "eps": 401_216.0,
                      "p50_us": 737.0, "p99_us": 1287.0, "cpu10k": 0.034}]
    with pytest.raises(ValueError, match="no table"):
        ra.parse_store_table("# NATS JetStream R3 skipped\n")


def test_a_failing_benchmark_subprocess_is_a_cell_error_with_its_stderr() -> None:
    ra = _runall()
    with pytest.raises(ra.CellError, match=r"exited with 3: .*boom"):
        ra.run_child([sys.executable, "-c", "import sys; print('x', file=sys.stderr); "
                      "sys.exit('boom' and 3) if print('boom', file=sys.stderr) is None "
                      "else 0"], 30)
    with pytest.raises(ra.CellError, match="did not finish within 1 s"):
        ra.run_child([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert ra.run_child([sys.executable, "-c", "print('ok')"], 30) == "ok\n"


def test_a_benchmark_subprocess_leaves_no_process_behind() -> None:
    """A benchmark that exits leaving a server of its own running (here a sleeper that holds
    its stdout): the cell returns at once and the leftover is killed."""
    ra = _runall()
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(120)']); print(p.pid, flush=True)")
    out = ra.run_child([sys.executable, "-c", code], 30)
    pid = int(out.split()[0])

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
        except FileNotFoundError:
            return True

    assert poll_until(gone, 10), f"process {pid} outlived its cell"


def test_run_all_prints_the_targets_table_and_writes_it(tmp_path: Path) -> None:
    # No cell (an empty --only): the run is seconds long and still ends with the whole
    # targets table, every target "not measured", and results.json holding it.
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = lines.index("| target | this run | met? | from |")
    assert len([ln for ln in lines[head + 2:] if ln.startswith("| ")]) == 17
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["targets"]) == 17
    # and it is reprinted from that file, computed again
    (tmp_path / "fake.json").write_text(json.dumps(_fake_results()))
    again = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--targets-from",
                            str(tmp_path / "fake.json")], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert "| replicated k=1 throughput >= 3x JetStream R3 | 9.4x" in again.stdout


def test_targets_from_an_older_or_foreign_results_file(tmp_path: Path) -> None:
    """docs/bench/results.json predates the targets (one mesh run as a dict, no SIGKILL
    figures): its table prints, what it lacks "not measured"; a file of another shape is a
    clear error, not a traceback."""
    ra = _runall()
    old = {"rows": [], "scaling": {"mesh": {"nodes": 50, "control_bytes_out_per_node_per_s":
                                            28512, "all_joined_s": 2.18}}}
    ts = _by_target(ra.targets(old))
    assert ts["50 nodes: all see all, control bytes/node/s, RSS/node, SIGKILL detection"][
        "status"] == "not measured"
    (tmp_path / "odd.json").write_text(json.dumps({"rows": [{"pattern": "pubsub"}]}))
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--targets-from",
                          str(tmp_path / "odd.json")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "is not a results.json of run_all.py" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_all_refuses_an_unknown_cell() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "pubsub,nope"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown cell(s) in --only: nope" in out.stderr
