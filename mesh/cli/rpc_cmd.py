"""``mesh call SERVICE DATA``: one request/reply call from a shell.

The node finds responders by mDNS, or through ``--peer ENDPOINT`` (the control endpoint of the
node that serves SERVICE). The reply is printed as text (bytes) or JSON (other values); a
remote error, no responder or a timeout is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json

from mesh.cli._node_opts import add_node_args, open_node, payload_value, read_data, show_value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``call``."""
    p = subparsers.add_parser("call", help="call a request/reply service", description=__doc__)
    p.add_argument("service")
    p.add_argument("data", help="payload: text, @file, or - for stdin")
    p.add_argument("--data-json", action="store_true", help="DATA is JSON: send its value")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="total deadline in seconds, retries included (default 5)")
    add_node_args(p)
    p.set_defaults(func=cmd_call)


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
