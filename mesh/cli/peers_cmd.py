"""``mesh peers``: list the zeromesh nodes announced on the LAN (a passive mDNS browser).

It never announces itself, so running it does not add a node to anyone's peer table. The
state it shows is what mDNS says (``announced``, or ``left`` after a goodbye), not heartbeat
presence, which only a member node knows.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from mesh.peers import PeerInfo
from mesh.txt import TxtRecord


@dataclass
class _Row:
    info: PeerInfo
    truncated: bool
    state: str
    last_seen: float


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``peers`` sub-command."""
    p = subparsers.add_parser("peers", help="list zeromesh nodes announced on the LAN (mDNS)",
                              description=__doc__)
    p.add_argument("--mesh", help="only nodes of this mesh (default: every mesh)")
    p.add_argument("--watch", action="store_true",
                   help="print changes as they happen until Ctrl-C (or --timeout)")
    p.add_argument("--json", action="store_true",
                   help="JSON: a list of objects (with --watch, one object per line)")
    p.add_argument("--interface", default=None,
                   help="IPv4 address(es) or interface name(s) for mDNS, comma-separated "
                        "(default: $ZEROMESH_INTERFACE, else all)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to browse (default 3; with --watch: until Ctrl-C)")
    p.add_argument("--service-type", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _as_dict(row: _Row) -> dict[str, Any]:
    i = row.info
    return {
        "id": i.node_id, "name": i.name, "mesh": i.mesh, "version": i.version, "host": i.host,
        "endpoints": {r: list(e) for r, e in i.endpoints.items()},
        "offers": {k: list(v) for k, v in i.offers.items()},
        "public_key": i.public_key, "state": row.state, "last_seen": row.last_seen,
        "truncated": row.truncated,
    }


def _table(rows: list[_Row]) -> str:
    now = time.time()
    head = ("ID", "NAME", "MESH", "STATE", "SEEN", "ENDPOINTS", "OFFERS")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r.info.mesh, r.info.name, r.info.node_id)):
        eps = " ".join(e for role in sorted(r.info.endpoints) for e in r.info.endpoints[role])
        offers = " ".join(f"{k}:{','.join(v)}" for k, v in sorted(r.info.offers.items()))
        if r.truncated:
            offers += " (more)"
        lines.append((r.info.node_id[:12], r.info.name, r.info.mesh, r.state,
                      f"{now - r.last_seen:.1f}s ago", eps, offers or "-"))
    widths = [max(len(line[c]) for line in lines) for c in range(len(head) - 1)]
    return "\n".join("  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths, strict=False))
                     + "  " + line[-1] for line in lines)


def run(args: argparse.Namespace) -> int:
    """Browse for ``--timeout`` seconds (or watch) and print what was found."""
    # Imported here: zeroconf costs about 0.15 s, and every command builds this parser.
    from mesh.discovery import (
        SERVICE_TYPE,
        DiscoveryConfig,
        MdnsBrowser,
        choose_interfaces,
        open_zeroconf,
    )

    config = DiscoveryConfig(service_type=args.service_type or SERVICE_TYPE)
    addresses = choose_interfaces(args.interface)
    rows: dict[str, _Row] = {}
    lock = threading.Lock()

    def emit(kind: str, row: _Row) -> None:
        if not args.watch:
            return
        if args.json:
            print(json.dumps({"event": kind, **_as_dict(row)}), flush=True)
        else:
            print(f"{kind:<7} {row.info.node_id[:12]}  {row.info.name}  mesh={row.info.mesh}  "
                  + " ".join(e for eps in row.info.endpoints.values() for e in eps), flush=True)

    def on_peer(rec: TxtRecord) -> None:
        with lock:
            old = rows.get(rec.info.node_id)
            row = _Row(rec.info, rec.truncated, "announced", time.time())
            rows[rec.info.node_id] = row
        if old is None or old.state == "left":
            emit("joined", row)
        elif old.info != rec.info:
            emit("changed", row)

    def on_goodbye(node_id: str) -> None:
        with lock:
            row = rows.get(node_id)
            if row is None:
                return
            row.state = "left"
            row.last_seen = time.time()
        emit("left", row)

    zc = open_zeroconf(addresses)
    browser = MdnsBrowser(zc, service_type=config.service_type, mesh=args.mesh,
                          on_peer=on_peer, on_goodbye=on_goodbye,
                          resolve_timeout=config.resolve_timeout)
    try:
        browser.start()
        timeout = args.timeout if args.timeout is not None else (None if args.watch else 3.0)
        # Browsing has no "done": answers arrive as peers respond, so wait out the window.
        threading.Event().wait(timeout)
    finally:
        browser.close()
        zc.close()
    if args.watch:
        return 0
    with lock:
        found = list(rows.values())
    if args.json:
        json.dump([_as_dict(r) for r in found], sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif found:
        print(_table(found))
    else:
        print("no zeromesh nodes found", file=sys.stderr)
    return 0
