"""``mesh streams DIR``: the streams of a node's data directory.

Per stream: head (the next offset), the retained range (first offset, oldest record time),
records, bytes, segments, fsync count, and the durable subscriptions recorded in the same
directory with their lag (``head - committed position``: known when the subscription reads a
stream of this very node). ``--metrics URL`` adds the live ``consumer_lag`` a running node
reports (publishers learn their durable subscribers' positions from acks).

A node running a store (``mesh store``) also lists what it holds of other nodes' streams
(``replicas/``): per copy the origin, the stream, the seqs held, the origin's epoch of the
last one, and with ``--metrics`` its lag behind the origin's head (``store_replica_lag``);
then the archives (ranges an origin's new epoch took back, kept).

Read-only: safe while the node runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``streams``."""
    p = subparsers.add_parser("streams", help="streams of a data dir: head, retention, lag",
                              description=__doc__)
    p.add_argument("dir", help="a node's data directory")
    p.add_argument("--metrics", default=None, metavar="URL",
                   help="a running node's metrics endpoint (http://host:port/metrics)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_streams)


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def _cursors(root: Path) -> list[tuple[str, str, str, int]]:
    """(subscription, publisher id, stream, position) from the subscriber cursor store."""
    path = root / "pubsub-cursors.db"
    if not path.exists():
        return []
    from mesh.state import StateStore

    out: list[tuple[str, str, str, int]] = []
    with StateStore(path) as store:
        for ns in store.namespaces():
            if not ns.startswith("pubsub.cursor."):
                continue
            name = ns[len("pubsub.cursor."):]
            for key, val in store.items(ns):
                pub, _, stream = key.partition("/")
                # [position, writer epoch] (protocol 1.1), or a bare position (1.0).
                pos = val[0] if isinstance(val, list) and val else val
                if isinstance(pos, int) and not isinstance(pos, bool) and stream:
                    out.append((name, pub, stream, pos))
    return out


def live_lag(url: str) -> list[dict[str, Any]]:
    """``consumer_lag`` samples of a running node's endpoint.

    Raises:
        ConfigError: the endpoint cannot be read or is not the text format.
    """
    from mesh.metrics import parse_prometheus

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read metrics from {url}: {exc}") from exc
    return [{**labels, "lag": int(v)} for labels, v in parse_prometheus(text).get("consumer_lag", [])]


def replica_lag(url: str) -> dict[tuple[str, str], int]:
    """``store_replica_lag`` of a running store node: (origin, stream) -> lag.

    Raises:
        ConfigError: the endpoint cannot be read or is not the text format.
    """
    from mesh.metrics import parse_prometheus

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read metrics from {url}: {exc}") from exc
    return {(lb.get("origin", ""), lb.get("stream", "")): int(v)
            for lb, v in parse_prometheus(text).get("store_replica_lag", [])}


def collect(root: Path) -> list[dict[str, Any]]:
    """Every stream's facts (see the module docstring).

    Raises:
        ConfigError: ``root`` is not a directory.
    """
    from mesh.log import LogDirectory

    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    try:
        node_id: str | None = (root / "node.id").read_text().strip()
    except OSError:
        node_id = None
    subs = _cursors(root)
    rows: list[dict[str, Any]] = []
    ld = LogDirectory(root)
    for name in ld.streams():
        row: dict[str, Any] = {"stream": name}
        try:
            lg = ld.open(name, readonly=True)
        except Exception as exc:  # one bad stream must not hide the others
            row["error"] = str(exc)
            rows.append(row)
            continue
        try:
            s = lg.stats()
        finally:
            lg.close()
        row.update(head=s.next_offset, first_offset=s.first_offset, records=s.records,
                   bytes=s.bytes, segments=s.segments, oldest=_iso(s.oldest_timestamp_ns),
                   newest=_iso(s.newest_timestamp_ns), fsyncs=s.fsyncs)
        row["subscribers"] = [
            {"name": sub, "publisher": pub, "position": pos,
             "lag": max(0, s.next_offset - pos) if pub == node_id else None}
            for sub, pub, stream, pos in subs if stream == name]
        rows.append(row)
    from patterns.pubsub.store import read_holdings

    for rep in read_holdings(root):
        rows.append({"stream": rep.pop("stream"), "replica_of": rep.pop("origin"), **rep})
    # Subscriptions to streams of other nodes: their position, lag unknown offline.
    local = {r["stream"] for r in rows}
    for sub, pub, stream, pos in subs:
        if stream not in local or pub != node_id:
            rows.append({"stream": stream, "remote_publisher": pub,
                         "subscribers": [{"name": sub, "publisher": pub, "position": pos,
                                          "lag": None}]})
    return rows


def cmd_streams(args: argparse.Namespace) -> int:
    """``mesh streams DIR``."""
    rows = collect(Path(args.dir))
    live = live_lag(args.metrics) if args.metrics else []
    rlag = replica_lag(args.metrics) if args.metrics else {}
    for row in rows:
        if "replica_of" in row:
            if "archive" not in row:
                row["lag"] = rlag.get((row["replica_of"], row["stream"]))
            continue
        row["live_lag"] = {d.get("consumer", "?"): d["lag"] for d in live
                           if d.get("stream") == row["stream"]}
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no streams in {os.fspath(args.dir)}")
        return 0
    for r in rows:
        if "error" in r:
            print(f"{r['stream']}: error: {r['error']}")
            continue
        if "replica_of" in r:
            what = "archive" if "archive" in r else "copy"
            held = "empty" if r["head"] is None else f"{r['oldest']}..{r['head'] - 1}"
            lag = "" if r.get("lag") is None else f", lag {r['lag']}"
            gaps = "".join(f", missing {a}..{b - 1}" for a, b in r.get("missing") or [])
            print(f"{r['stream']} ({what} of node {r['replica_of'][:12]}): holds {held} "
                  f"(origin epoch {r['epoch']}){lag}{gaps}")
            continue
        if "remote_publisher" in r:
            print(f"{r['stream']} (of node {r['remote_publisher'][:12]})")
        else:
            held = "empty" if r["first_offset"] is None else (
                f"{r['first_offset']}..{r['head'] - 1} since {r['oldest']}")
            print(f"{r['stream']}: head {r['head']}, holds {held}, {r['records']} records, "
                  f"{r['bytes']} bytes in {r['segments']} segment(s)")
        for s in r["subscribers"]:
            lag = "lag ?" if s["lag"] is None else f"lag {s['lag']}"
            print(f"  durable {s['name']}: position {s['position']}, {lag}")
        for name, lag in sorted(r["live_lag"].items()):
            print(f"  live {name}: lag {lag}")
    return 0
