"""The asyncio client: many requests in flight on one loop, typed errors, deadlines."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from patterns.reqrep import AsyncClient, Incoming, NoResponders, RemoteError, Service
from tests.test_reqrep_real import ctrl, make_node, responders
from tests.util import unique


def test_async_many_in_flight_spread_over_two_responders(tmp_path: Path) -> None:
    mesh, name = unique("m"), unique("svc")
    hub = make_node(tmp_path / "hub", mesh)
    s1 = make_node(tmp_path / "s1", mesh, ctrl(hub))
    s2 = make_node(tmp_path / "s2", mesh, ctrl(hub))

    def handler(req: Incoming) -> object:
        if req.payload == -1:
            raise ValueError("negative")
        time.sleep(0.002)
        return req.payload * 2

    svcs = [Service(s1, name, handler, concurrency=4), Service(s2, name, handler, concurrency=4)]
    try:
        responders(hub, name, 2)

        async def run() -> None:
            async with AsyncClient(hub) as ac:
                got = await asyncio.gather(*(ac.request(name, i, timeout=5.0) for i in range(300)))
                assert got == [i * 2 for i in range(300)]
                with pytest.raises(RemoteError) as info:
                    await ac.request(name, -1, timeout=2.0)
                assert info.value.type == "ValueError"
                t0 = time.monotonic()
                with pytest.raises(NoResponders):
                    await ac.request(unique("none"), 1, timeout=0.3)
                assert 0.3 <= time.monotonic() - t0 < 0.45
                assert ac.stats().replies == 300

        asyncio.run(run())
        executed = [s.stats().executed for s in svcs]
        assert sum(executed) == 301 and min(executed) > 30, executed  # both used, none twice
    finally:
        for s in svcs:
            s.close()
        s1.close()
        s2.close()
        hub.close()
