"""``mesh log info|tail|verify|repair``: inspect durable logs from the command line.

Everything is read-only except ``repair``, which cuts damaged ranges out (see
:mod:`mesh.log.repair`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from mesh.cli._node_opts import non_negative, parse_since, positive
from mesh.envelope import to_cloudevent
from mesh.errors import ConfigError, LogError
from mesh.log import Log, LogDirectory, Record, verify_log
from mesh.log import format as fmt


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mesh log`` and its sub-commands."""
    p = subparsers.add_parser("log", help="inspect (and repair) durable logs")
    sub = p.add_subparsers(dest="log_command", metavar="ACTION", required=True)

    info = sub.add_parser("info", help="offsets, sizes and times of every stream")
    info.add_argument("dir", help="a data directory (with streams/) or one stream's directory")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    tail = sub.add_parser("tail", help="print records of a stream")
    tail.add_argument("dir", help="a data directory (with streams/) or one stream's directory")
    tail.add_argument("stream", nargs="?", default=None,
                      help="the stream (omit when DIR is a stream's directory)")
    where = tail.add_mutually_exclusive_group()
    where.add_argument("--from", dest="from_offset", type=non_negative, default=None,
                       help="start at this offset (default: the last --limit records)")
    where.add_argument("--since", default=None,
                       help="start at this time (ISO 8601, an age like 10m, or Unix seconds)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--limit", "-n", type=positive, default=10,
                      help="how many records without --from/--since/--follow (default 10)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.set_defaults(func=cmd_tail)

    verify = sub.add_parser("verify", help="scan everything; exit 1 on any corruption")
    verify.add_argument("dir", help="a data directory (with streams/) or one stream's directory")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=cmd_verify)

    repair = sub.add_parser("repair", help="cut damaged ranges out, leaving recorded holes "
                            "(the stream's writer must be stopped)")
    repair.add_argument("dir", help="a data directory (with streams/) or one stream's directory")
    repair.add_argument("stream", nargs="?", default=None,
                        help="the stream (omit when DIR is a stream's directory)")
    repair.add_argument("--cut", default=None, metavar="A..B",
                        help="cut these offsets (inclusive) instead of the damaged ranges")
    repair.add_argument("--json", action="store_true", help="machine-readable output")
    repair.set_defaults(func=cmd_repair)


def _is_stream_dir(path: str) -> bool:
    return any(fmt.parse_segment_name(n) is not None for n in os.listdir(path))


def _stream_dirs(path: str) -> dict[str, str]:
    if not os.path.isdir(path):
        raise LogError(f"no such directory: {path}")
    d = LogDirectory(path)
    streams = d.streams()
    # A data directory's work queues keep their logs in their own namespace: listed as
    # "queues/<queue>.tasks" etc. (pipeline_root is the one place that knows where).
    from patterns.pipeline.store import pipeline_root  # the CLI is where mesh sees patterns

    q = pipeline_root(path)
    qlogs = {f"queues/{s}": os.path.join(q.streams_dir, s) for s in q.streams()}
    if streams or qlogs:
        return {**{s: d.path_for(s) for s in streams}, **qlogs}
    if _is_stream_dir(path):
        return {os.path.basename(os.path.abspath(path)): path}
    raise LogError(f"{path} holds no streams/ directory and no log segments")


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def cmd_info(args: argparse.Namespace) -> int:
    """``mesh log info DIR``."""
    out: list[dict[str, Any]] = []
    for name, path in _stream_dirs(args.dir).items():
        with Log.open(path, readonly=True) as lg:
            st = lg.stats()
            epochs = [list(e) for e in lg.epochs.entries]
        out.append({"stream": name, "path": path, "first_offset": st.first_offset,
                    "last_offset": st.last_offset, "records": st.records, "bytes": st.bytes,
                    "segments": st.segments, "oldest": _iso(st.oldest_timestamp_ns),
                    "newest": _iso(st.newest_timestamp_ns),
                    "missing_records": st.missing_records,
                    "corrupt_regions": st.corrupt_regions,
                    "lost_ranges": [list(r) for r in st.lost_ranges],
                    # [epoch, first offset] per writer incarnation, oldest first.
                    "epochs": epochs})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for s in out:
        print(f"{s['stream']}: offsets {s['first_offset']}..{s['last_offset']}, "
              f"{s['records']} records, {s['bytes']} bytes, {s['segments']} segment(s), "
              f"oldest {s['oldest']}, newest {s['newest']}"
              + (f", epoch {s['epochs'][-1][0]} from offset {s['epochs'][-1][1]} "
                 f"({len(s['epochs'])} epoch(s))" if s["epochs"] else "")
              + (f", {s['missing_records']} MISSING" if s["missing_records"] else "")
              + (f", {s['corrupt_regions']} CORRUPT region(s)" if s["corrupt_regions"] else "")
              + "".join(f", LOST offsets {a}..{b - 1}" for a, b in lost_of(s)))
    return 0


def lost_of(info: dict[str, Any]) -> list[tuple[int, int]]:
    """The lost ranges of one ``mesh log info`` row."""
    return [(int(a), int(b)) for a, b in info.get("lost_ranges") or []]


def _decoder() -> Callable[[bytes], Any] | None:
    try:
        mod = importlib.import_module("mesh.envelope")
    except ImportError:
        return None
    fn = getattr(mod, "decode", None)
    return fn if callable(fn) else None


