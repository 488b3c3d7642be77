"""``mesh top``: a live view of the whole mesh, from the nodes' own stats.

Joins the mesh (``--peer``, mDNS, the CURVE options), asks every live peer for its stats over
the control channel (``node.stats``, docs/protocol.md) every ``--interval`` seconds, and draws,
full screen: the nodes and their presence state; the streams with their publish rate and the
lag of each durable subscriber; the queues with depth, in flight and DLQ size; the services
with calls/s and errors. ``q`` or Ctrl-C quits.

``--once`` prints one snapshot and exits (a table, or with ``--json`` one JSON object), after
every node any answering node knows of has answered (or ``--timeout`` passed). Rates need two
snapshots of a node, so ``--once`` reports them as null. ``--json`` without ``--once`` prints
one such object per line every ``--interval`` seconds until Ctrl-C (no terminal needed). Under CURVE a node answers only peers
permitted ``observe`` (its refusal shows as ``forbidden``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from mesh.cli._node_opts import add_node_args, open_node, positive_seconds
from mesh.errors import ConfigError, MeshTimeout

#: The smallest terminal the view is drawn in (smaller: a line saying so).
MIN_COLS, MIN_ROWS = 60, 8


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``top``."""
    p = subparsers.add_parser("top", help="a live view of the mesh: nodes, streams, queues, "
                              "services", description=__doc__)
    add_node_args(p, one_shot=False)
    p.add_argument("--interval", type=positive_seconds, default=2.0,
                   help="seconds between stats requests to each node")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot and exit (text, or one JSON object with --json)")
    p.add_argument("--timeout", type=positive_seconds, default=5.0,
                   help="--once: seconds to wait for the nodes' answers")
    p.set_defaults(func=cmd_top)


# --- the view: pure data from the replies ----------------------------------------------------


