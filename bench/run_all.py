"""One command for every zeromesh benchmark, raw pyzmq beside each, one table of ratios.

    python bench/run_all.py --quick                  # about 1.5 min on 2 cores (a smoke run)
    python bench/run_all.py --quick --peers --scaling   # about 2.5 min
    python bench/run_all.py --peers --scaling --out docs/bench   # everything: ~12-16 min

Runs, in one process tree and one run (so every ratio compares figures taken minutes apart on
the same machine, under the same load):

* pub/sub (bench_pubsub.py): the ceiling (raw pyzmq XPUB/SUB, the payload alone in one
  frame per message) and raw XPUB/SUB sending ``[b"m", payload]`` (two frames, the historical
  row) vs best-effort ``publish()``, durable ``publish()`` and durable ``publish_many(100)``;
  each zeromesh row has its ratio to both; tcp loopback and ipc; 100 B and 1 KiB; plain and
  CURVE (curve_cases.py; no ceiling row there yet); one-way latency p50/p99 at 2,000
  events/s (100 B, plain).
* request/reply (bench_reqrep.py): raw DEALER/ROUTER vs ``Client`` (p50/p99 one at a time)
  and ``AsyncClient`` (64 in flight, req/s); tcp and ipc; 100 B and 1 KiB; plain and CURVE.
* pipeline (bench_pipeline.py): raw PUSH/PULL vs WorkQueue + 1 worker, every task acked; ipc
  only (that benchmark's layout); 100 B and 1 KiB; plain only.
* log (bench_log.py): append_many and replay against a buffered write() ceiling.
* ``--peers``: Zenoh's Python binding peer to peer (zenoh_peer.py: put/subscribe against
  the pub/sub rows, get/queryable against the request/reply rows; tcp, plain; needs the
  ``bench`` extra, skipped with a line when missing), then (peers.py) NATS JetStream,
  mosquitto MQTT QoS 1 and Redis Streams on loopback, same workload as pub/sub; ratio
  against raw pyzmq XPUB/SUB tcp of the same size.

Every pub/sub, request/reply and pipeline cell also has its CPU µs per event (request, task)
on the producer and consumer sides (process time, every thread of each process): steadier
than wall-clock rates on a shared machine, and it shows which side a change helps.
* ``--scaling`` (scaling.py): topics, subscribers, a large log (10 M records: replay rate,
  re-open time, RSS), 50 and 200 nodes in one mesh (all see all, idle control bytes per
  node, RSS per node, SIGKILL detection; both at ``--mesh-heartbeat``, default 4 s).

And the separate benchmarks, each run as a subprocess through its own command line (a crash
or a hang there costs its cell only; its figures are read from its output):

* ``subcpu``: bench_sub_cpu.py, the subscriber's CPU per delivered 100 B event;
* ``rrpipe``: bench_reqrep_pipelined.py, request/reply p50/p99 against the Python-floor echo
  and raw (interleaved), 64 in flight, latency mode; with ``--peers`` NATS request/reply and
  Zenoh ``get`` in the same interleaving;
* ``store``: bench_store.py, replicated streams k=1, k=2 against raw pyzmq and NATS
  JetStream R3.

The run ends with **the targets table**: every target of the issue, this run's figure, and
met / NOT met / reported / not measured, computed from the results (``targets()``; also in
``results.json``; ``--targets-from results.json`` prints it again). A cell that fails prints
a line (``!! name failed``), the rest goes on, and the exit code is 1.

Writes ``results.json`` and ``bench.png`` (throughput and latency per system; needs the
``bench`` extra, matplotlib) into ``--out`` (default: a new temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (HERE, REPO):
    if _p not in sys.path:
        sys.path.insert(0, _p)

Row = dict[str, Any]
CEILING = "ceiling: raw pyzmq XPUB/SUB, 1 frame"
SIZES = (100, 1024)
TRANSPORTS = ("tcp", "ipc")


def _pct_s(xs: list[float], q: float) -> float:
    """Percentile of a list of seconds, in µs."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))] * 1e6


def row(pattern: str, system: str, transport: str, size: int | None, security: str,
        thr: float | None, unit: str, raw: float | None, p50: float | None = None,
        p99: float | None = None, raw_p50: float | None = None, note: str = "", *,
        ceiling: float | None = None,
        cpu: tuple[float | None, float | None] | None = None) -> Row:
    """One result row; ratio = thr / raw (None for a raw row itself: printed as 1.00; raw 0:
    no ratio); ratio_ceiling = thr / ceiling (pub/sub: the single-frame raw XPUB/SUB of the
    same cell); cpu = CPU µs per event (request, task) on the (producer, consumer) sides.
    ``thr`` None: a latency-only row; ``size`` None: no payload size (the gossip rows)."""
    return {"pattern": pattern, "system": system, "transport": transport, "size": size,
            "security": security, "throughput": thr, "unit": unit,
            "ratio": None if thr is None else 1.0 if raw is None else thr / raw if raw else None,
            "ratio_ceiling": thr / ceiling if ceiling and thr is not None else None,
            "is_raw": raw is None, "p50_us": p50, "p99_us": p99,
            "p50_ratio": (p50 / raw_p50) if (p50 and raw_p50) else None, "note": note,
            "cpu_p_us": cpu[0] if cpu else None, "cpu_c_us": cpu[1] if cpu else None}


def _cpu(r: dict[str, Any], n: int) -> tuple[float | None, float | None]:
    """(producer, consumer) CPU µs per event of a bench_pubsub result (process time)."""
    cc = r.get("cpu_c")
    return (r["cpu_p"] / n * 1e6 if r.get("cpu_p") is not None else None,
            cc / max(1, r["got"]) * 1e6 if cc is not None else None)


def _progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- patterns -----------------------------------------------------------------------------------

