"""CURVE vs plain: pub/sub and request/reply, zeromesh beside raw pyzmq, in the same run.

Every line has its consumer (or responder) in a separate process, so a line is bound by the
wire and the crypto, not by two Python loops sharing one GIL. Four lines per pattern and
payload size (100 B, 1 KiB), tcp on 127.0.0.1:

* raw pyzmq plain / CURVE: XPUB (NODROP) -> SUB in a spawned process
  (bench_pubsub.raw_case, curve_cases.pubsub_raw_curve); DEALER -> ROUTER echo child,
  64 requests in flight (bench_reqrep.raw_bench, curve_cases.reqrep_raw_curve);
* zeromesh plain / CURVE: durable Publisher (fsync every 10 ms, ``publish_many`` of 100) ->
  Subscriber on a node in a spawned process (bench_pubsub.mesh_case,
  curve_cases.pubsub_mesh_curve); AsyncClient with 64 in flight -> Service (inline handler)
  in a child (bench_reqrep.mesh_bench, curve_cases.reqrep_mesh_curve).

Each round runs the four lines back to back; the table shows the median over the rounds of
each throughput and of each round's CURVE/plain ratio, then the comparison of zeromesh's ratio
with raw pyzmq's (target: zeromesh's >= raw's, i.e. encryption costs zeromesh no more).
With ``nats-server`` and nats-py installed, NATS JetStream (no TLS; PubAck, durable pull
consumer with explicit acks; bench/peers.py's harness) runs the same pub/sub workload beside
secured durable pub/sub.

    python bench/bench_security.py --quick    # 3 rounds, < 90 s
    python bench/bench_security.py            # 5 rounds, bigger counts
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import bench_pubsub  # noqa: E402
import bench_reqrep  # noqa: E402
import curve_cases  # noqa: E402
import peers  # noqa: E402

SIZES = (100, 1024)
INFLIGHT = 64
BATCH = 100


def _free_ep() -> str:
    return f"tcp://127.0.0.1:{peers.free_port()}"


def pubsub_lines(size: int, n: int) -> dict[str, float]:
    """One round of the four pub/sub lines: name -> events/s."""
    out = {
        "raw plain": bench_pubsub.raw_case("tcp", size, n, None),
        "raw CURVE": curve_cases.pubsub_raw_curve("tcp", size, n),
        "zeromesh plain": bench_pubsub.mesh_case("tcp", size, n, True, None, BATCH),
        "zeromesh CURVE": curve_cases.pubsub_mesh_curve("tcp", size, n, True, BATCH),
    }
    for name, r in out.items():
        if r["got"] != n:
            print(f"  warning: pub/sub {name} {size} B got {r['got']}/{n}", file=sys.stderr)
    return {k: float(r["rate"]) for k, r in out.items()}


def reqrep_lines(size: int, n: int) -> dict[str, tuple[float, float]]:
    """One round of the four req/rep lines: name -> (requests/s pipelined, p50 round trip us)."""
    payload = b"x" * size
    # bench_reqrep's plain twins read their payload from this module global.
    bench_reqrep.PAYLOAD = payload
    runs: dict[str, tuple[list[float], float]] = {
        "raw plain": bench_reqrep.raw_bench(_free_ep(), n, INFLIGHT),
        "raw CURVE": curve_cases.reqrep_raw_curve(_free_ep(), n, INFLIGHT, payload),
        "zeromesh plain": bench_reqrep.mesh_bench("tcp", n, INFLIGHT, "inline"),
        "zeromesh CURVE": curve_cases.reqrep_mesh_curve("tcp", n, INFLIGHT, payload),
    }
    return {k: (rate, statistics.median(lat) * 1e6) for k, (lat, rate) in runs.items()}


def jetstream(sizes: tuple[int, ...], n: int) -> dict[int, float] | str:
    """NATS JetStream msg/s per size on a private nats-server, or why it did not run."""
    if shutil.which("nats-server") is None:
        return "nats-server not on PATH"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py not installed"
    tmp = os.path.join("/tmp", f"zmsec-nats-{os.getpid()}")
    port = peers.free_port()
    proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port), "-js",
                             "-sd", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        peers._wait_port(port, proc)
        return {s: float(peers.one_case("nats", port, n, s, False)["rate"]) for s in sizes}
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _median_table(rounds: list[dict[str, float]]) -> tuple[dict[str, float], float, float]:
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    raw_ratio = statistics.median(r["raw CURVE"] / r["raw plain"] for r in rounds)
    mesh_ratio = statistics.median(r["zeromesh CURVE"] / r["zeromesh plain"] for r in rounds)
    return med, raw_ratio, mesh_ratio


def _row(pattern: str, size: int, med: dict[str, float], raw_r: float, mesh_r: float) -> None:
    verdict = "holds" if mesh_r >= raw_r else "does NOT hold"
    print(f"| {pattern} | {size} B | raw pyzmq | {med['raw plain'] / 1e3:,.1f} | "
          f"{med['raw CURVE'] / 1e3:,.1f} | {raw_r:.2f} | |")
    print(f"| {pattern} | {size} B | zeromesh | {med['zeromesh plain'] / 1e3:,.1f} | "
          f"{med['zeromesh CURVE'] / 1e3:,.1f} | {mesh_r:.2f} | zeromesh/raw ratio "
          f"{mesh_r / raw_r:.2f}: target {verdict} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-nats", action="store_true", help="skip NATS JetStream")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    n_ps, n_rr, n_js = (100_000, 1000, 20_000) if args.quick else (200_000, 2000, 50_000)
    t_start = time.monotonic()
    ps: dict[int, list[dict[str, float]]] = {s: [] for s in SIZES}
    rr: dict[int, list[dict[str, tuple[float, float]]]] = {s: [] for s in SIZES}
    for i in range(rounds):
        for s in SIZES:
            print(f"# round {i + 1}/{rounds}: pub/sub {s} B", file=sys.stderr, flush=True)
            ps[s].append(pubsub_lines(s, n_ps))
            print(f"# round {i + 1}/{rounds}: req/rep {s} B", file=sys.stderr, flush=True)
            rr[s].append(reqrep_lines(s, n_rr))
    js: dict[int, float] | str = "skipped (--no-nats)"
    if not args.no_nats:
        print("# NATS JetStream", file=sys.stderr, flush=True)
        js = jetstream(SIZES, n_js)
    print("| pattern | size | line | plain k/s | CURVE k/s | CURVE/plain | comparison |")
    print("|---|---|---|---:|---:|---:|---|")
    for s in SIZES:
        _row("pub/sub", s, *_median_table(ps[s]))
    for s in SIZES:
        rates = [{k: v[0] for k, v in r.items()} for r in rr[s]]
        _row("req/rep", s, *_median_table(rates))
    print()
    print("req/rep p50 round trip, one request at a time (us), median of rounds:")
    for s in SIZES:
        p50 = {k: statistics.median(r[k][1] for r in rr[s]) for k in rr[s][0]}
        print(f"  {s} B: " + ", ".join(f"{k} {v:.0f}" for k, v in p50.items()))
    print()
    if isinstance(js, str):
        print(f"NATS JetStream: not run ({js})")
    else:
        for s in SIZES:
            sec = statistics.median(r["zeromesh CURVE"] for r in ps[s])
            print(f"secured durable pub/sub {s} B: {sec / 1e3:,.1f} k/s vs NATS JetStream "
                  f"(no TLS) {js[s] / 1e3:,.1f} k/s = {sec / js[s]:.1f}x")
    print(f"# rounds={rounds} pubsub n={n_ps} (publish_many of {BATCH}) reqrep "
          f"n={n_rr} latency + {n_rr * 4} pipelined ({INFLIGHT} in flight) jetstream n={n_js}; "
          f"{time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
