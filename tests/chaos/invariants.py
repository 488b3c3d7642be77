"""The invariants checked after a chaos run, from the role files and the harness's samples.

Each check returns a list of violations (strings); :func:`check` runs them all. The rules,
and why each one is stated the way it is, are in docs/architecture.md.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.harness import ROLES, STORE_ROLES, RunResult, read_jsonl

#: Resource bounds per process (the mesh's processes sit near 20-40 fds and 40-60 MiB).
MAX_FDS = 256
MAX_RSS_KB = 400 * 1024
#: Growth allowed within one incarnation, from its first to its last second of samples.
FD_GROWTH = 32
RSS_GROWTH_KB = 96 * 1024


@dataclass
class Report:
    """The outcome of the checks: violations fail the run, facts are printed."""

    violations: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


def _lines(run_dir: Path, role: str) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "out" / f"{role}.jsonl")


def acked_publishes(run_dir: Path) -> dict[tuple[str, int], str]:
    """(stream, seq) -> data of every publish that returned and is still in the publisher's
    log: a ``lost_tail`` fault (a power cut) takes the acknowledged seqs from its cut on, and
    the next incarnation assigns them again, to other events (under a new writer epoch)."""
    acked: dict[tuple[str, int], str] = {}
    for role in ROLES:
        if not role.startswith("pub"):
            continue
        for e in _lines(run_dir, role):
            if e["ev"] == "ack":
                pid, i0 = e["d0"].rsplit("-", 1)
                for k in range(e["n"]):
                    acked[("chaos." + role, e["first"] + k)] = f"{pid}-{int(i0) + k}"
            elif e["ev"] == "lost_tail":
                for key in [k for k in acked if k[0] == e["stream"] and k[1] >= e["from"]]:
                    del acked[key]
    return acked


def lost_by_power_cuts(run_dir: Path) -> int:
    """How many acknowledged publishes ``lost_tail`` faults took (reported, not restored)."""
    n = 0
    for role in ROLES:
        if role.startswith("pub"):
            live: set[int] = set()
            for e in _lines(run_dir, role):
                if e["ev"] == "ack":
                    live.update(range(e["first"], e["first"] + e["n"]))
                elif e["ev"] == "lost_tail":
                    gone = {q for q in live if q >= e["from"]}
                    n += len(gone)
                    live -= gone
    return n


def delivered_view(run_dir: Path, sub: str) -> tuple[dict[str, list[tuple[int, str, str]]],
                                                       list[str], int, int]:
    """What ``sub`` ends up holding per stream, replaying its output in order: events
    (deduplicated by id: at-least-once redelivery after its own restarts), and every
    ``StreamReset`` notice taking back the seqs from its ``resume`` on (the publisher's log
    lost them). Returns (view, violations, deliveries, resets)."""
    view: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    stream_of: dict[str, str] = {}
    bad: list[str] = []
    deliveries = resets = 0
    for e in _lines(run_dir, sub):
        if e["ev"] == "gap":
            if e["reason"] == "lost":
                resets += 1
                rows = view[e["s"]]
                while rows and rows[-1][0] >= e["resume"]:
                    seen[e["s"]].discard(rows.pop()[1])
            else:
                bad.append(f"{sub}: unexpected gap notice {e}")
            continue
        if e["ev"] != "got":
            continue
        deliveries += 1
        s, q, eid = e["s"], e["q"], e["id"]
        if stream_of.setdefault(eid, s) != s:
            bad.append(f"{sub}: event {eid} delivered on two streams")
        if eid in seen[s]:
            continue  # redelivered after a restart of the subscriber
        rows = view[s]
        if q != (rows[-1][0] + 1 if rows else 0):
            bad.append(f"{sub}: {s} out of order or with a hole: seq {q} after "
                       f"{rows[-1][0] if rows else None}")
            continue
        seen[s].add(eid)
        rows.append((q, eid, e["d"]))
    return view, bad, deliveries, resets


def pubsub_complete(run_dir: Path, sub: str) -> bool:
    """Has ``sub`` received every acknowledged publish (used to know the drain is over)?"""
    view, _, _, _ = delivered_view(run_dir, sub)
    have = {(s, q): d for s, rows in view.items() for q, _id, d in rows}
    return all(have.get(k) == d for k, d in acked_publishes(run_dir).items())


def check_pubsub(run_dir: Path, subs: list[str], rep: Report) -> None:
    acked = acked_publishes(run_dir)
    rep.facts["acked_publishes"] = len(acked)
    rep.facts["acked_lost_by_power_cuts"] = lost_by_power_cuts(run_dir)
    for sub in subs:
        view, bad, deliveries, resets = delivered_view(run_dir, sub)
        rep.violations.extend(bad)
        rep.facts[f"{sub}_deliveries"] = deliveries
        rep.facts[f"{sub}_resets"] = resets
        have = {(s, q): d for s, rows in view.items() for q, _id, d in rows}
        rep.facts[f"{sub}_duplicates"] = deliveries - len(have)
        missing = [k for k in acked if k not in have]
        if missing:
            rep.violations.append(f"{sub}: {len(missing)} acknowledged publishes never "
                                  f"delivered, e.g. {sorted(missing)[:5]}")
        wrong = [k for k, d in acked.items() if k in have and have[k] != d]
        if wrong:
            rep.violations.append(f"{sub}: {len(wrong)} delivered with other data than "
                                  f"published (a seq reused silently?), e.g. {wrong[:3]}")


def check_clock(run_dir: Path, rep: Report) -> None:
    """After a clock jump forward and back, the publisher's newest records carry real time."""
    for role in ROLES:
        if not role.startswith("pub"):
            continue
        lines = _lines(run_dir, role)
        finals = [e for e in lines if e["ev"] == "final"]
        starts = [e for e in lines if e["ev"] == "start"]
        if finals and starts and finals[-1].get("head") == starts[-1].get("head"):
            # The last incarnation (real clock) wrote nothing: the newest record is an earlier
            # one's, maybe from the skewed incarnation. Nothing to judge (not a violation).
            rep.facts[f"{role}_clock_check"] = "no record since the last restart"
            continue
        if finals and finals[-1].get("last_ts_ns") is not None:
            skew = abs(finals[-1]["last_ts_ns"] - finals[-1]["now_ns"]) / 1e9
            rep.facts[f"{role}_last_record_clock_skew_s"] = round(skew, 3)
            if skew > 30:
                rep.violations.append(f"{role}: newest log record is {skew:.0f} s off the "
                                      "clock (timestamps frozen by a past clock jump?)")