def pubsub_rows(n: int, lat_n: int, curve: bool) -> list[Row]:
    import bench_pubsub as bp
    import curve_cases as cc
    rows: list[Row] = []
    for tr in TRANSPORTS:
        for size in SIZES:
            _progress(f"pubsub {tr} {size} B plain")
            # The ceiling: raw XPUB/SUB with the payload alone in one frame per message; the
            # historical raw row sends [b"m", payload] (two frames), about 5x slower in Python.
            c1 = bp.raw_case(tr, size, n, None, frames_n=1)
            ceil = c1["rate"]
            rows.append(row("pubsub", CEILING, tr, size, "plain", ceil, "msg/s", None,
                            ceiling=ceil, cpu=_cpu(c1, n),
                            note="" if c1["got"] == n else f"got {c1['got']}/{n}"))
            rows[-1]["is_ceiling"] = True
            r2 = bp.raw_case(tr, size, n, None)
            raw = r2["rate"]
            rows.append(row("pubsub", "raw pyzmq XPUB/SUB", tr, size, "plain", raw, "msg/s", None,
                            ceiling=ceil, cpu=_cpu(r2, n)))
            for label, durable, batch in (("best-effort publish()", False, 1),
                                          ("durable publish()", True, 1),
                                          ("durable publish_many(100)", True, 100)):
                r = bp.mesh_case(tr, size, n, durable, None, batch)
                note = "" if r["got"] == n else f"got {r['got']}/{n}"
                rows.append(row("pubsub", f"zeromesh {label}", tr, size, "plain", r["rate"],
                                "msg/s", raw, note=note, ceiling=ceil, cpu=_cpu(r, n)))
            if not curve:
                continue
            _progress(f"pubsub {tr} {size} B CURVE")
            rawc = cc.pubsub_raw_curve(tr, size, n)["rate"]
            rows.append(row("pubsub", "raw pyzmq XPUB/SUB", tr, size, "curve", rawc, "msg/s",
                            None))
            for label, durable, batch in (("best-effort publish()", False, 1),
                                          ("durable publish_many(100)", True, 100)):
                r = cc.pubsub_mesh_curve(tr, size, n, durable, batch)
                note = "" if r["got"] == n else f"got {r['got']}/{n}"
                rows.append(row("pubsub", f"zeromesh {label}", tr, size, "curve", r["rate"],
                                "msg/s", rawc, note=note))
    # One-way latency at a fixed moderate rate (nothing coalesced): attached to the 100 B rows.
    for tr in TRANSPORTS:
        _progress(f"pubsub latency {tr}")
        lat = {"raw pyzmq XPUB/SUB": bp.raw_case(tr, 100, lat_n, 2000.0),
               "zeromesh best-effort publish()": bp.mesh_case(tr, 100, lat_n, False, 2000.0, 1),
               "zeromesh durable publish()": bp.mesh_case(tr, 100, lat_n, True, 2000.0, 1)}
        raw_p50 = bp.pct(lat["raw pyzmq XPUB/SUB"]["lats"], 0.5)
        for r in rows:
            if (r["transport"], r["size"], r["security"]) == (tr, 100, "plain") \
                    and r["system"] in lat:
                lats = lat[r["system"]]["lats"]
                r["p50_us"], r["p99_us"] = bp.pct(lats, 0.5), bp.pct(lats, 0.99)
                r["p50_ratio"] = r["p50_us"] / raw_p50 if raw_p50 else None
    return rows


def reqrep_rows(n: int, curve: bool) -> list[Row]:
    import bench_reqrep as br
    import curve_cases as cc
    rows: list[Row] = []
    tmp = tempfile.mkdtemp(prefix="runall-rr-")
    saved = br.PAYLOAD
    try:
        for tr in TRANSPORTS:
            for size in SIZES:
                # bench_reqrep reads its module-level PAYLOAD at call time; the echo server
                # returns what it gets, so setting it is enough to change the size.
                br.PAYLOAD = b"x" * size
                _progress(f"reqrep {tr} {size} B plain")
                # latencies interleaved with raw's (bench_reqrep.paired): a fair p50 ratio
                cpu: dict[str, tuple[float, float]] = {}
                rl, rr, ml, mr, _ = br.paired(tr, n, 64, "inline", cpu=cpu)
                rows.append(row("reqrep", "raw pyzmq DEALER/ROUTER", tr, size, "plain", rr,
                                "req/s", None, _pct_s(rl, .5), _pct_s(rl, .99),
                                cpu=cpu.get("raw")))
                rows.append(row("reqrep", "zeromesh request (inline handler)", tr, size,
                                "plain", mr, "req/s", rr, _pct_s(ml, .5), _pct_s(ml, .99),
                                _pct_s(rl, .5), cpu=cpu.get("mesh")))
                if not curve:
                    continue
                _progress(f"reqrep {tr} {size} B CURVE")
                ep = (f"tcp://127.0.0.1:{_free_port()}" if tr == "tcp"
                      else f"ipc://{tmp}/rawc-{size}.sock")
                rl, rr = cc.reqrep_raw_curve(ep, n, 64, br.PAYLOAD)
                rows.append(row("reqrep", "raw pyzmq DEALER/ROUTER", tr, size, "curve", rr,
                                "req/s", None, _pct_s(rl, .5), _pct_s(rl, .99)))
                ml, mr = cc.reqrep_mesh_curve(tr, n, 64, br.PAYLOAD)
                rows.append(row("reqrep", "zeromesh request (inline handler)", tr, size,
                                "curve", mr, "req/s", rr, _pct_s(ml, .5), _pct_s(ml, .99),
                                _pct_s(rl, .5)))
    finally:
        br.PAYLOAD = saved
    return rows


def pipeline_rows(n: int) -> list[Row]:
    import bench_pipeline as bpl
    rows: list[Row] = []
    tmp = tempfile.mkdtemp(prefix="runall-pipe-")
    for size in SIZES:
        _progress(f"pipeline ipc {size} B")
        # Three alternating raw / zeromesh runs, medians of each: one run of either swung by
        # +-30 % on the shared VM (raw PUSH/PULL between 0.9 and 1.4 M msg/s minutes apart).
        raws, meshes = [], []
        rcpu: list[tuple[float, float]] = []
        mcpu: list[tuple[float, float]] = []
        for rep in range(3):
            c: dict[str, tuple[float, float]] = {}
            raws.append(bpl.bench_raw(n, size, tmp, cpu=c))
            meshes.append(bpl.bench_mesh(n, size, 1, f"{tmp}/{size}-{rep}", cpu=c))
            rcpu.append(c["raw"])
            mcpu.append(c["mesh"])
        raw = statistics.median(raws)
        note = "median of 3 alternating runs"
        rows.append(row("pipeline", "raw pyzmq PUSH/PULL", "ipc", size, "plain", raw, "msg/s",
                        None, note=note, cpu=_median_pair(rcpu)))
        rows.append(row("pipeline", "zeromesh WorkQueue, 1 worker, acked", "ipc", size, "plain",
                        statistics.median(meshes), "msg/s", raw, note=note,
                        cpu=_median_pair(mcpu)))
    return rows


