"""A child process hosting several nodes of one mesh, for the gossip scale tests.

Start it with ``tests.util.python_child(CODE, json.dumps(config), stdin=PIPE, stdout=PIPE)``;
``config``: ``{"count": k, "mesh": ..., "seed": endpoint, "root": dir, "presence": [hb, ev,
gone]}``. It prints one JSON line ``{"ready": [ids]}``, then answers each ``"stats"`` line on
stdin with ``{"stats": [{"peers": n, <counters>}, ...]}``; ``"quit"`` closes the nodes.
"""

from __future__ import annotations

import json
import sys

CODE = "import tests.gossip_child as m; m.main()"
KEYS = ("control_bytes_out", "control_out", "gossip_sent", "gossip_full_sent",
        "gossip_deltas_sent", "gossip_digests_sent", "gossip_mismatches")


def main() -> None:
    from mesh.node import Node, PresenceConfig
    from mesh.peers import PeerState

    cfg = json.loads(sys.argv[1])
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


if __name__ == "__main__":
    main()