def check_pipeline(run_dir: Path, rep: Report) -> None:
    """Every task pushed and still in the task log is acked (executed) or, for the always
    failing ones, dead-lettered; tasks are known by payload (unique per producer
    incarnation), because a ``lost_tail`` fault (a power cut of ``.tasks``) hands their ids
    out again to new tasks."""
    prod = _lines(run_dir, "producer")
    owed: dict[int, str] = {}  # task id -> payload, for the task log's current lineage
    lost = 0
    for e in prod:
        if e["ev"] == "pushed":
            for k, p in enumerate(e.get("ps") or []):
                owed[e["first"] + k] = p
        elif e["ev"] == "lost_tail" and e["stream"].endswith(".tasks"):
            gone = [t for t in owed if t >= e["from"]]
            lost += len(gone)
            for t in gone:
                del owed[t]
    execs: Counter[str] = Counter()
    for role in ROLES:
        if role.startswith(("worker", "poolworker")):
            execs.update(e["p"] for e in _lines(run_dir, role) if e["ev"] == "exec")
    drained = [e for e in prod if e["ev"] == "drained"]
    rep.facts["tasks_pushed"] = len(owed)
    rep.facts["tasks_lost_by_power_cuts"] = lost
    rep.facts["tasks_executed_more_than_once"] = sum(1 for n in execs.values() if n > 1)
    if not drained:
        rep.violations.append("producer never reported its drained state")
        return
    last = drained[-1]
    if not last["idle"]:
        rep.violations.append(f"work queue not idle at the end: {last['stats']}")
    dlq = {d["p"]: d for d in last["dlq"]}
    rep.facts["dlq_entries"] = len(dlq)
    for tid, p in sorted(owed.items()):
        if p.startswith("fail"):
            if p in execs:
                rep.violations.append(f"task {tid} ({p}) always fails but was executed")
            if p not in dlq:
                rep.violations.append(f"failing task {tid} ({p}) is not in the DLQ")
        elif p not in execs and p not in dlq:
            rep.violations.append(f"task {tid} ({p}) was pushed but neither acked nor "
                                  "dead-lettered")
    for p, d in dlq.items():
        if not d["history"] or d["deliveries"] < 1:
            rep.violations.append(f"DLQ entry of task {d['task']} has no delivery history: {d}")
        if not p.startswith("fail"):
            rep.facts.setdefault("ok_tasks_dead_lettered", []).append(d["task"])
    if last["stats"].get("unacked", 0) != 0:
        rep.violations.append(f"queue still owes {last['stats'].get('unacked')} tasks")