def _median_pair(xs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)


def zenoh_rows(n: int, rr_n: int, rows: list[Row]) -> list[Row]:
    """Zenoh peer-to-peer put/subscribe and get/queryable (bench/zenoh_peer.py), tcp, plain;
    pub/sub ratios against the raw XPUB/SUB rows of the same size (tcp plain, this run),
    get/queryable against raw DEALER/ROUTER tcp plain of the same size."""
    import zenoh_peer as zp
    out: list[Row] = []
    ver = zp.version()
    for size in SIZES:
        _progress(f"zenoh put/subscribe {size} B")
        base = {r["system"]: r for r in rows if r["pattern"] == "pubsub"
                and r["transport"] == "tcp" and r["security"] == "plain" and r["size"] == size}
        ceil = base.get(CEILING, {}).get("throughput")
        raw = base.get("raw pyzmq XPUB/SUB", {}).get("throughput")
        r = zp.pubsub_case(size, n)
        note = ("" if r["got"] == n else f"got {r['got']}/{n} ") + ver + ", not durable"
        out.append(row("pubsub", "Zenoh put/subscribe (peer, BLOCK)", "tcp", size, "plain",
                       r["rate"], "msg/s", raw or 0.0, note=note, ceiling=ceil,
                       cpu=_cpu(r, n)))
        _progress(f"zenoh get/queryable {size} B")
        rbase = next((x for x in rows if x["pattern"] == "reqrep" and x["is_raw"]
                      and x["transport"] == "tcp" and x["security"] == "plain"
                      and x["size"] == size), None)
        g = zp.getq_case(size, rr_n)
        lat = [x for x in g["lats"]]
        out.append(row("reqrep", "Zenoh get/queryable (peer)", "tcp", size, "plain", g["rate"],
                       "req/s", rbase["throughput"] if rbase else 0.0, _pct_s(lat, .5),
                       _pct_s(lat, .99), rbase["p50_us"] if rbase else None, note=ver,
                       cpu=(g["cpu_p"] / g["requests"] * 1e6, g["cpu_c"] / g["requests"] * 1e6)))
    return out


def log_rows(k: float) -> list[Row]:
    import bench_log as bl

    from mesh.log import FsyncPolicy
    rows: list[Row] = []
    root = tempfile.mkdtemp(prefix="runall-log-")
    _progress("log")
    for size, n, batch in ((100, int(1_000_000 * k), 1000), (1024, int(200_000 * k), 100)):
        ceil, _ = bl.ceiling(root, size, n)
        rows.append(row("log", "ceiling: buffered write()", "disk", size, "plain", ceil,
                        "rec/s", None))
        r, _ = bl.bench_append(root, f"a{size}", FsyncPolicy.interval(10), size, n, batch)
        rows.append(row("log", f"zeromesh append_many({batch}), fsync 10 ms", "disk", size,
                        "plain", r, "rec/s", ceil))
        if size == 100:
            rr = bl.bench_replay(root, size, n, batch)
            rows.append(row("log", "zeromesh replay read_batch_payloads", "disk", size, "plain",
                            rr, "rec/s", ceil))
    return rows


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the separate benchmarks, each in its own process -------------------------------------------
# bench_sub_cpu.py, bench_reqrep_pipelined.py and bench_store.py run as they do alone, through
# their command lines (a crash, a hang or a changed option there costs their cell, not the run;
# their processes are their own), and run_all reads what they print (--json where there is one).

class CellError(RuntimeError):
    """A benchmark run as a subprocess failed (its exit code and last lines of stderr)."""


def run_child(argv: list[str], timeout: float) -> str:
    """Run ``argv`` in its own process group; its stdout. CellError when it exits non-zero or
    outlives ``timeout``. Whatever of its group is left afterwards (a crashed benchmark's
    servers) is killed. Output goes to files, not pipes: a leftover holding our stdout could
    not keep the cell waiting."""
    name = os.path.basename(next((a for a in argv if a.endswith(".py")), argv[0]))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                             cwd=REPO, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CellError(f"{name} did not finish within {timeout:.0f} s") from None
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        if p.returncode != 0:
            err.seek(0)
            tail = " | ".join(ln.strip() for ln in err.read().strip().splitlines()[-3:])
            raise CellError(f"{name} exited with {p.returncode}: {tail}")
        out.seek(0)
        return out.read()


_SUB_RUN = re.compile(r"run \d+: got (\d+), process ([\d.]+) µs/event, receiving thread "
                      r"([\d.]+) µs/event, ([\d,]+) ev/s")


def parse_sub_cpu(out: str) -> dict[str, Any]:
    """The runs of ``bench_sub_cpu.py``'s output: events got, process and receiving-thread
    CPU µs per delivered event, wall rate; medians. ValueError when no run is there."""
    runs = [{"got": int(m[1]), "proc_us": float(m[2]), "thread_us": float(m[3]),
             "rate": float(m[4].replace(",", ""))} for m in _SUB_RUN.finditer(out)]
    if not runs:
        raise ValueError(f"no run in bench_sub_cpu.py's output: {out[-300:]!r}")
    return {"runs": runs, **{k: statistics.median(r[k] for r in runs)
                             for k in ("proc_us", "thread_us", "rate")}}


def sub_cpu_cell(n: int, runs: int) -> dict[str, Any]:
    """Subscriber CPU per delivered 100 B event (bench/bench_sub_cpu.py, tcp)."""
    _progress(f"subscriber CPU per event: {runs} x {n:,} events (bench_sub_cpu.py)")
    out = run_child([sys.executable, os.path.join(HERE, "bench_sub_cpu.py"), "-n", str(n),
                     "--runs", str(runs)], 120 + 120 * runs)
    return {"n": n, **parse_sub_cpu(out)}


def _nats_missing() -> str | None:
    """Why bench_reqrep_pipelined.py --peers cannot run here (it needs nats-server on PATH
    and nats-py; Zenoh it skips by itself), or None."""
    import importlib.util
    import shutil
    if shutil.which("nats-server") is None:
        return "nats-server is not on PATH (apt-get install nats-server)"
    if importlib.util.find_spec("nats") is None:
        return "nats-py is not installed (pip install nats-py)"
    return None


