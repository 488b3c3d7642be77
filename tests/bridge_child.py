"""A bridge in its own process, for the kill tests: ``python tests/bridge_child.py SPEC.json``.

SPEC: {"data_dir", "mesh", "peers": [control endpoints], "bridge": {bridge config mapping}}.
Prints ``READY <node id> <control endpoint>`` once the node and the bridge are started, then runs
until stdin closes or it is killed. The env hook ZEROMESH_BRIDGE_TEST_KILL_BEFORE_APPEND makes
it SIGKILL itself between an inbound receive and the mesh append.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from mesh.node import Node
    from patterns.bridge import Bridge
    from patterns.bridge.config import config_from_mapping

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    node = Node(data_dir=spec["data_dir"], name="bridge", mesh=spec["mesh"], mdns=False,
                interface="127.0.0.1", static_peers=tuple(spec.get("peers", ())))
    bridge = Bridge(node, config_from_mapping(spec["bridge"])).start()
    if not bridge.wait_connected(20):
        raise SystemExit("broker not reachable")
    ctrl = next(e for e in node.info().endpoints["control"] if e.startswith("tcp://"))
    print(f"READY {node.id} {ctrl}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or kills us)
    bridge.close()
    node.close()


if __name__ == "__main__":
    main()