def _samples(body: dict[str, Any], name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one family, as far as they have the documented shape (a reply is the
    answering node's word: anything else in it is skipped, never trusted to be well-formed)."""
    fam = body.get("metrics", {}).get(name)
    samples = fam.get("samples") if isinstance(fam, dict) else None
    if not isinstance(samples, list):
        return []
    out = []
    for s in samples:
        if not isinstance(s, dict):
            continue
        lab, v = s.get("labels"), s.get("value")
        if isinstance(lab, dict) and all(isinstance(k, str) and isinstance(x, str)
                                         for k, x in lab.items()) and \
                isinstance(v, int | float) and not isinstance(v, bool) and v == v and \
                abs(v) != float("inf"):
            out.append((lab, float(v)))
    return out


def _value(body: dict[str, Any], name: str, /, **labels: str) -> float | None:
    total = None
    for lab, v in _samples(body, name):
        if all(lab.get(k) == want for k, want in labels.items()):
            total = (total or 0.0) + v
    return total


def _rate(cur: dict[str, Any], prev: dict[str, Any] | None, name: str, /,
          **labels: str) -> float | None:
    """Per second between two replies of one node (by its own uptime clock), or None."""
    if prev is None:
        return None
    dt = float(cur.get("uptime_s", 0)) - float(prev.get("uptime_s", 0))
    a, b = _value(prev, name, **labels), _value(cur, name, **labels)
    if dt <= 0 or a is None or b is None or b < a:
        return None
    return (b - a) / dt


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def build_view(self_id: str, self_name: str, mesh: str, records: list[Any],
               latest: dict[str, Any], previous: dict[str, Any],
               stale_after: float | None = None) -> dict[str, Any]:
    """The whole view as plain data (what ``--json`` prints).

    ``records``: this node's peer table rows; ``latest`` / ``previous``: node id -> the last
    and the one before (a :class:`mesh.observe.StatsReply`), for rates. A node whose last
    answer is older than ``stale_after`` seconds shows ``stats: "stale"`` (its numbers are
    still the last it sent; a stopped or overloaded node is not a dead one).
    """
    nodes, streams, queues, services, replicas = [], [], [], [], []
    stream_rows: dict[str, dict[str, Any]] = {}
    names = {r.info.node_id: r.info.name for r in records}
    names[self_id] = self_name
    for rec in sorted(records, key=lambda r: (r.info.name, r.info.node_id)):
        nid = rec.info.node_id
        rep = latest.get(nid)
        row: dict[str, Any] = {"id": nid, "name": rec.info.name, "state": rec.state.value,
                               "stats": "waiting", "uptime_s": None, "peers": None,
                               "truncated": []}
        nodes.append(row)
        if rep is None:
            continue
        if not rep.ok:
            row["stats"] = rep.error
            continue
        body = rep.body
        prev_rep = previous.get(nid)
        prev = prev_rep.body if prev_rep is not None and prev_rep.ok else None
        age = time.monotonic() - rep.received
        row["stats"] = "stale" if stale_after is not None and age > stale_after else "ok"
        row["age_s"] = round(age, 3)
        row["uptime_s"] = round(float(body.get("uptime_s", 0)), 3)
        peers = body.get("peers", [])
        row["peers"] = sum(1 for p in peers if isinstance(p, dict) and p.get("state") == "joined")
        row["truncated"] = list(body.get("truncated", []))
        name = rec.info.name
        for lab, v in _samples(body, "events_published_total"):
            if lab.get("pattern") != "pubsub":
                continue
            st = lab.get("stream", "")
            s = stream_rows.setdefault(st, {"stream": st, "publishers": [], "subscribers": {}})
            s["publishers"].append({
                "node": name, "published": int(v),
                "rate": _rate(body, prev, "events_published_total", stream=st,
                              pattern="pubsub"),
                "head": _int(_value(body, "stream_head", stream=st))})
        for lab, v in _samples(body, "consumer_lag"):
            side, consumer, st = lab.get("side"), lab.get("consumer", ""), lab.get("stream", "")
            if side not in ("subscriber", "publisher") or consumer.startswith("~"):
                continue  # durable subscribers only (an ephemeral one is "~" + its id)
            s = stream_rows.setdefault(st, {"stream": st, "publishers": [], "subscribers": {}})
            e = s["subscribers"].setdefault(consumer, {
                "consumer": consumer, "node": None, "lag": None, "lag_acked": None,
                "lag_subscriber": None, "consumed": None, "rate": None})
            if side == "publisher":  # head - the position it acked: what it still owes
                e["lag_acked"] = int(v) + (e["lag_acked"] or 0)
            else:  # known to exist and not delivered to it yet
                e["node"] = name
                e["lag_subscriber"] = int(v)
                e["consumed"] = _int(_value(body, "events_consumed_total", stream=st,
                                            consumer=consumer, pattern="pubsub"))
                e["rate"] = _rate(body, prev, "events_consumed_total", stream=st,
                                  consumer=consumer, pattern="pubsub")
        for lab, v in _samples(body, "store_replica_head"):
            origin, st = lab.get("origin", ""), lab.get("stream", "")
            replicas.append({
                "stream": st, "origin": origin, "origin_name": names.get(origin),
                "store": name, "head": int(v),
                "lag": _int(_value(body, "store_replica_lag", origin=origin, stream=st))})
        for lab, v in _samples(body, "queue_pending"):
            q = lab.get("queue", "")
            queues.append({
                "queue": q, "node": name, "depth": int(v),
                "inflight": _int(_value(body, "queue_inflight", queue=q)),
                "delayed": _int(_value(body, "queue_delayed", queue=q)),
                "workers": _int(_value(body, "queue_workers", queue=q)),
                "dlq": _int(_value(body, "dlq_events_pending", queue=q)),
                "acked": _int(_value(body, "tasks_acked_total", queue=q)),
                "acked_rate": _rate(body, prev, "tasks_acked_total", queue=q),
                "redeliveries": _int(_value(body, "redeliveries_total", queue=q))})
        for lab, v in _samples(body, "requests_served_total"):
            svc = lab.get("service", "")
            services.append({
                "service": svc, "node": name, "calls": int(v),
                "calls_rate": _rate(body, prev, "requests_served_total", service=svc),
                "errors": int(_value(body, "event_processing_errors_total", kind="reqrep",
                                     name=svc) or 0),
                "errors_rate": _rate(body, prev, "event_processing_errors_total",
                                     kind="reqrep", name=svc),
                "busy": _int(_value(body, "requests_busy_total", service=svc)),
                "running": _int(_value(body, "requests_running", service=svc))})
    for s in stream_rows.values():
        subs = sorted(s["subscribers"].values(), key=lambda e: e["consumer"])
        for e in subs:
            # the lag is what the publishers still hold for it past its acked position; the
            # subscriber's own count (not delivered yet) where no publisher answered
            e["lag"] = e["lag_acked"] if e["lag_acked"] is not None else e["lag_subscriber"]
        s["subscribers"] = subs
        streams.append(s)
    streams.sort(key=lambda s: s["stream"])
    queues.sort(key=lambda q: (q["queue"], q["node"]))
    services.sort(key=lambda s: (s["service"], s["node"]))
    replicas.sort(key=lambda r: (r["stream"], r["origin"], r["store"]))
    return {"time": time.time(), "mesh": mesh, "self": {"id": self_id, "name": self_name},
            "nodes": nodes, "streams": streams, "queues": queues, "services": services,
            "replicas": replicas}


# --- text --------------------------------------------------------------------------------------


def _n(v: Any, rate: bool = False) -> str:
    if v is None:
        return "-"
    if rate:
        return f"{v:.1f}"
    return str(v)


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, h, d = int(s // 60), int(s // 3600), int(s // 86400)
    if s < 3600:
        return f"{m}m{int(s % 60):02d}s"
    return f"{h}h{m % 60:02d}m" if s < 86400 else f"{d}d{h % 24:02d}h"


def _clean(text: str, limit: int = 80) -> str:
    """Printable only (names come from peers: no terminal escapes), at most ``limit`` chars."""
    out = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return out if len(text) <= limit else out[:-1] + "~"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    rows = [tuple(_clean(c) for c in r) for r in rows]
    widths = [max(len(r[c]) for r in (head, *rows)) for c in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in (head, *rows)]


def render(view: dict[str, Any], interval: float | None = None) -> list[str]:
    """The view as lines of text (what ``--once`` prints and the screen shows)."""
    nodes = view["nodes"]
    title = f"mesh top  mesh {view['mesh']}  {len(nodes)} node(s)"
    if interval is not None:
        title += f"  every {interval:g}s  q quits"
    lines = [title, ""]
    if not nodes:
        lines.append("no peers yet: waiting for nodes (--peer ENDPOINT, or mDNS)")
        return lines
    lines.append(f"NODES ({len(nodes)})")
    lines += _table(("NAME", "ID", "STATE", "STATS", "UPTIME", "PEERS"), [
        (n["name"], n["id"][:12], n["state"],
         n["stats"] + (" (truncated)" if n["truncated"] else ""),
         _age(n["uptime_s"]), _n(n["peers"]))
        for n in nodes])
    lines += ["", f"STREAMS ({len(view['streams'])})"]
    rows: list[tuple[str, ...]] = []
    for s in view["streams"]:
        pubs = s["publishers"] or [{"node": "-", "published": None, "rate": None, "head": None}]
        for p in pubs:
            rows.append((s["stream"], p["node"], _n(p["published"]), _n(p["rate"], True), ""))
        for sub in s["subscribers"]:
            rows.append(("  sub " + sub["consumer"], sub["node"] or "-", _n(sub["consumed"]),
                         _n(sub["rate"], True), f"lag {_n(sub['lag'])}"))
    lines += _table(("STREAM", "NODE", "EVENTS", "RATE/s", "LAG"), rows)
    reps = view.get("replicas", [])
    if reps:  # only on a mesh with stores (patterns/pubsub/store.py)
        lines += ["", f"REPLICAS ({len(reps)})"]
        lines += _table(("STREAM", "ORIGIN", "STORE", "HEAD", "LAG"), [
            (r["stream"], r["origin_name"] or r["origin"][:12], r["store"], _n(r["head"]),
             _n(r["lag"])) for r in reps])
    lines += ["", f"QUEUES ({len(view['queues'])})"]
    lines += _table(("QUEUE", "NODE", "DEPTH", "INFLIGHT", "DLQ", "WORKERS", "ACKED/s",
                     "REDELIVERED"), [
        (q["queue"], q["node"], _n(q["depth"]), _n(q["inflight"]), _n(q["dlq"]),
         _n(q["workers"]), _n(q["acked_rate"], True), _n(q["redeliveries"]))
        for q in view["queues"]])
    lines += ["", f"SERVICES ({len(view['services'])})"]
    lines += _table(("SERVICE", "NODE", "CALLS", "CALLS/s", "ERRORS", "ERRORS/s", "BUSY"), [
        (s["service"], s["node"], _n(s["calls"]), _n(s["calls_rate"], True), _n(s["errors"]),
         _n(s["errors_rate"], True), _n(s["busy"])) for s in view["services"]])
    return lines


def fit(lines: list[str], cols: int, rows: int) -> list[str]:
    """Cut ``lines`` to a ``cols`` x ``rows`` screen (the last row says what was cut)."""
    if cols < MIN_COLS or rows < MIN_ROWS:
        msg = f"terminal too small ({cols}x{rows}); mesh top needs {MIN_COLS}x{MIN_ROWS}"
        return [msg[:max(1, cols - 1)]]
    out = [ln[:cols - 1] for ln in lines]
    if len(out) > rows:
        more = len(out) - rows + 1
        out = [*out[:rows - 1], f"... {more} more line(s): enlarge the terminal"[:cols - 1]]
    return out


# --- running -----------------------------------------------------------------------------------


#: The families the view reads: a node sends only these (smaller replies, less held here).
FAMILIES = (
    "consumer_lag", "dlq_events_pending", "event_processing_errors_total",
    "events_consumed_total", "events_published_total", "queue_delayed", "queue_inflight",
    "queue_pending", "queue_workers", "redeliveries_total", "requests_busy_total",
    "requests_running", "requests_served_total", "stream_head", "tasks_acked_total",
    "store_replica_head", "store_replica_lag",
)


class _Poller:
    """Asks every live peer for stats once per interval; keeps the last two replies."""

    def __init__(self, node: Any, interval: float) -> None:
        from mesh.observe import StatsClient

        self.node = node
        self.interval = interval
        self.client = StatsClient(node)
        self.asked: dict[str, float] = {}
        self.latest: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}

    def poll(self) -> None:
        now = time.monotonic()
        infos = self.node.peers.list()
        live = {i.node_id for i in infos}
        for nid in live:
            t = self.asked.get(nid)
            if t is None or now - t >= self.interval:
                self.asked[nid] = now
                self.client.request(nid, list(FAMILIES))
        for nid, rep in self.client.snapshot().items():
            cur = self.latest.get(nid)
            if cur is None or rep.received != cur.received:
                # a node may serve one snapshot to several requests (its cache): the one
                # before is kept for rates only when it is an older snapshot
                if cur is not None and cur.body.get("uptime_s") != rep.body.get("uptime_s"):
                    self.previous[nid] = cur
                self.latest[nid] = rep
        known = {r.info.node_id for r in self.node.peers.records()}
        self.client.forget(known)
        for d in (self.asked, self.latest, self.previous):
            for k in [k for k in d if k not in known]:
                del d[k]

    def complete(self) -> bool:
        """True when every live peer, and every node an answer names as joined, answered."""
        live = {i.node_id for i in self.node.peers.list()}
        if not live:
            return False
        named = set(live)
        for rep in self.latest.values():
            if rep.ok:
                for p in rep.body.get("peers", []):
                    if isinstance(p, dict) and p.get("state") == "joined" and \
                            isinstance(p.get("id"), str) and p["id"] != self.node.id:
                        named.add(p["id"])
        return named <= set(self.latest) and named <= live

    def view(self) -> dict[str, Any]:
        return build_view(self.node.id, self.node.name, self.node.mesh,
                          self.node.peers.records(), self.latest, self.previous,
                          stale_after=3 * self.interval + 1.0)


def cmd_top(args: argparse.Namespace) -> int:
    """``mesh top``."""
    if not args.once and not args.json and not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise ConfigError("mesh top draws on a terminal; use --once or --json in scripts")
    with open_node(args, "top") as node:
        poller = _Poller(node, args.interval)
        if args.once:
            return _once(poller, args)
        if args.json:
            return _json_lines(poller, args.interval)
        return _screen(poller, args.interval)


def _json_lines(poller: _Poller, interval: float) -> int:
    """``--json`` without ``--once``: one view object per line every interval, until Ctrl-C."""
    next_at = time.monotonic() + interval
    while True:
        poller.poll()
        now = time.monotonic()
        if now >= next_at:
            next_at = now + interval
            print(json.dumps(poller.view()), flush=True)
        time.sleep(min(0.05, max(0.0, next_at - now)))


def _once(poller: _Poller, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    while True:
        poller.poll()
        if poller.complete():
            break
        if time.monotonic() >= deadline:
            if not poller.node.peers.list():
                raise MeshTimeout(f"no peers found within {args.timeout:g} s")
            break  # say what answered; the others show as "waiting"
        time.sleep(0.02)
    view = poller.view()
    if args.json:
        print(json.dumps(view), flush=True)
    else:
        print("\n".join(render(view)), flush=True)
    return 0


def _screen(poller: _Poller, interval: float) -> int:
    import curses

    def run(scr: Any) -> None:
        curses.curs_set(0)
        scr.timeout(100)  # getch waits at most 0.1 s: keys stay responsive between polls
        last_draw = 0.0
        while True:
            now = time.monotonic()
            poller.poll()
            if now - last_draw >= min(interval, 0.5):
                last_draw = now
                rows, cols = scr.getmaxyx()
                try:  # the terminal's own size: a resize whose SIGWINCH curses missed
                    real = os.get_terminal_size(sys.stdout.fileno())
                except OSError:
                    real = None
                if real is not None and (real.lines, real.columns) != (rows, cols):
                    curses.resizeterm(real.lines, real.columns)
                    rows, cols = real.lines, real.columns
                    scr.clear()
                scr.erase()
                for y, line in enumerate(fit(render(poller.view(), interval), cols, rows)):
                    try:
                        scr.addstr(y, 0, line)
                    except curses.error:
                        pass  # the bottom-right cell, or a resize mid-draw
                scr.refresh()
            key = scr.getch()
            if key in (ord("q"), ord("Q"), 3):
                return
            if key == curses.KEY_RESIZE:
                last_draw = 0.0

    # the size from the terminal itself, not from $LINES/$COLUMNS (stale after a resize, or
    # inherited from another terminal)
    curses.use_env(False)
    try:
        curses.wrapper(run)
    except KeyboardInterrupt:
        pass  # Ctrl-C: curses restored the terminal; a clean exit
    return 0
