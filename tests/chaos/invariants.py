"""The invariants checked after a chaos run, from the role files and the harness's samples.

Each check returns a list of violations (strings); :func:`check` runs them all. The rules,
and why each one is stated the way it is, are in docs/architecture.md.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.harness import ROLES, RunResult, read_jsonl

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
    """(stream, seq) -> data of every publish that returned (all incarnations)."""
    acked: dict[tuple[str, int], str] = {}
    for role in ROLES:
        if not role.startswith("pub"):
            continue
        for e in _lines(run_dir, role):
            if e["ev"] == "ack":
                pid, i0 = e["d0"].rsplit("-", 1)
                for k in range(e["n"]):
                    acked[("chaos." + role, e["first"] + k)] = f"{pid}-{int(i0) + k}"
    return acked


def pubsub_complete(run_dir: Path, sub: str) -> bool:
    """Has ``sub`` received every acknowledged publish (used to know the drain is over)?"""
    got = {(e["s"], e["q"]) for e in _lines(run_dir, sub) if e["ev"] == "got"}
    return set(acked_publishes(run_dir)) <= got


def check_pubsub(run_dir: Path, subs: list[str], rep: Report) -> None:
    acked = acked_publishes(run_dir)
    rep.facts["acked_publishes"] = len(acked)
    for sub in subs:
        got = [e for e in _lines(run_dir, sub) if e["ev"] == "got"]
        rep.facts[f"{sub}_deliveries"] = len(got)
        data: dict[tuple[str, int], str] = {}
        seq_of_id: dict[str, tuple[str, int]] = {}
        order: dict[str, list[int]] = defaultdict(list)
        for e in got:
            key = (e["s"], e["q"])
            if data.setdefault(key, e["d"]) != e["d"]:
                rep.violations.append(f"{sub}: {key} delivered with two payloads")
            if seq_of_id.setdefault(e["id"], key) != key:
                rep.violations.append(f"{sub}: event {e['id']} delivered as two (stream, seq)")
        # Per-stream order after dedup by event id: strictly increasing, no hole from 0.
        seen: set[str] = set()
        for e in got:
            if e["id"] in seen:
                continue
            seen.add(e["id"])
            order[e["s"]].append(e["q"])
        rep.facts[f"{sub}_duplicates"] = len(got) - len(seen)
        for stream, seqs in order.items():
            if seqs != list(range(len(seqs))):
                bad = next(i for i, s in enumerate(seqs) if s != i)
                rep.violations.append(f"{sub}: {stream} out of order or with a hole after "
                                      f"dedup at position {bad}: {seqs[max(0, bad - 2):bad + 3]}")
        missing = [k for k in acked if k not in data]
        if missing:
            rep.violations.append(f"{sub}: {len(missing)} acknowledged publishes never "
                                  f"delivered, e.g. {sorted(missing)[:5]}")
        wrong = [k for k, d in acked.items() if k in data and data[k] != d]
        if wrong:
            rep.violations.append(f"{sub}: {len(wrong)} delivered with other data than "
                                  f"published, e.g. {wrong[:3]}")


def check_pipeline(run_dir: Path, rep: Report) -> None:
    prod = _lines(run_dir, "producer")
    pushed: set[int] = set()
    fails: set[int] = set()
    for e in prod:
        if e["ev"] == "pushed":
            pushed.update(range(e["first"], e["first"] + e["n"]))
            fails.update(e["fail"])
    execs: Counter[int] = Counter()
    for role in ROLES:
        if role.startswith("worker"):
            execs.update(e["id"] for e in _lines(run_dir, role) if e["ev"] == "exec")
    drained = [e for e in prod if e["ev"] == "drained"]
    rep.facts["tasks_pushed"] = len(pushed)
    rep.facts["tasks_executed_more_than_once"] = sum(1 for n in execs.values() if n > 1)
    if not drained:
        rep.violations.append("producer never reported its drained state")
        return
    last = drained[-1]
    if not last["idle"]:
        rep.violations.append(f"work queue not idle at the end: {last['stats']}")
    dlq = {d["task"]: d for d in last["dlq"]}
    rep.facts["dlq_entries"] = len(dlq)
    for tid in sorted(pushed):
        if tid in fails:
            if tid in execs:
                rep.violations.append(f"task {tid} always fails but was executed")
            if tid not in dlq:
                rep.violations.append(f"failing task {tid} is not in the DLQ")
        elif tid not in execs and tid not in dlq:
            rep.violations.append(f"task {tid} was pushed but neither acked nor dead-lettered")
    for tid, d in dlq.items():
        if not d["history"] or d["deliveries"] < 1:
            rep.violations.append(f"DLQ entry of task {tid} has no delivery history: {d}")
        if tid not in fails:
            rep.facts.setdefault("ok_tasks_dead_lettered", []).append(tid)
    if last["stats"].get("unacked", 0) != 0:
        rep.violations.append(f"queue still owes {last['stats'].get('unacked')} tasks")


def check_reqrep(run_dir: Path, result: RunResult, rep: Report) -> None:
    client = _lines(run_dir, "client")
    oks = [e for e in client if e["ev"] == "ok"]
    rep.facts["requests_ok"] = len(oks)
    rep.facts["requests_failed"] = sum(1 for e in client if e["ev"] == "err")
    if any(not e["match"] for e in oks):
        rep.violations.append("a reply did not match its request")
    per_resp = {r: Counter(e["id"] for e in _lines(run_dir, r) if e["ev"] == "exec")
                for r in ROLES if r.startswith("resp")}
    for r, c in per_resp.items():
        twice = [i for i, n in c.items() if n > 1]
        if twice:
            rep.violations.append(f"{r} executed {len(twice)} requests twice, e.g. {twice[:3]}")
    both = set.intersection(*(set(c) for c in per_resp.values())) if per_resp else set()
    rep.facts["requests_run_on_both_responders"] = len(both)
    # Across responders a request may run again only when the one running it was lost
    # (killed, frozen, cut off) before its reply arrived: at most its concurrency (2) per fault.
    resp_faults = sum(1 for f in result.schedule if f.target.startswith("resp")
                      and f.kind in ("kill", "stop", "stall", "cut", "partition"))
    if len(both) > 2 * resp_faults:
        rep.violations.append(f"{len(both)} requests executed on both responders with only "
                              f"{resp_faults} responder faults: {sorted(both)[:5]}")


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
        life = ss[-1].t - ss[0].t
        if life < 8:
            continue  # too short-lived to judge a trend
        # Baseline: the second quarter of its life (imports and sockets have settled, which
        # takes seconds on busy cores); a leak shows as growth from there to the last second.
        first = [s for s in ss if 0.25 * life <= s.t - ss[0].t <= 0.5 * life]
        lastw = [s for s in ss if ss[-1].t - s.t < 1]
        if min(s.fds for s in lastw) > max(s.fds for s in first) + FD_GROWTH:
            rep.violations.append(f"{role} (pid {pid}) fds grew {max(s.fds for s in first)} "
                                  f"-> {min(s.fds for s in lastw)}")
        if min(s.rss_kb for s in lastw) > max(s.rss_kb for s in first) + RSS_GROWTH_KB:
            rep.violations.append(f"{role} (pid {pid}) RSS grew {max(s.rss_kb for s in first)}"
                                  f" -> {min(s.rss_kb for s in lastw)} KiB")


def check_health(run_dir: Path, result: RunResult, subs: list[str], rep: Report) -> None:
    if not result.drained:
        rep.violations.append("the mesh did not drain within the deadline")
    for role, rc in result.exit_codes.items():
        if rc != 0:
            rep.violations.append(f"{role} did not exit cleanly at the end (rc {rc})")
    for role in ["hub", *ROLES]:
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
    check_pipeline(run_dir, rep)
    check_reqrep(run_dir, result, rep)
    check_resources(result, rep)
    check_health(run_dir, result, subs, rep)
    return rep