def check_reqrep(run_dir: Path, result: RunResult, rep: Report) -> None:
    client = _lines(run_dir, "client")
    oks = [e for e in client if e["ev"] == "ok"]
    rep.facts["requests_ok"] = len(oks)
    rep.facts["requests_failed"] = sum(1 for e in client if e["ev"] == "err")
    if any(not e["match"] for e in oks):
        rep.violations.append("a reply did not match its request")
    # Executions are counted per request id across every responder and every incarnation of
    # each (a killed responder restarts on the same data dir): a request runs at most once,
    # and one that was answered ran exactly once. A responder that dies (kill) or is taken for
    # dead (presence LEFT during stop / stall / partition) while holding a request makes it
    # fail with OutcomeUnknown at the client; it is never sent to a second responder.
    execs: Counter[str] = Counter()
    for r in ROLES:
        if r.startswith("resp"):
            execs.update(e["id"] for e in _lines(run_dir, r) if e["ev"] == "exec")
    twice = sorted(i for i, n in execs.items() if n > 1)
    rep.facts["requests_executed"] = len(execs)
    rep.facts["requests_executed_twice"] = len(twice)
    rep.facts["requests_outcome_unknown"] = sum(
        1 for e in client if e["ev"] == "err" and e["error"] == "OutcomeUnknown")
    if twice:
        rep.violations.append(f"{len(twice)} requests executed more than once: {twice[:5]}")
    unrun = [e["id"] for e in oks if execs[e["id"]] != 1]
    if unrun:
        rep.violations.append(f"{len(unrun)} answered requests have no execution: {unrun[:5]}")


def check_resources(result: RunResult, rep: Report) -> None:
    by_inc: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for s in result.samples:
        by_inc[(s.role, s.pid)].append(s)
    worst_fd = max((s.fds for s in result.samples), default=0)
    worst_rss = max((s.rss_kb for s in result.samples), default=0)
    rep.facts["max_fds"] = worst_fd
    rep.facts["max_rss_mib"] = round(worst_rss / 1024, 1)
    for (role, pid), ss in by_inc.items():
        if max(s.fds for s in ss) > MAX_FDS:
            rep.violations.append(f"{role} (pid {pid}) held {max(s.fds for s in ss)} fds")
        if max(s.rss_kb for s in ss) > MAX_RSS_KB:
            rep.violations.append(f"{role} (pid {pid}) RSS {max(s.rss_kb for s in ss)} KiB")
        # Its life counts from its node being open (the first sample with more fds than the
        # interpreter started with: the ZeroMQ context and sockets), not from the exec: on
        # busy cores the imports alone can take a good part of a short incarnation.
        up = next((s.t for s in ss if s.fds > ss[0].fds + 4), ss[0].t)
        life = ss[-1].t - up
        if life < 8:
            continue  # too short-lived to judge a trend
        # Baseline: the second quarter of that life (sockets and buffers have settled); a
        # leak shows as growth from there to the last second.
        first = [s for s in ss if 0.25 * life <= s.t - up <= 0.5 * life]
        lastw = [s for s in ss if ss[-1].t - s.t < 1]
        if min(s.fds for s in lastw) > max(s.fds for s in first) + FD_GROWTH:
            rep.violations.append(f"{role} (pid {pid}) fds grew {max(s.fds for s in first)} "
                                  f"-> {min(s.fds for s in lastw)}")
        if min(s.rss_kb for s in lastw) > max(s.rss_kb for s in first) + RSS_GROWTH_KB:
            rep.violations.append(f"{role} (pid {pid}) RSS grew {max(s.rss_kb for s in first)}"
                                  f" -> {min(s.rss_kb for s in lastw)} KiB")


