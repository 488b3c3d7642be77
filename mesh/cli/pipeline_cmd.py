"""``mesh push QUEUE DATA`` and ``mesh work QUEUE``: a work queue from a shell.

``mesh work`` prints its node's control endpoint on stderr; ``mesh push --peer ENDPOINT``
reaches it without mDNS. ``mesh push`` is the queue's producer: it logs the task in its data
directory, dispatches it, and (unless ``--no-wait``) waits until a worker acknowledged it or it
was dead-lettered: a dead-lettered task is reported with its error (and its DLQ offset) and the
exit code is 1. Without ``--data-dir`` the log is temporary: a task nobody took within
``--wait`` seconds is reported as not delivered (exit 1).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mesh.cli._node_opts import (
    add_node_args,
    data_items,
    human,
    note,
    open_node,
    positive,
    positive_seconds,
    seconds,
)
from mesh.errors import MeshTimeout


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``push`` and ``work``."""
    p = subparsers.add_parser("push", help="push a task onto a work queue", description=__doc__)
    p.add_argument("queue", help="the queue name")
    p.add_argument("data", help="payload: text, @file, or - for stdin")
    p.add_argument("--key", default=None, help="ordering key (tasks of one key run in order)")
    p.add_argument("--lines", action="store_true", help="one task per line of DATA")
    p.add_argument("--wait", type=seconds, default=10.0,
                   help="seconds to wait for the tasks to be acked (default 10)")
    p.add_argument("--no-wait", dest="no_wait", action="store_true",
                   help="exit once logged (use with --data-dir and a producer that stays up)")
    add_node_args(p)
    p.set_defaults(func=cmd_push)

    w = subparsers.add_parser("work", help="take tasks from a queue, print and ack them",
                              description=__doc__)
    w.add_argument("queue", help="the queue name")
    w.add_argument("--count", type=positive, default=None, help="exit after N tasks")
    w.add_argument("--timeout", type=positive_seconds, default=None,
                   help="give up after this many seconds (exit 1 if --count was not reached)")
    w.add_argument("--fail", action="store_true",
                   help="nack every task instead (to watch redelivery and the DLQ)")
    w.add_argument("--credit", type=positive, default=10, help="most unacked tasks held")
    add_node_args(w, one_shot=False)
    w.set_defaults(func=cmd_work)


def cmd_push(args: argparse.Namespace) -> int:
    """``mesh push``."""
    from patterns.pipeline import WorkQueue

    items = data_items(args.data, args.lines)
    if args.data != "-" or not args.lines:
        items = iter(list(items))  # read (and validate) a file or argument before the node starts
    with open_node(args, "push") as node:
        q = WorkQueue(node, args.queue)
        try:
            ids = [q.push(x, key=args.key) for x in items]  # stdin lines: each as it arrives
            if not args.no_wait:
                try:
                    q.wait_idle(timeout=args.wait)
                except MeshTimeout:
                    raise MeshTimeout(
                        f"{len(ids)} task(s) logged but not acked by a worker within "
                        f"{args.wait:g} s" + ("" if args.data_dir else
                                              " (temporary data dir: they are dropped)")
                    ) from None
            st = q.stats()
            dead = [] if args.no_wait or not int(st.get("dead_lettered", 0) or 0) else \
                [e for e in q.dlq.list(include_all=True) if e.task_id in set(ids)]
        finally:
            q.close()
    dead_out = [{"id": e.task_id, "dlq_offset": e.offset, "reason": e.reason,
                 "deliveries": e.deliveries, "error_type": e.error_type,
                 "error_message": e.error_message} for e in dead]
    status = "logged" if args.no_wait else "dead_lettered" if dead else "acked"
    if args.json:
        print(json.dumps({"queue": args.queue, "ids": ids, "status": status,
                          "acked": len(ids) - len(dead) if not args.no_wait else 0,
                          "dead": len(dead), "dead_lettered": dead_out}))
    else:
        if args.no_wait:
            print(f"pushed {len(ids)} task(s) to {args.queue}")
        elif not dead:
            print(f"pushed {len(ids)} task(s) to {args.queue}: acked")
        else:
            print(f"pushed {len(ids)} task(s) to {args.queue}: {len(ids) - len(dead)} acked, "
                  f"{len(dead)} dead-lettered")
            for d in dead_out:
                err = f"{d['error_type'] or ''}: {d['error_message'] or ''}".strip(": ")
                print(f"task {d['id']} dead-lettered ({d['reason']}, {d['deliveries']} "
                      f"deliveries, DLQ offset {d['dlq_offset']}): {err or 'no error given'}")
    # A dead-lettered task was not done: scripts see it in the exit code.
    return 1 if dead else 0


def cmd_work(args: argparse.Namespace) -> int:
    """``mesh work``."""
    import time

    from patterns.pipeline import Worker

    got = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with open_node(args, "work") as node:
        worker = Worker(node, args.queue, credit=args.credit)
        try:
            note(f"working on {args.queue}")
            while args.count is None or got < args.count:
                if deadline is not None and time.monotonic() >= deadline:
                    if args.count is not None:
                        raise MeshTimeout(
                            f"got {got} of {args.count} tasks within {args.timeout:g} s")
                    break
                task = worker.get(timeout=0.2)
                if task is None:
                    continue
                got += 1
                # Through handle(): return = ack, raise = nack; timed and traced like any handler.
                worker.handle(task, lambda t: _handle(args, t))
            worker.flush()
        finally:
            worker.close()
    return 0


def _handle(args: argparse.Namespace, task: Any) -> None:
    _show(args, task)
    if args.fail:
        raise RuntimeError("mesh work --fail")


def _show(args: argparse.Namespace, task: Any) -> None:
    if args.json:
        print(json.dumps({"queue": args.queue, "id": task.id, "delivery": task.delivery,
                          "key": None if task.key is None else str(task.key),
                          "data": human(task.payload)}, ensure_ascii=False), flush=True)
    else:
        print(f"{args.queue} task {task.id} (delivery {task.delivery}) {human(task.payload)}",
              flush=True)
