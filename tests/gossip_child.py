"""A child process hosting several nodes of one mesh, for the gossip scale tests.

Start it with ``tests.util.python_child(CODE, json.dumps(config), stdin=PIPE, stdout=PIPE)``;
``config``: ``{"count": k, "mesh": ..., "seed": endpoint, "root": dir, "presence": [hb, ev,
gone]}``, and optionally ``"rev": [1, 2]``: the nodes then speak control 1.2 only (they
announce it and answer every mismatch with a full list and a pull, as a 1.2 build does). It prints one JSON line ``{"ready": [ids]}``, then answers each ``"stats"`` line on
stdin with ``{"stats": [{"peers": n, <counters>}, ...]}``; ``"quit"`` closes the nodes.
"""

from __future__ import annotations

import json
import sys

CODE = "import tests.gossip_child as m; m.main()"
KEYS = ("control_bytes_out", "control_out", "gossip_sent", "gossip_full_sent",
        "gossip_deltas_sent", "gossip_digests_sent", "gossip_mismatches", "gossip_backoff",
        "gossip_buckets_sent", "gossip_wants_sent", "gossip_bucket_lists_sent",
        "gossip_bucket_entries_sent", "gossip_list_bytes_sent", "gossip_pulls_sent",
        "gossip_pulls_in", "gossip_dials")


def main() -> None:
    from mesh.node import Node, PresenceConfig
    from mesh.peers import PeerState

    cfg = json.loads(sys.argv[1])
    if cfg.get("rev"):
        _speak(tuple(cfg["rev"]))
    nodes = [Node(data_dir=f"{cfg['root']}/{i}", name=f"g{i}", mesh=cfg["mesh"], mdns=False,
                  interface="127.0.0.1", transports=("tcp",), static_peers=(cfg["seed"],),
                  presence=PresenceConfig(*cfg["presence"]), max_ids_per_source=1024)
             for i in range(cfg["count"])]
    try:
        print(json.dumps({"ready": [n.id for n in nodes]}), flush=True)
        for line in sys.stdin:
            if line.strip() != "stats":
                break
            out = []
            for n in nodes:
                st = n.stats()
                live = sum(1 for r in n.peers.records() if r.state is PeerState.JOINED)
                out.append({"peers": live, **{k: st.get(k, 0) for k in KEYS}})
            print(json.dumps({"stats": out}), flush=True)
    finally:
        for n in nodes:
            n.close()


def _speak(rev: tuple[int, int]) -> None:
    """Make this process's nodes a build of control revision ``rev`` (1.2): they announce it
    in HELLO and UPDATE, and treat every peer as one without buckets (the 1.2 mismatch
    answer: the full list and a pull). They never send a bucket field, so no peer sends
    them one (it goes by their ``rev``)."""
    from typing import Any

    from mesh import channel, control

    write = control.hello_to_wire

    def hello_to_wire(hello: control.Hello) -> dict[str, Any]:
        out = write(hello)
        out["rev"] = list(rev)
        return out

    control.hello_to_wire = hello_to_wire  # type: ignore[assignment]
    channel.gsp.speaks_buckets = lambda _rev: False  # type: ignore[assignment]


if __name__ == "__main__":
    main()