def _show(payload: bytes, decode: Callable[[bytes], Any] | None) -> tuple[str, Any]:
    if decode is not None:
        try:
            return "event", decode(payload)
        except Exception:  # not an envelope: fall back to raw bytes
            pass
    try:
        text = payload.decode("utf-8")
        if text.isprintable():
            return "text", text
    except UnicodeDecodeError:
        pass
    return "hex", payload.hex()


def _parse_since(value: str) -> int:
    return int(parse_since(value).timestamp() * 1e9)


def _one_stream(args: argparse.Namespace) -> str:
    streams = _stream_dirs(args.dir)
    if args.stream is None:
        if len(streams) != 1:
            raise ConfigError(f"name a stream: {', '.join(sorted(streams))}")
        return next(iter(streams.values()))
    if args.stream in streams:
        return streams[args.stream]
    raise LogError(f"no stream {args.stream!r} in {args.dir}")


def cmd_tail(args: argparse.Namespace) -> int:
    """``mesh log tail DIR STREAM``."""
    path = _one_stream(args)
    decode = _decoder()
    with Log.open(path, readonly=True) as lg:
        lg.stats()  # refresh to the writer's current tail
        first = lg.first_offset or 0
        if args.from_offset is not None:
            start, limit = args.from_offset, None if args.follow else args.limit
        elif args.since is not None:
            start, limit = lg.offset_for_time(_parse_since(args.since)), None
        else:
            start, limit = max(first, lg.next_offset - args.limit), None
        start = max(start, first)

        def emit(rec: Record) -> None:
            kind, value = _show(rec.payload, decode)
            if args.json:  # events as CloudEvents JSON, like `mesh sub --json`
                if kind == "event":
                    value = to_cloudevent(value)
                print(json.dumps({"offset": rec.offset, "time": _iso(rec.timestamp_ns),
                                  kind: value}, ensure_ascii=False), flush=args.follow)
            else:
                shown = repr(value) if kind == "event" else value
                print(f"{rec.offset}\t{_iso(rec.timestamp_ns)}\t{kind}\t{shown}",
                      flush=args.follow)

        source = lg.follow(start, threading.Event(), poll_s=0.2) if args.follow \
            else lg.iter(start)
        for printed, rec in enumerate(source, 1):
            emit(rec)
            if limit is not None and printed >= limit:
                break
    sys.stdout.flush()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``mesh log verify DIR``: exit 1 when anything is wrong."""
    from mesh.cli._progress import Progress, segment_bytes  # stderr, on a TTY only

    streams = _stream_dirs(args.dir)
    reports: list[tuple[str, Any]] = []
    total = sum(segment_bytes(p) for p in streams.values()) if sys.stderr.isatty() else 0
    with Progress("verify", total, items=len(streams)) as prog:
        # Bytes advance within a stream (verify_log reports every few MiB it scans), so one
        # large stream does not sit at 0% until it is done.
        on_bytes = prog.advance if prog.enabled else None
        for name, path in streams.items():
            reports.append((name, verify_log(path, on_bytes)))
            prog.advance(0, item=True)
    bad = any(not r.ok for _, r in reports)
    if args.json:
        print(json.dumps([{"stream": n, "ok": r.ok, "segments": r.segments,
                           "records": r.records, "bytes": r.bytes,
                           "first_offset": r.first_offset, "next_offset": r.next_offset,
                           "problems": [dict(p.__dict__, stream=n) for p in r.problems]}
                          for n, r in reports], indent=2))
    else:
        for name, r in reports:
            status = "OK" if r.ok else "CORRUPT"
            print(f"{name}: {status}: {r.segments} segment(s), {r.records} records, "
                  f"{r.bytes} bytes")
            for p in r.problems:
                where = f"{p.range_text} " if p.range_text else ""
                print(f"  {p.kind}: {name} {where}in {p.path} at byte {p.position}: "
                      f"{p.reason}")
    return 1 if bad else 0


def _parse_cut(value: str) -> tuple[int, int]:
    a, sep, b = value.partition("..")
    try:
        if not sep:
            return int(a), int(a)
        return int(a), int(b)
    except ValueError:
        raise ConfigError(f"--cut: expected A..B (offsets), got {value!r}") from None


def cmd_repair(args: argparse.Namespace) -> int:
    """``mesh log repair DIR [STREAM] [--cut A..B]``: exit 0 once the log reads cleanly."""
    from mesh.log.repair import repair_log

    path = _one_stream(args)
    cut = _parse_cut(args.cut) if args.cut is not None else None
    rep = repair_log(path, cut)
    with Log.open(path) as lg:  # the writer's open: recovers the rest, proves it opens
        lg.stats()
    after = verify_log(path)
    if args.json:
        print(json.dumps({"path": path, "cuts": [c.__dict__ for c in rep.cuts],
                          "acknowledged": [list(a) for a in rep.acknowledged],
                          "finished_interrupted": rep.finished_interrupted,
                          "ok": after.ok}, indent=2))
    else:
        for c in rep.cuts:
            print(f"cut offsets {c.offset}..{c.next_offset - 1} ({c.next_offset - c.offset} "
                  f"records) from {c.path} bytes {c.position}..{c.end_position - 1}: {c.reason}")
        for a, b, why in rep.acknowledged:
            print(f"acknowledged offsets {a}..{b - 1} as a hole ({why})")
        for seg in rep.finished_interrupted:
            print(f"finished an interrupted repair of {seg}")
        if not rep.changed:
            print("nothing to repair")
        print(f"verify after repair: {'OK' if after.ok else 'CORRUPT'}")
        for prob in after.problems:
            if prob.kind != "index":
                print(f"  {prob.kind}: {prob.range_text} {prob.reason}")
    return 0 if after.ok else 1
