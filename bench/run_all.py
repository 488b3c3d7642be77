"""One command for every zeromesh benchmark, raw pyzmq beside each, one table of ratios.

    python bench/run_all.py --quick                  # about 4 min on 2 cores
    python bench/run_all.py                          # about 8 min
    python bench/run_all.py --peers --scaling --out docs/bench

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
* ``--scaling`` (scaling.py): topics, subscribers, a large log, 50 nodes in one mesh.

Writes ``results.json`` and ``bench.png`` (throughput and latency per system; needs the
``bench`` extra, matplotlib) into ``--out`` (default: a new temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def row(pattern: str, system: str, transport: str, size: int, security: str, thr: float,
        unit: str, raw: float | None, p50: float | None = None, p99: float | None = None,
        raw_p50: float | None = None, note: str = "", *, ceiling: float | None = None,
        cpu: tuple[float | None, float | None] | None = None) -> Row:
    """One result row; ratio = thr / raw (None for a raw row itself: printed as 1.00);
    ratio_ceiling = thr / ceiling (pub/sub: the single-frame raw XPUB/SUB of the same cell);
    cpu = CPU µs per event (request, task) on the (producer, consumer) sides."""
    return {"pattern": pattern, "system": system, "transport": transport, "size": size,
            "security": security, "throughput": thr, "unit": unit,
            "ratio": 1.0 if raw is None else thr / raw if raw else None,
            "ratio_ceiling": thr / ceiling if ceiling else None,
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


def table(rows: list[Row]) -> str:
    """The one markdown table of the run."""
    out = ["| pattern | system / mode | transport | size | security | throughput | ratio to raw "
           "| ratio to ceiling | CPU µs/event prod / cons | p50 µs | p99 µs | p50 ratio | note |",
           "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rc, cp, cc = r.get("ratio_ceiling"), r.get("cpu_p_us"), r.get("cpu_c_us")
        out.append(
            f"| {r['pattern']} | {r['system']} | {r['transport']} | "
            f"{'1 KiB' if r['size'] == 1024 else str(r['size']) + ' B'} | {r['security']} | "
            f"{_fmt(r['throughput'])} {r['unit']} | "
            f"{'' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} | "
            f"{'' if rc is None else format(rc, '.2f') + 'x'} | "
            f"{'' if cp is None and cc is None else _fmt(cp, '.2f') + ' / ' + _fmt(cc, '.2f')} | "
            f"{_fmt(r['p50_us'])} | {_fmt(r['p99_us'])} | "
            f"{'' if r['p50_ratio'] is None else format(r['p50_ratio'], '.2f') + 'x'} | "
            f"{r['note']} |")
    return "\n".join(out)


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
        if r["security"] != "plain" or r["pattern"] == "log":
            continue
        if r["transport"] not in ("tcp", "loopback") and r["pattern"] != "pipeline":
            continue
        label = f"{r['pattern']}: {r['system']} ({r['transport']})"
        sel.setdefault(label, {})[r["size"]] = r["throughput"]
    lat = [(f"{r['pattern']}: {r['system']} ({r['transport']})", r["p50_us"], r["p99_us"])
           for r in rows if r["p50_us"] and r["security"] == "plain" and r["size"] == 100]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(17, max(6, 0.42 * max(len(sel), len(lat)))))
    labels = list(sel)
    ys = range(len(labels))
    h = 0.4
    ax1.barh([y - h / 2 for y in ys], [sel[k].get(100, 0) for k in labels], h, label="100 B")
    ax1.barh([y + h / 2 for y in ys], [sel[k].get(1024, 0) for k in labels], h, label="1 KiB")
    ax1.set_yticks(list(ys), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("messages (requests, tasks) per second, log scale")
    ax1.set_title("Throughput, plaintext, loopback (pipeline: ipc)")
    ax1.legend()
    ax1.grid(axis="x", alpha=0.3)
    ly = range(len(lat))
    ax2.barh([y - h / 2 for y in ly], [x[1] for x in lat], h, label="p50")
    ax2.barh([y + h / 2 for y in ly], [x[2] for x in lat], h, label="p99")
    ax2.set_yticks(list(ly), [x[0] for x in lat], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run every zeromesh benchmark with raw pyzmq beside each; one table.")
    ap.add_argument("--quick", action="store_true", help="fewer messages per cell")
    ap.add_argument("--peers", action="store_true",
                    help="also Zenoh peer-to-peer put/subscribe and get/queryable (needs "
                         "eclipse-zenoh: the bench extra; skipped with a line when missing), "
                         "NATS JetStream, mosquitto QoS 1 and Redis Streams (needs the "
                         "servers on PATH and nats-py, paho-mqtt, redis)")
    ap.add_argument("--scaling", action="store_true",
                    help="also topics / subscribers / large log / 50-node mesh")
    ap.add_argument("--out", default=None, help="directory for results.json and bench.png")
    ap.add_argument("--only", default="pubsub,reqrep,pipeline,log",
                    help="comma list of patterns to run (default: all)")
    ap.add_argument("--no-curve", action="store_true", help="plaintext only")
    ap.add_argument("--log-records", type=int, default=None,
                    help="records in the --scaling large-log test (default 10,000,000)")
    a = ap.parse_args(argv)
    out = a.out or tempfile.mkdtemp(prefix="zeromesh-bench-")
    os.makedirs(out, exist_ok=True)
    only = set(a.only.split(","))
    q = a.quick
    meta = machine()
    cmd = "python bench/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.monotonic()
    print(f"zeromesh benchmark suite: {meta['nproc']} CPUs ({meta['cpu']}), python "
          f"{meta['python']}, pyzmq {meta['pyzmq']} / libzmq {meta['libzmq']}, "
          f"load {meta['loadavg_start'][0]:.1f}", flush=True)
    rows: list[Row] = []
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("pubsub", lambda: pubsub_rows(20_000 if q else 50_000, 1000 if q else 3000,
                                       not a.no_curve)),
        ("reqrep", lambda: reqrep_rows(1000 if q else 3000, not a.no_curve)),
        # log before pipeline: the pipeline writes ~1 GB of task logs, whose writeback
        # halved the log cells when they ran right after it
        ("log", lambda: log_rows(0.25 if q else 1.0)),
        ("pipeline", lambda: pipeline_rows(50_000 if q else 200_000)),
    ]
    errors: dict[str, str] = {}
    for name, fn in steps:
        if name not in only:
            continue
        try:
            rows += fn()
        except Exception as exc:  # one broken pattern must not lose the others' results
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"!! {name} failed: {errors[name]}", file=sys.stderr, flush=True)
    if a.peers:
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
    scaling: dict[str, Any] | None = None
    if a.scaling:
        try:
            import scaling as sc
            scaling = sc.run_scaling(quick=q, log_records=a.log_records, progress=_progress)
        except Exception as exc:
            errors["scaling"] = f"{type(exc).__name__}: {exc}"
            print(f"!! scaling failed: {errors['scaling']}", file=sys.stderr, flush=True)
    meta["loadavg_end"] = os.getloadavg()
    meta["duration_s"] = round(time.monotonic() - t_start, 1)
    print()
    print("Ratios: zeromesh / raw pyzmq in the same run, same transport, size and security "
          "(CURVE rows against raw CURVE); brokers against raw XPUB/SUB tcp plain; log against "
          "a buffered write(). p50 ratio likewise. Pub/sub: 'ratio to raw' is against the "
          "two-frame raw loop ([b\"m\", payload]), 'ratio to ceiling' against one frame per "
          "message. CPU: process time per event (request, task) on the producer / consumer "
          "side, every thread of each process.")
    print(table(rows))
    if scaling is not None:
        import scaling as sc
        print()
        print(sc.report(scaling))
    res = {"command": cmd, "machine": meta, "rows": rows, "scaling": scaling, "errors": errors,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    jpath = os.path.join(out, "results.json")
    with open(jpath, "w") as f:
        json.dump(res, f, indent=1)
    msg = chart(rows, os.path.join(out, "bench.png"))
    print()
    print(msg or f"chart: {os.path.join(out, 'bench.png')}")
    print(f"results: {jpath}  ({meta['duration_s']} s, load {meta['loadavg_end'][0]:.1f})")
    if errors:
        print(f"errors: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
