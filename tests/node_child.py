"""A runnable node process for multi-process tests.

Start it with ``tests.util.python_child(CHILD, json.dumps(config), stdin=PIPE, stdout=PIPE)``
where ``CHILD`` is :data:`CODE`. ``config`` holds NodeConfig fields (``presence`` as a list
``[heartbeat, evasive, gone]``). It prints one JSON object per line on stdout:

    {"event": "ready", "id": ..., "name": ..., "endpoints": {...}}
    {"event": "joined" | "changed" | "evasive" | "left", "peer": id, "name": ...}
    {"event": "msg", "from": id, "kind": ..., "body": ...}        (kind "test.echo" / "test.msg")

and reads JSON commands on stdin, one per line:

    {"send": peer_id, "kind": "test.msg", "body": ...}
    {"quit": true}

A "test.echo" message is answered with a "test.msg" carrying the same body.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

CODE = "import tests.node_child as m; m.main()"

_out_lock = threading.Lock()


def emit(obj: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def main() -> None:
    from mesh.node import Node, NodeConfig, PresenceConfig
    from mesh.peers import PeerEvent

    cfg: dict[str, Any] = json.loads(sys.argv[1])
    if "presence" in cfg:
        cfg["presence"] = PresenceConfig(*cfg["presence"])
    for key in ("static_peers", "seeds"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    cfg.setdefault("mdns", False)
    node = Node(NodeConfig(**cfg))

    def on_peer(ev: PeerEvent) -> None:
        emit({"event": ev.kind.value, "peer": ev.peer.node_id, "name": ev.peer.name})

    def on_msg(kind: str) -> Any:
        def handler(peer_id: str, body: Any) -> None:
            emit({"event": "msg", "from": peer_id, "kind": kind, "body": body})
            if kind == "test.echo":
                node.send(peer_id, "test.msg", body)

        return handler

    node.on_peer(on_peer)
    node.handle("test.msg", on_msg("test.msg"))
    node.handle("test.echo", on_msg("test.echo"))
    info = node.info()
    emit({"event": "ready", "id": node.id, "name": node.name,
          "endpoints": {k: list(v) for k, v in info.endpoints.items()}})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("quit"):
                break
            if "send" in cmd:
                try:
                    node.send(cmd["send"], cmd["kind"], cmd.get("body"))
                except Exception as exc:
                    emit({"event": "error", "error": repr(exc)})
    finally:
        node.close()
        emit({"event": "closed"})


if __name__ == "__main__":
    main()