def rrpipe_cell(quick: bool, peers: bool) -> dict[str, Any]:
    """Request/reply one at a time and 64 in flight against raw and the Python floor
    (bench/bench_reqrep_pipelined.py --json); with ``peers`` NATS and Zenoh ``get`` too."""
    if peers and (why := _nats_missing()):
        print(f"NATS and Zenoh rows of the request/reply floor cell skipped: {why}", flush=True)
        peers = False
    _progress("request/reply against the floor, 64 in flight, latency mode "
              f"(bench_reqrep_pipelined.py{' --peers' if peers else ''})")
    with tempfile.TemporaryDirectory(prefix="runall-rrpipe-") as d:
        path = os.path.join(d, "rr.json")
        run_child([sys.executable, os.path.join(HERE, "bench_reqrep_pipelined.py"),
                   *(["--quick"] if quick else []), *(["--peers"] if peers else []),
                   "--json", path], 900)
        with open(path) as f:
            res: dict[str, Any] = json.load(f)
    return res


def parse_store_table(out: str) -> list[dict[str, Any]]:
    """The result table of ``bench_store.py``: one dict per row (system, k / R, events/s,
    p50, p99 µs, CPU s / 10k). ValueError when there is no table."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        raise ValueError(f"no table in bench_store.py's output: {out[-300:]!r}")
    cols = [c.strip() for c in lines[0].strip().strip("|").split("|")]

    def num(v: str) -> float | None:
        try:
            return float(v.replace(",", ""))
        except ValueError:
            return None

    rows = []
    for ln in lines[2:]:
        c = dict(zip(cols, (x.strip() for x in ln.strip().strip("|").split("|")), strict=False))
        rows.append({"system": c.get("system", ""), "kr": c.get("k / R", ""),
                     "eps": num(c.get("events/s", "")), "p50_us": num(c.get("p50 µs", "")),
                     "p99_us": num(c.get("p99 µs", "")),
                     "cpu10k": num(c.get("CPU s / 10k", ""))})
    return rows


def store_cell(quick: bool) -> dict[str, Any]:
    """Replicated streams k=1, k=2 against raw pyzmq and NATS JetStream R3
    (bench/bench_store.py)."""
    _progress(f"replicated streams (bench_store.py{' --quick' if quick else ''})")
    out = run_child([sys.executable, os.path.join(HERE, "bench_store.py"),
                     *(["--quick"] if quick else [])], 1500)
    skipped = [ln[2:] for ln in out.splitlines() if ln.startswith("# ") and "skipped" in ln]
    return {"rows": parse_store_table(out), "skipped": skipped,
            "notes": [ln[2:] for ln in out.splitlines() if ln.startswith("# ")]}


def rr_kind(system: str) -> str:
    """Which system of bench_reqrep_pipelined.py a row names: raw, floor, latency, inline,
    default, nats, zenoh (or other)."""
    s = system.lower()
    for key, kind in (("raw pyzmq", "raw"), ("floor", "floor"), ("latency mode", "latency"),
                      ("inline", "inline"), ("default", "default"), ("nats", "nats"),
                      ("zenoh", "zenoh")):
        if key in s:
            return kind
    return "other"


def cell_rows(cells: dict[str, Any], scaling: dict[str, Any] | None) -> list[Row]:
    """Rows of the one table (and the chart) from the separate benchmarks' results."""
    out: list[Row] = []
    sc = cells.get("subcpu")
    if sc:
        out.append(row("pubsub", "zeromesh Subscriber, CPU per delivered event "
                       "(bench_sub_cpu.py; best-effort publish_many(100))", "tcp", 100, "plain",
                       sc["rate"], "msg/s", 0.0, cpu=(None, sc["proc_us"]),
                       note=f"median of {len(sc['runs'])} runs of {sc['n']:,}; receiving "
                            f"thread {sc['thread_us']:.2f} µs/event"))
    rr = cells.get("rrpipe")
    if rr:
        one = rr.get("one_at_a_time", [])
        base = {rr_kind(r["system"]): r for r in one}
        raw50 = base.get("raw", {}).get("p50_us")
        floor50 = base.get("floor", {}).get("p50_us")
        raw99 = base.get("raw", {}).get("p99_us")
        for r in one:
            note = []
            if floor50:
                note.append(f"p50 {r['p50_us'] / floor50:.2f}x floor")
            if raw99:
                note.append(f"p99 {r['p99_us'] / raw99:.2f}x raw")
            out.append(row("reqrep", f"{r['system']}, one at a time (bench_reqrep_pipelined.py)",
                           "tcp", 100, "plain", None, "req/s", None, r["p50_us"], r["p99_us"],
                           raw50, ", ".join(note),
                           cpu=(r.get("cpu_client_us"), r.get("cpu_server_us"))))
        pipe = rr.get("pipelined", [])
        prate = next((p["rate"] for p in pipe if rr_kind(p["system"]) == "raw"), None)
        for p in pipe:
            raw_row = rr_kind(p["system"]) == "raw"
            out.append(row("reqrep", f"{p['system']}, {rr.get('inflight', 64)} in flight "
                           "(bench_reqrep_pipelined.py)", "tcp", 100, "plain", p["rate"],
                           "req/s", None if raw_row else (prate or 0.0), p["p50_us"],
                           p["p99_us"], cpu=(p.get("cpu_client_us"), p.get("cpu_server_us")),
                           note="median of the runs"))
    st = cells.get("store")
    if st:
        raw = next((r["eps"] for r in st["rows"] if r["system"].startswith("raw")), None)
        for r in st["rows"]:
            is_raw = r["system"].startswith("raw")
            kr = "" if r["kr"] in ("", "-") else f" {r['kr']}"
            out.append(row("store", f"{r['system']}{kr} (bench_store.py)", "tcp", 100,
                           "plain", r["eps"], "events/s", None if is_raw else (raw or 0.0),
                           r["p50_us"], r["p99_us"], note=f"CPU s / 10k {r['cpu10k']}"))
    for m in (scaling or {}).get("mesh") or []:
        out.append(row("gossip", f"{m['nodes']} nodes, heartbeat {m.get('heartbeat_s', 1.0)} s: "
                       "idle control bytes out per node", "tcp", None, "plain",
                       m["control_bytes_out_per_node_per_s"], "B/s", 0.0,
                       note=f"all see all {m['all_joined_s']} s (min seen "
                            f"{m['min_peers_seen']}), RSS {m['rss_per_node_mib']} MiB/node, "
                            f"SIGKILL of {m['killed_nodes']}: gone everywhere "
                            f"{m['all_see_killed_gone_s']} s"
                            f"{'' if m['killed_gone_everywhere'] else ' (not all)'}"))
    lg = (scaling or {}).get("log")
    if lg:
        out.append(row("log", f"replay of a {lg['records']:,}-record log (scaling.py)", "disk",
                       100, "plain", lg["replay_per_s"], "rec/s", 0.0,
                       note=f"re-open (restart) {lg['reopen_s']} s, RSS after open "
                            f"{lg['rss_after_open_mib']} MiB, peak {lg['peak_rss_mib']} MiB"))
    return out


