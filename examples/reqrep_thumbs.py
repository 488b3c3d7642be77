"""Request/reply example: a "thumbs" service and a client, in one process, two nodes.

    python -m examples.reqrep_thumbs

Shows the sync call, the asyncio call with many in flight, a typed remote error and the
deadline error when nobody offers a name.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

from mesh.node import Node
from patterns.reqrep import (
    AsyncClient,
    Client,
    Incoming,
    NoResponders,
    RemoteError,
    Service,
)


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="reqrep-example-")
    mesh = f"example-{time.time_ns()}"
    with Node(data_dir=f"{tmp}/caller", mesh=mesh, interface="127.0.0.1", mdns=False) as caller:
        control = caller.info().endpoints["control"][0]
        with Node(data_dir=f"{tmp}/worker", mesh=mesh, interface="127.0.0.1", mdns=False,
                  static_peers=(control,)) as worker:
            while not worker.peers.list():  # offer once the caller is live
                time.sleep(0.01)
            svc = Service(worker, "thumbs", concurrency=4)

            @svc.handler
            def thumbs(req: Incoming) -> object:
                if not isinstance(req.payload, dict) or "w" not in req.payload:
                    raise ValueError("payload needs a width 'w'")
                return {"thumb": f"{req.payload['w'] // 4}px", "trace": req.headers}

            while not caller.who_offers("service", "thumbs"):
                time.sleep(0.01)
            with Client(caller) as client:
                print(client.request("thumbs", {"w": 640}, timeout=2.0,
                                     traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-"
                                                 "00f067aa0ba902b7-01"))
                try:
                    client.request("thumbs", {"h": 1}, timeout=2.0)
                except RemoteError as exc:
                    print("remote error:", exc.type, exc.message)
                try:
                    client.request("nobody", b"x", timeout=0.3)
                except NoResponders as exc:
                    print("no responders after", exc.waited, "s")

            async def many() -> None:
                async with AsyncClient(caller) as ac:
                    replies = await asyncio.gather(
                        *(ac.request("thumbs", {"w": w}, timeout=5.0) for w in range(0, 640, 8)))
                    print(len(replies), "async replies, last:", replies[-1]["thumb"])

            asyncio.run(many())
            print("service stats:", svc.stats())
            svc.close()


if __name__ == "__main__":
    main()