def check_stores(run_dir: Path, rep: Report) -> None:
    """Replica stores (patterns/pubsub/store.py): a store SIGKILLed at any point holds, when it
    starts again, everything an earlier incarnation said was durable (acked), unless its own
    copy of the origin's epoch history says the origin took those seqs back; and after the
    drain every store holds exactly what each publisher's log holds, byte for byte."""
    from mesh.log import LogConfig, LogDirectory
    from mesh.log.epochs import EpochHistory
    from patterns.pubsub.store import _Replica
    reopens = 0
    for store in STORE_ROLES:
        durable: dict[tuple[str, str], tuple[int, int]] = {}
        for e in _lines(run_dir, store):
            key = (e.get("origin", ""), e.get("s", ""))
            if e["ev"] == "durable":
                durable[key] = (e["epoch"], e["q"])
            elif e["ev"] == "reopened":
                reopens += 1
                if key in durable:
                    epoch, q = durable[key]
                    need = EpochHistory([tuple(x) for x in e["epochs"]]).divergence(epoch, q)
                    if (e["head"] or 0) < need:
                        rep.violations.append(
                            f"{store} restarted holding {key[1]} up to {e['head']}, but had "
                            f"said {q} (epoch {epoch}) was durable")
        root = run_dir / "data" / store / "replicas"
        for pub in [r for r in ROLES if r.startswith("pub")]:
            stream = f"chaos.{pub}"
            origin = (run_dir / "data" / pub / "node.id").read_text().strip()
            log = LogDirectory(run_dir / "data" / pub).open(stream, readonly=True)
            try:
                want = _all(log.read_batch_payloads, 0, log.next_offset)
            finally:
                log.close()
            if not (root / origin).is_dir():
                rep.violations.append(f"{store} holds nothing of {stream}")
                continue
            r = _Replica(root, origin, stream, LogConfig())
            try:
                got = _all(r.read, r.oldest or 0, r.head or 0)
            finally:
                r.close()
            if got != want:
                diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=False))
                             if a != b), min(len(got), len(want)))
                rep.violations.append(f"{store}'s copy of {stream} differs from the "
                                      f"publisher's log from seq {diff} ({len(got)} vs "
                                      f"{len(want)} events)")
            rep.facts[f"{store}_{pub}_events"] = len(got)
    rep.facts["store_reopens"] = reopens


def _all(read: Any, start: int, end: int) -> list[bytes]:
    out: list[bytes] = []
    seq = start
    while seq < end:
        first, envs = read(seq, 5000)
        if not envs:
            break
        out.extend(envs)
        seq = first + len(envs)
    return out


def check_health(run_dir: Path, result: RunResult, subs: list[str], rep: Report) -> None:
    if not result.drained:
        rep.violations.append("the mesh did not drain within the deadline")
    for role, rc in result.exit_codes.items():
        if rc != 0:
            rep.violations.append(f"{role} did not exit cleanly at the end (rc {rc})")
    for role in ["hub", *ROLES, *STORE_ROLES]:
        fin = [e for e in _lines(run_dir, role) if e["ev"] == "final"]
        if not fin:
            rep.violations.append(f"{role} wrote no final report")
            continue
        f = fin[-1]
        if f["peers_joined"] < 1:
            rep.violations.append(f"{role} ends with no live peer: {f['node']}")
        if f["node"].get("reactor_errors"):
            rep.violations.append(f"{role} reactor errors: {f['node']['reactor_errors']}")
        if role in subs and f["lag"] != 0:
            rep.violations.append(f"{role} ends with lag {f['lag']}")
    for role in ROLES:
        if role.startswith("pub"):
            dr = [e for e in _lines(run_dir, role) if e["ev"] == "drained"]
            if not dr or any(dr[-1]["lag"].get(s, 1) != 0 for s in subs):
                rep.violations.append(f"{role}: durable subscribers' lag not back to zero: "
                                      f"{dr[-1]['lag'] if dr else 'no drained report'}")


def check(result: RunResult, subs: list[str]) -> Report:
    """Run every invariant on a finished run."""
    rep = Report()
    run_dir = result.run_dir
    check_pubsub(run_dir, subs, rep)
    check_clock(run_dir, rep)
    check_pipeline(run_dir, rep)
    check_reqrep(run_dir, result, rep)
    check_resources(result, rep)
    check_stores(run_dir, rep)
    check_health(run_dir, result, subs, rep)
    return rep
