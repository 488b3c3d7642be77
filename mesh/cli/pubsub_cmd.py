"""``mesh pub TOPIC DATA`` and ``mesh sub TOPIC``: publish and subscribe from a shell.

``mesh sub`` prints its node's control endpoint on stderr; ``mesh pub --peer ENDPOINT`` reaches
it without mDNS. ``mesh pub`` waits (``--wait``) for a subscriber to connect, publishes durably
(the event is in its node's log), then stays up for ``--linger`` seconds, or until every
durable subscriber acknowledged it, so late subscribers can still replay it. With nobody
subscribed it exits at once, and without mDNS or ``--peer`` it does not wait for a subscriber.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mesh.cli._node_opts import (
    add_node_args,
    data_items,
    human,
    note,
    open_node,
    parse_since,
    payload_value,
    positive,
    positive_seconds,
    seconds,
)
from mesh.errors import ConfigError, MeshTimeout, ReplicationTimeout


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pub`` and ``sub``."""
    p = subparsers.add_parser("pub", help="publish one event (or one per stdin line)",
                              description=__doc__)
    p.add_argument("topic", help="the stream name")
    p.add_argument("data", help="payload: text, @file, or - for stdin")
    p.add_argument("--type", default="cli", help="the event type (default: %(default)s)")
    p.add_argument("--subject", default=None, help="the event subject (default: none)")
    p.add_argument("--data-json", action="store_true", help="DATA is JSON: send its value")
    p.add_argument("--lines", action="store_true", help="one event per line of DATA")
    p.add_argument("--wait", type=seconds, default=3.0,
                   help="seconds to wait for a subscriber before publishing (default 3)")
    p.add_argument("--linger", type=seconds, default=1.0,
                   help="seconds to stay up after publishing while a subscriber is connected (default 1)")
    p.add_argument("--replicas", type=positive, default=None, metavar="K",
                   help="exit once K stores (mesh store) hold the events durably, instead of "
                        "waiting for subscribers; exit 1 if they do not within --replica-timeout")
    p.add_argument("--replica-timeout", type=positive_seconds, default=10.0, metavar="S",
                   help="seconds to wait for --replicas stores (default 10)")
    add_node_args(p)
    p.set_defaults(func=cmd_pub)

    s = subparsers.add_parser("sub", help="print the events of a topic", description=__doc__)
    s.add_argument("topic", help="stream name, or a prefix ending in . or *")
    s.add_argument("--from", dest="start", default=None, metavar="beginning|new|OFFSET",
                   help="where to start (default: new; beginning for --durable)")
    s.add_argument("--since", default=None, metavar="TIME",
                   help="start at this time (ISO 8601, or an age: 90s, 10m, 2h)")
    s.add_argument("--durable", default=None, metavar="NAME",
                   help="a durable subscription: resumes where it stopped (use --data-dir)")
    s.add_argument("--count", type=positive, default=None, help="exit after N events")
    s.add_argument("--timeout", type=positive_seconds, default=None,
                   help="give up after this many seconds (exit 1 if --count was not reached)")
    s.add_argument("--endpoint", action="append", default=[],
                   help="a publisher's data endpoint to connect to directly (repeatable)")
    add_node_args(s, one_shot=False)
    s.set_defaults(func=cmd_sub)


def _start(args: argparse.Namespace) -> Any:
    from patterns.pubsub import Start  # the CLI is where mesh meets patterns

    if args.since is not None:
        if args.start is not None:
            raise ConfigError("give --from or --since, not both")
        return Start.time(parse_since(args.since))
    if args.start is None:
        return None
    if args.start == "beginning":
        return Start.beginning()
    if args.start == "new":
        return Start.new()
    try:
        return Start.offset(int(args.start))
    except ValueError:
        raise ConfigError(f"--from must be beginning, new or an offset, got {args.start!r}") from None


def _check_topic(topic: str) -> None:
    """A stream name, or a prefix of one ending in ``.`` or ``*`` (``*`` alone: everything).

    Raises:
        ConfigError: anything else (it could never match a stream).
    """
    from mesh.log import validate_stream_name

    name = topic.rstrip("*") if topic.endswith("*") else topic
    if name == "" and topic:
        return
    try:
        validate_stream_name(name)
    except ConfigError:
        raise ConfigError(f"not a stream name or prefix: {topic!r} (use A-Z a-z 0-9 . _ -, "
                          "a prefix ends in . or *)") from None


def event_dict(ev: Any) -> dict[str, Any]:
    """An event as CloudEvents 1.0 structured JSON (what :func:`mesh.envelope.to_cloudevent`
    produces: ``meshstream``/``meshseq`` say where it sits, ``source`` who published it)."""
    from mesh.envelope import to_cloudevent

    return to_cloudevent(ev)