# --- the targets, computed from a run's results ----------------------------------------

MET, NOT_MET, REPORTED, MISSING = "met", "NOT met", "reported", "not measured"

#: The thresholds of the issue's targets (the figures are this run's).
SUB_CPU_US = 2.0
CEILING_TARGETS = (("zeromesh durable publish_many(100)", 0.5),
                   ("zeromesh durable publish()", 0.25),
                   ("zeromesh best-effort publish()", 0.4))
RR_P50_FLOOR = 1.15
RR_P99_RAW = 2.0
RR_PIPELINED_RAW = 0.4
STORE_JS_X = 3.0
LOG_RECORDS = 10_000_000
MESH_SIZES = (50, 200)


def _target(target: str, figure: str, status: str, source: str) -> dict[str, str]:
    return {"target": target, "figure": figure, "status": status, "source": source}


def _x(v: float, threshold: float) -> str:
    """A ratio for the targets table: 2 decimals, 3 where 2 would print the threshold itself
    (0.398 against 0.4 shows as 0.398x, not 0.40x beside "NOT met")."""
    return f"{v:.3f}x" if f"{v:.2f}" == f"{threshold:.2f}" else f"{v:.2f}x"


def _x1(v: float, threshold: float) -> str:
    """One decimal, or _x's where one decimal would print the threshold itself."""
    return _x(v, threshold) if f"{v:.1f}" == f"{threshold:.1f}" else f"{v:.1f}x"


def _judge(ok: list[bool]) -> str:
    return MISSING if not ok else MET if all(ok) else NOT_MET


