"""``mesh call SERVICE DATA`` and ``mesh serve SERVICE``: request/reply from a shell.

``call``: the node finds responders by mDNS, or through ``--peer ENDPOINT`` (the control
endpoint of the node that serves SERVICE). The reply is printed as text (bytes) or JSON (other
values); a remote error, no responder or a timeout is one line on stderr and exit 1.

``serve``: answer SERVICE's requests until stopped (SIGTERM/SIGINT: goodbye, close, exit 0) or
``--count`` requests: echo the payload (default), a fixed ``--reply``, or run ``--command`` per
request with the payload on stdin and the reply from its stdout (like ``nats reply
--command``); a command that exits non-zero or times out is a remote error for the caller.
Each request is printed (``--json``: one JSON object per line).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
from typing import Any

from mesh.cli._node_opts import (
    add_node_args,
    human,
    note,
    open_node,
    payload_value,
    positive,
    positive_seconds,
    read_data,
    show_value,
    wait_for,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``call``."""
    p = subparsers.add_parser("call", help="call a request/reply service", description=__doc__)
    p.add_argument("service", help="the service name")
    p.add_argument("data", help="payload: text, @file, or - for stdin")
    p.add_argument("--data-json", action="store_true", help="DATA is JSON: send its value")
    p.add_argument("--timeout", type=positive_seconds, default=5.0,
                   help="total deadline in seconds, retries included (default 5)")
    add_node_args(p)
    p.set_defaults(func=cmd_call)

    s = subparsers.add_parser("serve", help="answer a request/reply service's requests",
                              description=__doc__)
    s.add_argument("service", help="the service name to serve")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--reply", default=None, metavar="DATA",
                     help="answer every request with DATA (text, @file); default: echo")
    how.add_argument("--command", default=None, metavar="CMD",
                     help="run CMD (sh -c) per request: payload on stdin, reply from stdout")
    s.add_argument("--command-timeout", type=positive_seconds, default=30.0, metavar="S",
                   help="seconds a --command may run (default 30)")
    s.add_argument("--count", type=positive, default=None,
                   help="exit after answering N requests (default: run until stopped)")
    s.add_argument("--concurrency", type=positive, default=4,
                   help="requests handled at once (default 4)")
    add_node_args(s, one_shot=False)
    s.set_defaults(func=cmd_serve)


def cmd_call(args: argparse.Namespace) -> int:
    """``mesh call``."""
    from patterns.reqrep import Client

    payload = payload_value(read_data(args.data), args.data_json)
    with open_node(args, "call") as node:
        client = Client(node)
        try:
            reply = client.request(args.service, payload, timeout=args.timeout)
        finally:
            client.close()
    shown = show_value(reply)
    if args.json:
        print(json.dumps({"service": args.service, "reply": shown}, ensure_ascii=False))
    else:
        print(shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False))
    return 0


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return json.dumps(show_value(value), ensure_ascii=False).encode()


def cmd_serve(args: argparse.Namespace) -> int:
    """``mesh serve``."""
    from patterns.reqrep import Incoming, Service

    fixed = None if args.reply is None else read_data(args.reply)
    lock = threading.Lock()
    answered = 0
    done = threading.Event()

    def run(req: Incoming) -> Any:
        if args.command is None:
            return fixed if fixed is not None else req.payload
        try:
            r = subprocess.run(["sh", "-c", args.command], input=_as_bytes(req.payload),
                               capture_output=True, timeout=args.command_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"command timed out after {args.command_timeout:g} s") from None
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"command exited {r.returncode}: {tail[0][:200]}")
        return r.stdout

    def handler(req: Incoming) -> Any:
        nonlocal answered
        try:
            return run(req)
        finally:  # counted and shown whether it answered or failed
            with lock:
                answered += 1
                if args.json:
                    print(json.dumps({"service": args.service, "n": answered, "id": req.id,
                                      "data": show_value(req.payload)}, ensure_ascii=False),
                          flush=True)
                else:
                    print(f"{args.service} #{answered} {req.id} {human(req.payload)}",
                          flush=True)
                if args.count is not None and answered >= args.count:
                    done.set()

    with open_node(args, "serve") as node, Service(node, args.service, handler,
                                                   concurrency=args.concurrency) as svc:
        note(f"serving {args.service}")
        done.wait()
        # the last handler returned; its reply leaves from the I/O thread right after
        wait_for(lambda: svc.stats().replied >= answered, 5.0, "the last reply sent")
    return 0
