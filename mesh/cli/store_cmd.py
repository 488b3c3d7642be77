"""``mesh store PREFIX... --data-dir D``: keep durable copies of streams and serve them.

The node follows every durable stream whose name starts with one of the PREFIXes (a full
stream name works too), from every publisher it finds, keeps a copy per (origin node, stream)
under ``D/replicas/`` with the origin's seqs, epochs and signed envelopes unchanged, acks what
it holds to the origin (``mesh pub --replicas 1`` returns then), and serves the copies to
subscribers when the origin is gone or no longer holds the range. It runs until SIGINT or
SIGTERM; each change of what it holds is printed (at most once a second per stream).
"""

from __future__ import annotations

import argparse
import json
import time

from mesh.cli._node_opts import add_node_args, note, open_node
from mesh.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``store``."""
    p = subparsers.add_parser("store", help="hold and serve copies of streams (replicas)",
                              description=__doc__)
    p.add_argument("prefix", nargs="+",
                   help="stream prefix (sensors.) or name; use '*' for every stream")
    add_node_args(p, one_shot=False)
    p.set_defaults(func=cmd_store)


def cmd_store(args: argparse.Namespace) -> int:
    """``mesh store``."""
    from mesh.cli.pubsub_cmd import _check_topic
    from patterns.pubsub.store import Store

    if not args.data_dir:
        raise ConfigError("mesh store needs --data-dir (the copies must outlive the process)")
    for t in args.prefix:
        _check_topic(t)
    topics = tuple("" if t == "*" else t for t in args.prefix)
    with open_node(args, "store") as node, Store(node, topics=topics) as store:
        note(f"store: holding {' '.join(args.prefix)} in {args.data_dir}")
        shown: dict[tuple[str, str], tuple[int, int]] = {}

        def report() -> None:
            for h in store.holdings():
                key = (h.origin, h.stream)
                if shown.get(key) == (h.oldest, h.head):
                    continue
                shown[key] = (h.oldest, h.head)
                if args.json:
                    print(json.dumps({"origin": h.origin, "stream": h.stream,
                                      "oldest": h.oldest, "head": h.head, "epoch": h.epoch}),
                          flush=True)
                else:
                    print(f"holds {h.stream} of {h.origin[:12]}: seqs {h.oldest}..{h.head - 1}",
                          flush=True)

        try:
            while True:
                report()
                time.sleep(1.0)  # a reporting interval; the store works on its own threads
        finally:
            report()  # what it holds as it stops (SIGINT / SIGTERM)