def targets(res: dict[str, Any]) -> list[dict[str, str]]:
    """Every target of the issue, with this run's figure and met / NOT met / reported / not
    measured, computed from a run's results (the dict run_all writes as results.json: its
    ``rows``, ``cells`` and ``scaling``). Pure: no I/O."""
    rows: list[Row] = res.get("rows") or []
    cells: dict[str, Any] = res.get("cells") or {}
    scaling: dict[str, Any] = res.get("scaling") or {}
    out: list[dict[str, str]] = []

    sc = cells.get("subcpu")
    out.append(_target(
        f"subscriber CPU per delivered 100 B event <= {SUB_CPU_US:g} µs",
        f"{sc['proc_us']:.2f} µs (process), {sc['thread_us']:.2f} µs (receiving thread); "
        f"median of {len(sc['runs'])}" if sc else "", _judge([sc["proc_us"] <= SUB_CPU_US])
        if sc else MISSING, "bench_sub_cpu.py"))

    ps = {(r["system"], r["transport"]): r for r in rows if r["pattern"] == "pubsub"
          and r["size"] == 100 and r["security"] == "plain"}
    for system, x in CEILING_TARGETS:
        got = [(tr, ps[(system, tr)]["ratio_ceiling"]) for tr in TRANSPORTS
               if ps.get((system, tr), {}).get("ratio_ceiling") is not None]
        out.append(_target(
            f"{system.removeprefix('zeromesh ')} >= {x:g}x the single-frame ceiling (100 B)",
            ", ".join(f"{tr} {_x(v, x)}" for tr, v in got),
            _judge([v >= x for _, v in got]), "pub/sub rows"))

    zen = []
    for size in SIZES:
        z = next((r for r in rows if r["system"].startswith("Zenoh put/subscribe")
                  and r["size"] == size), None)
        be = ps.get(("zeromesh best-effort publish()", "tcp")) if size == 100 else next(
            (r for r in rows if r["pattern"] == "pubsub" and r["size"] == size
             and r["transport"] == "tcp" and r["security"] == "plain"
             and r["system"] == "zeromesh best-effort publish()"), None)
        if z and be and z["throughput"]:
            zen.append((size, be["throughput"] / z["throughput"]))
    out.append(_target(
        "best-effort publish() ahead of Zenoh put/subscribe (tcp)",
        ", ".join(f"{_size(sz)} {_x(v, 1.0)} Zenoh's rate" for sz, v in zen),
        _judge([v >= 1.0 for _, v in zen]), "pub/sub and Zenoh rows (--peers)"))

    rr = cells.get("rrpipe") or {}
    one = {rr_kind(r["system"]): r for r in rr.get("one_at_a_time", [])}
    pipe = {rr_kind(r["system"]): r for r in rr.get("pipelined", [])}
    modes = [k for k in ("default", "inline", "latency") if k in one]
    names = {"default": "default", "inline": "inline", "latency": "latency mode"}

    def per_mode(fn: Any, fmt: str | float) -> str:
        """``fmt``: a format, or a threshold for _x."""
        return ", ".join(f"{names[k]} " + (fmt.format(fn(k)) if isinstance(fmt, str)
                                            else _x(fn(k), fmt)) for k in modes)

    src = "bench_reqrep_pipelined.py"
    if "default" in one and "floor" in one:
        f50 = one["floor"]["p50_us"]
        out.append(_target(f"request/reply p50 <= {RR_P50_FLOOR:g}x the Python-floor echo "
                           "(default service)",
                           per_mode(lambda k: one[k]["p50_us"] / f50, RR_P50_FLOOR),
                           _judge([one["default"]["p50_us"] / f50 <= RR_P50_FLOOR]), src))
    else:
        out.append(_target(f"request/reply p50 <= {RR_P50_FLOOR:g}x the Python-floor echo "
                           "(default service)", "", MISSING, src))
    if "default" in one and "raw" in one:
        r99 = one["raw"]["p99_us"]
        out.append(_target(f"request/reply p99 <= {RR_P99_RAW:g}x raw (default service)",
                           per_mode(lambda k: one[k]["p99_us"] / r99, RR_P99_RAW),
                           _judge([one["default"]["p99_us"] / r99 <= RR_P99_RAW]), src))
    else:
        out.append(_target(f"request/reply p99 <= {RR_P99_RAW:g}x raw (default service)", "",
                           MISSING, src))
    pmodes = [k for k in ("default", "inline", "latency") if k in pipe]
    if "default" in pipe and "raw" in pipe:
        prr = pipe["raw"]["rate"]
        out.append(_target(
            f"pipelined (64 in flight) >= {RR_PIPELINED_RAW:g}x raw (default service)",
            ", ".join(f"{names[k]} {_x(pipe[k]['rate'] / prr, RR_PIPELINED_RAW)}"
                      for k in pmodes),
            _judge([pipe["default"]["rate"] / prr >= RR_PIPELINED_RAW]), src))
    else:
        out.append(_target(f"pipelined (64 in flight) >= {RR_PIPELINED_RAW:g}x raw (default "
                           "service)", "", MISSING, src))
    for peer, label in (("nats", "NATS request/reply"), ("zenoh", "Zenoh get")):
        if "default" in one and peer in one:
            p50 = one[peer]["p50_us"]
            out.append(_target(
                f"request/reply p50 under {label}'s (default service)",
                per_mode(lambda k: one[k]["p50_us"], "{:.0f}") + f" µs against {p50:.0f} µs",
                _judge([one["default"]["p50_us"] < p50]), src + " --peers"))
        else:
            out.append(_target(f"request/reply p50 under {label}'s (default service)", "",
                               MISSING, src + " --peers"))
    lm = one.get("latency")
    out.append(_target(
        "opt-in latency mode reported (p50, p99, CPU)",
        f"p50 {lm['p50_us']:.0f} µs, p99 {lm['p99_us']:.0f} µs, CPU "
        f"{lm.get('cpu_client_us', 0):.0f} / {lm.get('cpu_server_us', 0):.0f} µs per request"
        if lm else "", REPORTED if lm else MISSING, src))

    st = (cells.get("store") or {}).get("rows") or []
    k1 = next((r for r in st if r["kr"] == "k=1" and r["system"] == "zeromesh store"), None)
    js = next((r for r in st if r["kr"] == "R3"), None)
    # an opt-in mode's row (e.g. "zeromesh store, sync=write (opt-in)") is shown, not judged
    opt = [r for r in st if r["kr"] == "k=1" and r["system"] != "zeromesh store"
           and r["system"].startswith("zeromesh store") and r["p50_us"] is not None]
    opt_fig = "".join(f"; {r['system'].removeprefix('zeromesh store, ')}: {r['p50_us']:,.0f} µs"
                      for r in opt)
    ok = bool(k1 and js and k1["eps"] and js["eps"])
    out.append(_target(
        f"replicated k=1 throughput >= {STORE_JS_X:g}x JetStream R3",
        f"{_x1(k1['eps'] / js['eps'], STORE_JS_X)} ({k1['eps']:,.0f} against "
        f"{js['eps']:,.0f} events/s)"
        if ok and k1 and js else "",
        _judge([k1["eps"] / js["eps"] >= STORE_JS_X]) if ok and k1 and js else MISSING,
        "bench_store.py"))
    ok = bool(k1 and js and k1["p50_us"] is not None and js["p50_us"] is not None)
    out.append(_target(
        "replicated k=1 p50 publish-to-replicated under JetStream R3's publish-ack p50",
        f"{k1['p50_us']:,.0f} µs against {js['p50_us']:,.0f} µs{opt_fig}" if ok and k1 and js
        else "",
        _judge([k1["p50_us"] < js["p50_us"]]) if ok and k1 and js else MISSING,
        "bench_store.py"))

    runs = scaling.get("mesh") or []
    mesh = {m["nodes"]: m for m in (runs if isinstance(runs, list) else [runs])}
    lo, hi = MESH_SIZES
    if lo in mesh and hi in mesh:
        b_lo = mesh[lo]["control_bytes_out_per_node_per_s"]
        b_hi = mesh[hi]["control_bytes_out_per_node_per_s"]
        growth = b_hi / b_lo if b_lo else float("inf")
        out.append(_target(
            "idle control bytes per node grow at most linearly with N",
            f"{b_lo:,} B/s at {lo} nodes, {b_hi:,} at {hi}: {growth:.1f}x for {hi / lo:g}x the "
            f"nodes (heartbeat {mesh[hi].get('heartbeat_s', 1.0)} s)",
            _judge([growth <= hi / lo]), "scaling.py (--scaling)"))
    else:
        out.append(_target("idle control bytes per node grow at most linearly with N",
                           ", ".join(f"{n} nodes {m['control_bytes_out_per_node_per_s']:,} B/s"
                                     for n, m in sorted(mesh.items())), MISSING,
                           f"scaling.py (--scaling; needs {lo} and {hi} nodes)"))
    need = ("all_joined_s", "min_peers_seen", "control_bytes_out_per_node_per_s",
            "rss_per_node_mib", "killed_nodes", "all_see_killed_gone_s", "killed_gone_everywhere")
    for n in MESH_SIZES:
        m = mesh.get(n)
        if m and not all(k in m for k in need):  # a run from before the SIGKILL part
            m = None
        fig = ""
        if m:
            fig = (f"all see all {m['all_joined_s']} s (min seen {m['min_peers_seen']} of "
                   f"{n - 1}), {m['control_bytes_out_per_node_per_s']:,} B/s, "
                   f"{m['rss_per_node_mib']} MiB per node, SIGKILL of {m['killed_nodes']}: "
                   f"gone everywhere after {m['all_see_killed_gone_s']} s (gone_s "
                   f"{m.get('gone_s_setting')})")
        out.append(_target(
            f"{n} nodes: all see all, control bytes/node/s, RSS/node, SIGKILL detection", fig,
            _judge([m["min_peers_seen"] >= n - 1, bool(m["killed_gone_everywhere"])])
            if m else MISSING, "scaling.py (--scaling)"))

    lg = scaling.get("log")
    full = bool(lg and lg["records"] >= LOG_RECORDS and lg["replayed"] == lg["records"])
    out.append(_target(
        f"durable log at {LOG_RECORDS / 1e6:g} M records: replay rate, restart time, RSS",
        f"{lg['records']:,} records: replay {lg['replay_per_s']:,.0f} rec/s, re-open "
        f"{lg['reopen_s']} s, RSS after open {lg['rss_after_open_mib']} MiB (peak "
        f"{lg['peak_rss_mib']})" if lg else "",
        REPORTED if full else MISSING, "scaling.py (--scaling)"))
    return out


def targets_table(ts: list[dict[str, str]]) -> str:
    """The targets as a markdown table."""
    out = ["| target | this run | met? | from |", "|---|---|---|---|"]
    out += [f"| {t['target']} | {t['figure']} | {t['status']} | {t['source']} |" for t in ts]
    return "\n".join(out)


