"""``mesh dlq list|show|redrive|discard DIR QUEUE``: inspect and operate a queue's DLQ.

DIR is the producer node's data directory. ``redrive`` pushes the original task back onto the
queue with its original trace context (or, when a producer is running, records a request it
fulfils within about a second); with no producer running the task waits in the queue's log
and the output says so: it runs when the producer starts;
``discard`` records a tombstone. Both are recorded in ``<queue>.dlq-ops``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mesh dlq`` and its sub-commands."""
    p = subparsers.add_parser("dlq", help="list, show, redrive and discard dead letters")
    sub = p.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="dead letters of a queue")
    ls.add_argument("dir", help="the producer node's data directory")
    ls.add_argument("queue", help="the queue name")
    ls.add_argument("--all", action="store_true", help="include discarded and redriven ones")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    for name, func, helptext in (
        ("show", cmd_show, "one dead letter with its payload, error and history"),
        ("redrive", cmd_redrive, "push dead letters back onto the queue (recorded)"),
        ("discard", cmd_discard, "mark dead letters discarded (recorded)"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("dir", help="the producer node's data directory")
        sp.add_argument("queue", help="the queue name")
        sp.add_argument("offsets", type=int, nargs="+", metavar="OFFSET",
                        help="DLQ offsets (from `mesh dlq list`)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(func=func)


def _dlq(args: argparse.Namespace) -> Any:
    """The queue's DeadLetters, once DIR and QUEUE are known to exist.

    Raises:
        ConfigError: DIR is not a directory, or no queue of that name ever ran there.
    """
    import os

    from mesh.errors import ConfigError
    from patterns.pipeline.dlq import DeadLetters  # the CLI is the one place mesh sees patterns
    from patterns.pipeline.store import pipeline_root

    if not os.path.isdir(args.dir):
        raise ConfigError(f"no such data directory: {args.dir}")
    root = pipeline_root(args.dir)
    suffixes = (".tasks", ".journal", ".dlq")
    if not any(os.path.isdir(root.path_for(args.queue + suf)) for suf in suffixes):
        known = sorted({n.rsplit(".", 1)[0] for d in (root.streams_dir,)
                        if os.path.isdir(d) for n in os.listdir(d) if n.endswith(suffixes)})
        raise ConfigError(f"no queue {args.queue!r} in {args.dir}"
                          + (f" (queues there: {', '.join(known)})" if known else
                             " (no queue has run there)"))
    return DeadLetters(args.dir, args.queue, actor="cli")


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def cmd_list(args: argparse.Namespace) -> int:
    """``mesh dlq list``."""
    entries = _dlq(args).list(include_all=args.all)
    if args.json:
        json.dump([e.to_dict(payload_limit=64) for e in entries], sys.stdout, indent=1)
        print()
        return 0
    if not entries:
        print(f"no dead letters in {args.queue}")
        return 0
    print(f"{'OFFSET':>6} {'TASK':>8} {'STATUS':<17} {'N':>3} {'REASON':<15} {'DEAD AT':<29} ERROR")
    for e in entries:
        err = f"{e.error_type or ''}: {e.error_message or ''}".strip(": ")
        print(f"{e.offset:>6} {e.task_id:>8} {e.status:<17} {e.deliveries:>3} {e.reason:<15} "
              f"{_time(e.dead_at):<29} {err[:60]}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``mesh dlq show``."""
    d = _dlq(args)
    out = [d.show(o).to_dict() for o in args.offsets]
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    for m in out:
        for k, v in m.items():
            if k in ("history", "ops", "traceback"):
                continue
            print(f"{k:>16}: {v}")
        print("         history:")
        for a in m["history"]:
            print(f"  #{a['delivery']} {a['outcome']:<12} worker={a['worker']} "
                  f"sent={_time(a['dispatched_at'])} ended={_time(a['ended_at'])} "
                  f"{a['error_type'] or ''} {a['error_message'] or ''}")
        if m["traceback"]:
            print("       traceback:\n" + m["traceback"])
        for op in m["ops"]:
            print(f"              op: {op}")
    return 0


def _apply(args: argparse.Namespace, action: str) -> int:
    d = _dlq(args)
    done = []
    for o in args.offsets:
        e = getattr(d, action)(o)
        m: dict[str, Any] = {"offset": o, "status": e.status}
        if action == "redrive":
            m["task_id"] = e.redriven_task_id
            m["producer_running"] = e.producer_running
            if e.status == "redriven" and e.producer_running is False:
                m["note"] = (f"queued for redrive: the producer of {args.queue} is not running; "
                             f"it will redeliver when it starts")
            elif e.status == "redrive_requested":
                m["note"] = (f"the running producer of {args.queue} will push it within about "
                             f"a second")
        done.append(m)
    if args.json:
        json.dump(done, sys.stdout)
        print()
    else:
        for m in done:
            if "note" in m and m["status"] == "redriven":
                print(f"{m['offset']}: {m['note']} (task {m['task_id']})")
            elif "note" in m:
                print(f"{m['offset']}: {m['status']}: {m['note']}")
            else:
                print(f"{m['offset']}: {m['status']}")
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    """``mesh dlq redrive``."""
    return _apply(args, "redrive")


def cmd_discard(args: argparse.Namespace) -> int:
    """``mesh dlq discard``."""
    return _apply(args, "discard")
