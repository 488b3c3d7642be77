"""Scaling: topics, subscribers, a large log, and 50 nodes in one mesh on this host.

    python bench/scaling.py [--quick] [--log-records N]   # alone; run_all.py --scaling too

* topics: one publisher node (this process) with 1, 10 or 100 durable streams ``t.<i>``; one
  subscriber process with one prefix subscription ``t.``; N events of 100 B published
  round-robin with ``publish_many(100)``. Delivered events/s, and RSS of both processes.
* subscribers: one durable stream, 1, 2, 4 or 8 subscriber processes (one node each); N events
  of 100 B with ``publish_many(100)``; deliveries/s summed over subscribers, publisher RSS.
* large log: a child process appends R records of 100 B (``append_many(1000)``, fsync never),
  closes, re-opens (restart time and RSS held after open), then replays everything with
  ``read_batch_payloads`` (replay rate, peak RSS).
* mesh: 50 nodes in 5 processes of 10, joined through one seed (static peer, then gossip);
  discovery time = start of the processes until every node sees 49 live peers; then the
  control messages each node sends and receives per second while idle (presence heartbeats
  and keepalives), messages and bytes, from ``Node.stats()``.

RSS figures come from /proc/<pid>/status (VmRSS, VmHWM), in MiB.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
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

IDLE_S = 5.0


def rss_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


# --- topics and subscribers ---------------------------------------------------------------------

def _sub_proc(ctrl: str, mesh: str, topic: str, n: int, q: Any, data_dir: str) -> None:
    from mesh.node import Node
    from patterns.pubsub import Start, Subscriber
    with Node(data_dir=data_dir, mesh=mesh, mdns=False, interface="127.0.0.1",
              static_peers=(ctrl,), transports=("tcp",)) as nd, \
            Subscriber(nd, topic, start=Start.new()) as sub:
        q.put(("ready", os.getpid()))
        got, t_last = 0, 0.0
        deadline = time.monotonic() + 120
        while got < n and time.monotonic() < deadline:
            batch = sub.recv_batch(timeout=IDLE_S)
            if not batch:
                break
            got += sum(1 for ev in batch if ev.type != "w")
            t_last = time.monotonic()
        q.put(("done", (got, t_last, rss_mib(), rss_mib("self", "VmHWM"))))


def fanout(topics: int, subs: int, n: int) -> dict[str, Any]:
    """N events over `topics` streams to `subs` subscriber processes (prefix subscription)."""
    from mesh.log import FsyncPolicy, LogConfig
    from mesh.node import Node
    from patterns.pubsub import Publisher
    root = tempfile.mkdtemp(prefix="zmscale")
    mesh = f"scale{os.getpid()}{time.monotonic_ns()}"
    rss0 = rss_mib()
    try:
        with Node(data_dir=f"{root}/p", mesh=mesh, mdns=False, interface="127.0.0.1",
                  transports=("tcp",)) as nd:
            cfg = LogConfig(fsync=FsyncPolicy.interval(10.0))
            pubs = [Publisher(nd, f"t.{i}", durable=True, log_config=cfg) for i in range(topics)]
            ctrl = next(e for e in nd.info().endpoints["control"] if e.startswith("tcp"))
            spawn = mp.get_context("spawn")
            q: Any = spawn.Queue()
            procs = [spawn.Process(target=_sub_proc, args=(ctrl, mesh, "t.", n, q,
                                                           f"{root}/s{k}"))
                     for k in range(subs)]
            for p in procs:
                p.start()
            for _ in procs:
                kind, _pid = q.get(timeout=60)
                assert kind == "ready"
            # Warm-up until every subscriber surely has every stream (slow joiner).
            end = time.monotonic() + 1.0 + 0.02 * topics
            while time.monotonic() < end:
                for pub in pubs:
                    pub.publish(0, type="w")
                time.sleep(0.01)
            chunk = [b"x" * 100] * 100
            t0 = time.monotonic()
            for i in range(n // 100):
                pubs[i % topics].publish_many(chunk, type="m")
            res = [q.get(timeout=180)[1] for _ in procs]
            for p in procs:
                p.join(10)
            pub_rss = rss_mib()
            for pub in pubs:
                pub.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    got = sum(r[0] for r in res)
    t_last = max(r[1] for r in res)
    return {"topics": topics, "subscribers": subs, "events": n, "delivered": got,
            "deliveries_per_s": got / max(1e-9, t_last - t0),
            "per_sub_per_s": got / subs / max(1e-9, t_last - t0),
            "publisher_rss_delta_mib": round(pub_rss - rss0, 1),
            "subscriber_rss_mib": round(max(r[2] for r in res), 1),
            "subscriber_hwm_mib": round(max(r[3] for r in res), 1)}


# --- large log ----------------------------------------------------------------------------------

def _log_proc(path: str, records: int, q: Any) -> None:
    from mesh.log import FsyncPolicy, Log, LogConfig
    out: dict[str, Any] = {"records": records, "rss_start_mib": round(rss_mib(), 1)}
    chunk = [b"r" * 100] * 1000
    t = time.perf_counter()
    with Log.open(path, config=LogConfig(fsync=FsyncPolicy.never())) as log:
        for _ in range(records // 1000):
            log.append_many(chunk)
        log.flush(sync=True)
    out["append_s"] = round(time.perf_counter() - t, 2)
    out["rss_after_append_mib"] = round(rss_mib(), 1)
    out["disk_mib"] = round(sum(os.path.getsize(os.path.join(dp, f))
                                for dp, _, fs in os.walk(path) for f in fs) / 2**20, 1)
    t = time.perf_counter()
    log = Log.open(path, config=LogConfig(fsync=FsyncPolicy.never()))
    out["reopen_s"] = round(time.perf_counter() - t, 3)
    out["rss_after_open_mib"] = round(rss_mib(), 1)
    t = time.perf_counter()
    off, total = 0, 0
    while True:
        first, pls = log.read_batch_payloads(off, 10000)
        if not pls:
            break
        total += len(pls)
        off = first + len(pls)
    dt = time.perf_counter() - t
    log.close()
    out.update(replayed=total, replay_s=round(dt, 2), replay_per_s=total / dt,
               rss_after_replay_mib=round(rss_mib(), 1), peak_rss_mib=round(
                   rss_mib("self", "VmHWM"), 1))
    q.put(out)


def large_log(records: int) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="zmscale-log")
    try:
        spawn = mp.get_context("spawn")
        q: Any = spawn.Queue()
        p = spawn.Process(target=_log_proc, args=(f"{root}/log", records, q))
        p.start()
        out: dict[str, Any] = q.get(timeout=1800)
        p.join(30)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- 50 nodes -----------------------------------------------------------------------------------

def _nodes_proc(k: int, count: int, mesh: str, seed: str, root: str, total: int, q: Any,
                go: Any, idle_s: float) -> None:
    from mesh.node import Node
    nodes = [Node(data_dir=f"{root}/n{k}-{i}", name=f"n{k}-{i}", mesh=mesh, mdns=False,
                  interface="127.0.0.1", transports=("tcp",), static_peers=(seed,))
             for i in range(count)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(len([r for r in nd.peers.list()]) >= total - 1 for nd in nodes):
                break
            time.sleep(0.02)
        seen = min(len(nd.peers.list()) for nd in nodes)
        q.put(("joined", k, time.monotonic(), seen))
        go.wait(180)  # all processes joined: measure the idle window together
        c0 = [nd.stats() for nd in nodes]
        t0 = time.monotonic()
        time.sleep(idle_s)
        c1 = [nd.stats() for nd in nodes]
        dt = time.monotonic() - t0
        outs = [(b.get("control_out", 0) - a.get("control_out", 0)) / dt
                for a, b in zip(c0, c1, strict=True)]
        ins = [(b.get("control_in", 0) - a.get("control_in", 0)) / dt
               for a, b in zip(c0, c1, strict=True)]
        bytes_out = [(b.get("control_bytes_out", 0) - a.get("control_bytes_out", 0)) / dt
                     for a, b in zip(c0, c1, strict=True)]
        q.put(("idle", k, outs, ins, rss_mib(), bytes_out))
    finally:
        for nd in nodes:
            nd.close()


def mesh_nodes(total: int = 50, procs: int = 5, idle_s: float = 10.0) -> dict[str, Any]:
    """`total` nodes in `procs` processes plus a seed in this one; join time, idle traffic."""
    from mesh.node import Node
    root = tempfile.mkdtemp(prefix="zmscale-mesh")
    mesh = f"scale{os.getpid()}{time.monotonic_ns()}"
    try:
        with Node(data_dir=f"{root}/seed", name="seed", mesh=mesh, mdns=False,
                  interface="127.0.0.1", transports=("tcp",)) as seed:
            ep = seed.info().endpoints["control"][0]
            spawn = mp.get_context("spawn")
            q: Any = spawn.Queue()
            go = spawn.Event()
            per = (total - 1) // procs
            counts = [per + (1 if i < (total - 1) % procs else 0) for i in range(procs)]
            t0 = time.monotonic()
            ps = [spawn.Process(target=_nodes_proc, args=(k, c, mesh, ep, root, total, q, go,
                                                          idle_s))
                  for k, c in enumerate(counts)]
            for p in ps:
                p.start()
            joined = [q.get(timeout=200) for _ in ps]
            t_join = max(j[2] for j in joined) - t0
            min_seen = min(j[3] for j in joined)
            go.set()
            idle = [q.get(timeout=120) for _ in ps]
            for p in ps:
                p.join(30)
            outs = [x for i in idle for x in i[2]]
            ins = [x for i in idle for x in i[3]]
            bout = [x for i in idle for x in i[5]]
            return {"nodes": total, "processes": procs + 1,
                    "all_joined_s": round(t_join, 2), "min_peers_seen": min_seen,
                    "idle_window_s": idle_s,
                    "control_out_per_node_per_s": round(sum(outs) / len(outs), 1),
                    "control_in_per_node_per_s": round(sum(ins) / len(ins), 1),
                    "max_out_per_node_per_s": round(max(outs), 1),
                    "control_bytes_out_per_node_per_s": round(sum(bout) / len(bout)),
                    "rss_per_process_of_10_nodes_mib": round(max(i[4] for i in idle), 1),
                    "note": "includes process start and imports (about 1 s per process)"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- driver -------------------------------------------------------------------------------------

def run_scaling(quick: bool = False, log_records: int | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every scaling test; a dict of sections (lists of dicts). Errors are kept per section."""
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    n = 20_000 if quick else 100_000
    out: dict[str, Any] = {"topics": [], "subscribers": [], "log": None, "mesh": None,
                           "errors": {}}
    for t in (1, 10, 100):
        say(f"scaling topics={t}")
        try:
            out["topics"].append(fanout(t, 1, n))
        except Exception as exc:
            out["errors"][f"topics={t}"] = f"{type(exc).__name__}: {exc}"
    for s in (1, 2, 4, 8):
        say(f"scaling subscribers={s}")
        try:
            out["subscribers"].append(fanout(1, s, n // 2))
        except Exception as exc:
            out["errors"][f"subscribers={s}"] = f"{type(exc).__name__}: {exc}"
    recs = log_records or (1_000_000 if quick else 10_000_000)
    say(f"scaling log of {recs:,} records")
    try:
        out["log"] = large_log(recs)
    except Exception as exc:
        out["errors"]["log"] = f"{type(exc).__name__}: {exc}"
    say("scaling 50 nodes")
    try:
        out["mesh"] = mesh_nodes(50, 5, 5.0 if quick else 10.0)
    except Exception as exc:
        out["errors"]["mesh"] = f"{type(exc).__name__}: {exc}"
    return out


def report(s: dict[str, Any]) -> str:
    """Markdown tables of a run_scaling() result."""
    lines = ["Scaling: topics and subscribers (durable, 100 B, publish_many(100), tcp)", "",
             "| topics | subscribers | events | delivered | deliveries/s | per subscriber/s "
             "| publisher RSS growth MiB | subscriber RSS MiB (peak) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["topics"] + s["subscribers"]:
        lines.append(f"| {r['topics']} | {r['subscribers']} | {r['events']:,} | "
                     f"{r['delivered']:,} | {r['deliveries_per_s']:,.0f} | "
                     f"{r['per_sub_per_s']:,.0f} | {r['publisher_rss_delta_mib']} | "
                     f"{r['subscriber_rss_mib']} ({r['subscriber_hwm_mib']}) |")
    if s.get("log"):
        g = s["log"]
        lines += ["", f"Large log: {g['records']:,} records of 100 B ({g['disk_mib']} MiB on "
                  "disk)", "",
                  "| append (s) | re-open / restart (s) | RSS after open MiB | replay (s) "
                  "| replay rec/s | RSS after replay MiB | peak RSS MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {g['append_s']} | {g['reopen_s']} | {g['rss_after_open_mib']} | "
                  f"{g['replay_s']} | {g['replay_per_s']:,.0f} | {g['rss_after_replay_mib']} "
                  f"| {g['peak_rss_mib']} |"]
    if s.get("mesh"):
        m = s["mesh"]
        lines += ["", f"Mesh of {m['nodes']} nodes in {m['processes']} processes (seed + "
                  "gossip, no mDNS)", "",
                  "| all joined (s) | min peers seen | control msgs out /node/s (idle) "
                  "| in /node/s | max out /node/s | control bytes out /node/s "
                  "| RSS per process of 10 nodes MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {m['all_joined_s']} | {m['min_peers_seen']} | "
                  f"{m['control_out_per_node_per_s']} | {m['control_in_per_node_per_s']} | "
                  f"{m['max_out_per_node_per_s']} | "
                  f"{m['control_bytes_out_per_node_per_s']:,} | "
                  f"{m['rss_per_process_of_10_nodes_mib']} |"]
    if s.get("errors"):
        lines += ["", f"errors: {s['errors']}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--log-records", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    res = run_scaling(a.quick, a.log_records)
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