# --- report -------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import zmq
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "kernel": platform.release(), "loadavg_start": os.getloadavg()}


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "" if v is None else format(v, spec)


def _size(size: int | None) -> str:
    return "" if size is None else "1 KiB" if size == 1024 else f"{size} B"


def table(rows: list[Row]) -> str:
    """The one markdown table of the run."""
    out = ["| pattern | system / mode | transport | size | security | throughput | ratio to raw "
           "| ratio to ceiling | CPU µs/event prod / cons | p50 µs | p99 µs | p50 ratio | note |",
           "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rc, cp, cc = r.get("ratio_ceiling"), r.get("cpu_p_us"), r.get("cpu_c_us")
        out.append(
            f"| {r['pattern']} | {r['system']} | {r['transport']} | "
            f"{_size(r['size'])} | {r['security']} | "
            f"{'' if r['throughput'] is None else _fmt(r['throughput']) + ' ' + r['unit']} | "
            f"{'' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} | "
            f"{'' if rc is None else format(rc, '.2f') + 'x'} | "
            f"{'' if cp is None and cc is None else _fmt(cp, '.2f') + ' / ' + _fmt(cc, '.2f')} | "
            f"{_fmt(r['p50_us'])} | {_fmt(r['p99_us'])} | "
            f"{'' if r['p50_ratio'] is None else format(r['p50_ratio'], '.2f') + 'x'} | "
            f"{r['note']} |")
    return "\n".join(out)


def _label(r: Row) -> str:
    """A chart label: pattern, system without the script it came from, transport; cut at 64."""
    text = f"{r['pattern']}: {re.sub(r' [(]bench_[^)]*[)]', '', r['system'])} ({r['transport']})"
    return text if len(text) <= 64 else text[:63] + "…"


def chart(rows: list[Row], path: str) -> str | None:
    """Throughput (100 B and 1 KiB) and p50/p99 latency per system; None when no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("chart skipped: matplotlib is not installed "
                "(pip install 'zeromesh[bench]' or pip install matplotlib)")
    # Throughput panel: one bar pair per system, plain, tcp (ipc where the pattern has no tcp).
    sel: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["security"] != "plain" or r["pattern"] in ("log", "gossip") \
                or r["throughput"] is None:
            continue
        if r["transport"] not in ("tcp", "loopback") and r["pattern"] != "pipeline":
            continue
        label = _label(r)
        sel.setdefault(label, {})[r["size"]] = r["throughput"]
    lat = [(_label(r), r["p50_us"], r["p99_us"])
           for r in rows if r["p50_us"] and r["security"] == "plain" and r["size"] == 100]
    if not sel and not lat:
        return "chart skipped: no throughput or latency row in this run"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(17, max(6, 0.42 * max(len(sel), len(lat)))))
    labels = list(sel)
    ys = range(len(labels))
    h = 0.4
    ax1.barh([y - h / 2 for y in ys], [sel[k].get(100, 0) for k in labels], h, label="100 B")
    ax1.barh([y + h / 2 for y in ys], [sel[k].get(1024, 0) for k in labels], h, label="1 KiB")
    ax1.set_yticks(list(ys), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log" if sel else "linear")
    ax1.set_xlabel("messages (requests, tasks) per second, log scale")
    ax1.set_title("Throughput, plaintext, loopback (pipeline: ipc)")
    ax1.legend()
    ax1.grid(axis="x", alpha=0.3)
    ly = range(len(lat))
    ax2.barh([y - h / 2 for y in ly], [x[1] for x in lat], h, label="p50")
    ax2.barh([y + h / 2 for y in ly], [x[2] for x in lat], h, label="p99")
    ax2.set_yticks(list(ly), [x[0] for x in lat], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xscale("log" if lat else "linear")
    ax2.set_xlabel("µs, log scale (reqrep: round trip; pub/sub and brokers: one way)")
    ax2.set_title("Latency, 100 B, plaintext")
    ax2.legend()
    ax2.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _peer_ratios(rows: list[Row], peer: list[Row]) -> None:
    """Peers are compared with raw pyzmq XPUB/SUB tcp plain of the same size (same run)."""
    raw = {r["size"]: r for r in rows if r["pattern"] == "pubsub" and r["is_raw"]
           and r["transport"] == "tcp" and r["security"] == "plain"}
    for p in peer:
        base = raw.get(p["size"])
        if base and p["throughput"]:
            p["ratio"] = p["throughput"] / base["throughput"]
            if p["p50_us"] and base["p50_us"]:
                p["p50_ratio"] = p["p50_us"] / base["p50_us"]


STEPS = ("pubsub", "reqrep", "log", "pipeline", "subcpu", "rrpipe", "store")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run every zeromesh benchmark with raw pyzmq beside each; one table, "
                    "then the issue's targets table (met or not, computed from this run).")
    ap.add_argument("--quick", action="store_true", help="fewer messages per cell")
    ap.add_argument("--peers", action="store_true",
                    help="also Zenoh peer-to-peer put/subscribe and get/queryable (needs "
                         "eclipse-zenoh: the bench extra; skipped with a line when missing), "
                         "NATS JetStream, mosquitto QoS 1 and Redis Streams (needs the "
                         "servers on PATH and nats-py, paho-mqtt, redis), and NATS and Zenoh "
                         "in the request/reply floor cell")
    ap.add_argument("--scaling", action="store_true",
                    help="also topics / subscribers / large log / 50- and 200-node mesh")
    ap.add_argument("--out", default=None, help="directory for results.json and bench.png")
    ap.add_argument("--only", default=",".join(STEPS),
                    help="comma list of cells to run, of " + ", ".join(STEPS) + " (default: "
                         "all; an empty list runs none: with --scaling or --peers only those)")
    ap.add_argument("--no-curve", action="store_true", help="plaintext only")
    ap.add_argument("--log-records", type=int, default=None,
                    help="records in the --scaling large-log test (default 10,000,000)")
    ap.add_argument("--mesh-heartbeat", type=float, default=None,
                    help="presence heartbeat of the --scaling mesh, s, for 50 and 200 nodes "
                         "alike (default 4: 200 nodes at 1 s overload 2 cores; --quick: 1, "
                         "and 50 nodes only)")
    ap.add_argument("--targets-from", metavar="RESULTS_JSON", default=None,
                    help="run nothing: print the targets table of an earlier results.json")
    a = ap.parse_args(argv)
    if a.targets_from:
        try:
            with open(a.targets_from) as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            ap.error(f"cannot read {a.targets_from}: {exc}")
        try:
            print(targets_table(targets(old)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            ap.error(f"{a.targets_from} is not a results.json of run_all.py "
                     f"({type(exc).__name__}: {exc})")
        return 0
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if only - set(STEPS):
        ap.error(f"unknown cell(s) in --only: {', '.join(sorted(only - set(STEPS)))}; "
                 f"choose from {', '.join(STEPS)}")
    if a.mesh_heartbeat is None:
        a.mesh_heartbeat = 1.0 if a.quick else 4.0
    if a.mesh_heartbeat <= 0:
        ap.error("--mesh-heartbeat must be > 0")
    out = a.out or tempfile.mkdtemp(prefix="zeromesh-bench-")
    os.makedirs(out, exist_ok=True)
    q = a.quick
    meta = machine()
    cmd = "python bench/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.monotonic()
    print(f"zeromesh benchmark suite: {meta['nproc']} CPUs ({meta['cpu']}), python "
          f"{meta['python']}, pyzmq {meta['pyzmq']} / libzmq {meta['libzmq']}, "
          f"load {meta['loadavg_start'][0]:.1f}", flush=True)
    rows: list[Row] = []
    cells: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("pubsub", lambda: pubsub_rows(20_000 if q else 50_000, 1000 if q else 3000,
                                       not a.no_curve)),
        ("reqrep", lambda: reqrep_rows(1000 if q else 3000, not a.no_curve)),
        # log before pipeline: the pipeline writes ~1 GB of task logs, whose writeback
        # halved the log cells when they ran right after it
        ("log", lambda: log_rows(0.25 if q else 1.0)),
        ("pipeline", lambda: pipeline_rows(50_000 if q else 200_000)),
        # the separate benchmarks, each a subprocess: their results go to ``cells``
        ("subcpu", lambda: sub_cpu_cell(50_000 if q else 200_000, 1 if q else 3)),
        ("rrpipe", lambda: rrpipe_cell(q, a.peers)),
        ("store", lambda: store_cell(q)),
    ]
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    for name, fn in steps:
        if name not in only:
            continue
        t0 = time.monotonic()
        try:
            got = fn()
            if isinstance(got, list):
                rows += got
            else:
                cells[name] = got
        except Exception as exc:  # one broken cell must not lose the others' results
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"!! {name} failed: {errors[name]}", file=sys.stderr, flush=True)
        durations[name] = round(time.monotonic() - t0, 1)
    if a.peers:
        t0 = time.monotonic()
        import zenoh_peer
        why = zenoh_peer.available()
        if why:
            print(f"Zenoh rows skipped: {why}", flush=True)
            errors_skipped = why
        else:
            errors_skipped = None
            try:
                rows += zenoh_rows(20_000 if q else 50_000, 1000 if q else 3000, rows)
            except Exception as exc:
                errors["zenoh"] = f"{type(exc).__name__}: {exc}"
                print(f"!! zenoh failed: {errors['zenoh']}", file=sys.stderr, flush=True)
        meta["zenoh_skipped"] = errors_skipped
        try:
            import peers
            prows = peers.run_peers(n=20_000 if q else 50_000, lat_n=1000 if q else 3000,
                                    sizes=SIZES, progress=_progress)
            _peer_ratios(rows, prows)
            rows += prows
        except Exception as exc:
            errors["peers"] = f"{type(exc).__name__}: {exc}"
            print(f"!! peers failed: {errors['peers']}", file=sys.stderr, flush=True)
        durations["peers"] = round(time.monotonic() - t0, 1)
    scaling: dict[str, Any] | None = None
    if a.scaling:
        t0 = time.monotonic()
        try:
            import scaling as sc
            scaling = sc.run_scaling(quick=q, log_records=a.log_records, progress=_progress,
                                     hb=a.mesh_heartbeat)
            for key, err in scaling.get("errors", {}).items():
                errors[f"scaling {key}"] = err
                print(f"!! scaling {key} failed: {err}", file=sys.stderr, flush=True)
        except Exception as exc:
            errors["scaling"] = f"{type(exc).__name__}: {exc}"
            print(f"!! scaling failed: {errors['scaling']}", file=sys.stderr, flush=True)
        durations["scaling"] = round(time.monotonic() - t0, 1)
    rows += cell_rows(cells, scaling)
    meta["loadavg_end"] = os.getloadavg()
    meta["duration_s"] = round(time.monotonic() - t_start, 1)
    meta["durations_s"] = durations
    print()
    print("Ratios: zeromesh / raw pyzmq in the same run, same transport, size and security "
          "(CURVE rows against raw CURVE); brokers against raw XPUB/SUB tcp plain; log against "
          "a buffered write(). p50 ratio likewise. Pub/sub: 'ratio to raw' is against the "
          "two-frame raw loop ([b\"m\", payload]), 'ratio to ceiling' against one frame per "
          "message. CPU: process time per event (request, task) on the producer / consumer "
          "side, every thread of each process. Rows naming a script come from that script, "
          "run as a subprocess in this run: their ratios are against its own raw rows.")
    print(table(rows))
    if scaling is not None:
        import scaling as sc
        print()
        print(sc.report(scaling))
    for name, cell in (("store", cells.get("store")),):
        if cell and cell.get("notes"):
            print()
            print(f"{name}: " + "; ".join(cell["notes"]))
    res: dict[str, Any] = {"command": cmd, "machine": meta, "rows": rows, "cells": cells,
                           "scaling": scaling, "errors": errors,
                           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    res["targets"] = targets(res)
    print()
    print(f"Targets (computed from this run; load average {meta['loadavg_start'][0]:.1f} at "
          f"the start, {meta['loadavg_end'][0]:.1f} at the end):")
    print()
    print(targets_table(res["targets"]))
    jpath = os.path.join(out, "results.json")
    with open(jpath, "w") as f:
        json.dump(res, f, indent=1)
    try:
        msg = chart(rows, os.path.join(out, "bench.png")) if rows else "chart skipped: no rows"
    except Exception as exc:  # the results are written already; a chart must not lose them
        msg = f"chart failed: {type(exc).__name__}: {exc}"
    print()
    print(msg or f"chart: {os.path.join(out, 'bench.png')}")
    print(f"results: {jpath}  ({meta['duration_s']} s, load {meta['loadavg_end'][0]:.1f}; "
          "per part: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items()) + ")")
    if errors:
        print(f"errors: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
