"""Peer-to-peer services with failover: two responders share the calls; one stops, and
every later call goes to the other, with no error.

    python -m examples.p2p_failover

Two nodes offer the "quote" service; a client node calls it by name (no address). The client
balances calls by the free capacity each responder advertises, so both serve. Then one
responder stops: its node says goodbye, the client drops it from the choice at once, and the
calls go to the other one. (A responder that dies *while* running a call makes that call fail
with OutcomeUnknown instead of running it twice; set ClientConfig(retry_on_death=True) for
idempotent handlers. A responder that is only slow or silent keeps its calls.)
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter

from mesh.node import Node
from patterns.reqrep import Client, Incoming, Service


def main(tmp: str) -> None:
    with Node(data_dir=f"{tmp}/client", name="client", interface="127.0.0.1",
              mdns=False) as cnode:
        ep = cnode.info().endpoints["control"][0]
        responders = [Node(data_dir=f"{tmp}/r{i}", name=f"responder-{i}", interface="127.0.0.1",
                           mdns=False, static_peers=(ep,)) for i in (1, 2)]
        services = []
        for node in responders:
            def quote(req: Incoming, name: str = node.name) -> object:
                return {"symbol": req.payload, "price": 42.0, "by": name}
            services.append(Service(node, "quote", quote))
        deadline = time.monotonic() + 10
        while len(cnode.who_offers("service", "quote")) < 2:  # both discovered
            if time.monotonic() > deadline:
                raise SystemExit("responders not discovered")
            time.sleep(0.01)
        with Client(cnode, timeout=3.0, silent_s=0.5) as client:
            served = Counter(client.request("quote", "ZMQ")["by"] for _ in range(20))
            print("both up:", dict(sorted(served.items())))
            assert set(served) == {"responder-1", "responder-2"}, served  # load is split

            services[0].close()  # responder-1 stops serving
            responders[0].close()
            served = Counter(client.request("quote", "ZMQ")["by"] for _ in range(20))
            print("after responder-1 stopped:", dict(served))
            assert set(served) == {"responder-2"}
        services[1].close()
        responders[1].close()
    print("every call answered")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(d)