def cmd_pub(args: argparse.Namespace) -> int:
    """``mesh pub``."""
    from patterns.pubsub import Publisher

    items = data_items(args.data, args.lines)
    if args.data != "-" or not args.lines:
        items = iter(list(items))  # read (and validate) a file or argument before the node starts
    if args.replicas:
        return _pub_replicated(args, items)
    with open_node(args, "pub") as node, Publisher(node, args.topic) as pub:
        # The hub counts subscription requests on its data socket: the one sure sign that a subscriber
        # is connected (publishing before that is the slow-joiner loss, though the event is
        # still logged and replayable while we linger).
        hub = pub._hub
        # Nobody can be found without mDNS and without --peer: no wait for a subscriber then.
        lonely = not (node.config.mdns or node.config.static_peers or node.config.seeds)
        deadline = time.monotonic() + (0.0 if lonely else max(0.0, args.wait))
        while hub.subscriptions == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if hub.subscriptions == 0:
            note("no subscriber can be found (no mDNS, no --peer); publishing anyway" if lonely
                 else f"no subscriber connected within {args.wait:g} s; publishing anyway")
        seqs = [pub.publish(payload_value(x, args.data_json), type=args.type,
                            subject=args.subject) for x in items]
        out = {"stream": args.topic, "seqs": seqs, "node": node.id}
        if args.json:
            print(json.dumps(out), flush=True)
        elif seqs:
            print(f"published {len(seqs)} event(s) to {args.topic} at seq "
                  f"{seqs[0]}{'..' + str(seqs[-1]) if len(seqs) > 1 else ''}", flush=True)
        else:
            print(f"published nothing to {args.topic} (no data)", flush=True)
        # Stay up so subscribers can fetch what they missed; leave early once every durable
        # subscriber acknowledged the head.
        # Nobody subscribed and no durable position known: nobody to stay up for.
        idle = hub.subscriptions == 0 and not pub.stats().lag
        end = time.monotonic() + (0.0 if idle else max(0.0, args.linger))
        lag: dict[Any, int] = {}
        while time.monotonic() < end:
            lag = pub.stats().lag
            if lag and all(v == 0 for v in lag.values()):
                break
            time.sleep(0.02)
        owed = {k: v for k, v in lag.items() if v}
        if owed:
            note(f"exiting with {max(owed.values())} event(s) not yet acked by "
                 f"{len(owed)} durable subscriber(s); they stay in the log"
                 + ("" if args.data_dir else " (temporary data dir: deleted now)"))
    return 0


def _pub_replicated(args: argparse.Namespace, items: Any) -> int:
    """``mesh pub --replicas K``: publish, return once K stores hold every event."""
    from patterns.pubsub import Publisher
    from patterns.pubsub.frames import STORE_SERVICE

    with open_node(args, "pub") as node:
        deadline = time.monotonic() + args.replica_timeout
        # Find the stores first (so a lost-disk restart continues after what they hold).
        while (len(node.who_offers("service", name=STORE_SERVICE)) < args.replicas
               and time.monotonic() < deadline):
            time.sleep(0.01)
        with Publisher(node, args.topic, resume_from_stores=max(
                0.1, deadline - time.monotonic())) as pub:
            seqs = [pub.publish(payload_value(x, args.data_json), type=args.type,
                                subject=args.subject) for x in items]
            if seqs:
                try:
                    pub.wait_replicated(seqs[-1], max(0.0, deadline - time.monotonic()),
                                        replicas=args.replicas)
                except ReplicationTimeout:  # a one-line error, exit 1
                    if not args.data_dir:
                        note("the events were only in this command's temporary data dir "
                             "(deleted now): publish again, or give --data-dir")
                    raise
            out = {"stream": args.topic, "seqs": seqs, "node": node.id,
                   "replicas": len(pub.stats().replicated)}
            if args.json:
                print(json.dumps(out), flush=True)
            else:
                print(f"published {len(seqs)} event(s) to {args.topic}"
                      + (f" at seq {seqs[0]}{'..' + str(seqs[-1]) if len(seqs) > 1 else ''}"
                         if seqs else "") + f", held by {args.replicas} store(s)", flush=True)
    return 0


def cmd_sub(args: argparse.Namespace) -> int:
    """``mesh sub``."""
    from mesh.cli._progress import StatusLine
    from patterns.pubsub import Subscriber

    _check_topic(args.topic)
    start = _start(args)
    got = 0
    status = StatusLine()  # "catching up" line for long replays, on a TTY only
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with open_node(args, "sub") as node, Subscriber(
            node, args.topic, start=start, durable=args.durable,
            endpoints=tuple(args.endpoint)) as sub:
        note(f"subscribed to {args.topic}")
        while args.count is None or got < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if args.count is not None:
                    raise MeshTimeout(f"got {got} of {args.count} events within {args.timeout:g} s")
                break
            ev = sub.recv(timeout=0.2 if left is None else min(0.2, left))
            if status.due():
                lag = sub.stats().lag
                if lag > 0:
                    status.show(f"catching up: {got} received, {lag} behind")
                else:
                    status.clear()
            if ev is None:
                continue
            got += 1
            status.clear()
            if args.json:
                print(json.dumps(event_dict(ev), ensure_ascii=False), flush=True)
            else:
                print(f"{ev.stream} #{ev.seq} from {ev.source} {ev.type} {human(ev.data)}",
                      flush=True)
    if sys.stdout.isatty() and not args.json:
        note(f"{got} event(s)")
    return 0
