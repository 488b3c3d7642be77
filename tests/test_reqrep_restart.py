"""A request id survives a responder restart: a real responder process is SIGKILLed in the
middle of a handler, or after its reply, and restarted on the same data directory; the retry
(same id, same payload) gets OutcomeUnknown or the original reply, never a second run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mesh.errors import MeshError
from mesh.node import Node
from patterns.reqrep import Client, OutcomeUnknown, Service
from tests.test_reqrep_real import hub, kill, lines, make_node, responders, start_child
from tests.util import unique, wait_until

__all__ = ["hub"]  # the fixture, imported for pytest


def _restart(tmp_path: Path, hub: Node, name: str, rec: Path, data: Path, **kw: int
             ) -> object:
    # wait for the mesh to see the dead one gone first (see test_reqrep_real)
    wait_until(lambda: not hub.who_offers("service", name), 10, what="responder gone")
    p = start_child(tmp_path, hub, name, rec, data=data, **kw)
    responders(hub, name, 1)
    return p


def test_killed_mid_handler_retry_after_restart_gets_outcome_unknown(
        tmp_path: Path, hub: Node) -> None:
    name, rid = unique("svc"), unique("rid")
    rec, data = tmp_path / "a.rec", tmp_path / "a"
    started = Path(str(rec) + ".started")
    p = start_child(tmp_path, hub, name, rec, delay_ms=60_000, data=data)
    p2 = None
    client = Client(hub, heartbeat_s=0.1, liveness=3)
    try:
        responders(hub, name, 1)
        first: list[BaseException] = []

        def call() -> None:
            try:
                client.request(name, {"x": 1}, timeout=1.5, request_id=rid)
            except MeshError as exc:
                first.append(exc)

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: rid in lines(started), 10, what="handler started")
        kill(p)  # in the middle of the handler
        t.join(10)
        assert first, "the first call cannot have succeeded"
        p2 = _restart(tmp_path, hub, name, rec, data, delay_ms=0)
        with pytest.raises(OutcomeUnknown) as info:
            client.request(name, {"x": 1}, timeout=5, request_id=rid)
        assert "running when this responder died" in info.value.message
        # once more: the restarted responder keeps answering the same way
        with pytest.raises(OutcomeUnknown):
            client.request(name, {"x": 1}, timeout=5, request_id=rid)
        assert lines(started) == [rid], "the handler ran again after the restart"
        assert rid not in lines(rec)
        # a new id runs normally on the restarted responder
        assert client.request(name, {"x": 2}, timeout=5, request_id=rid + "b") == {"x": 2}
    finally:
        client.close()
        kill(p)
        if p2 is not None:
            kill(p2)  # type: ignore[arg-type]


def test_killed_after_reply_retry_after_restart_gets_the_stored_reply(
        tmp_path: Path, hub: Node) -> None:
    name, rid = unique("svc"), unique("rid")
    rec, data = tmp_path / "a.rec", tmp_path / "a"
    p = start_child(tmp_path, hub, name, rec, delay_ms=0, data=data)
    p2 = None
    client = Client(hub, heartbeat_s=0.1, liveness=3)
    try:
        responders(hub, name, 1)
        assert client.request(name, {"v": "one"}, timeout=5, request_id=rid) == {"v": "one"}
        assert client.request(name, "boom-free", timeout=5, request_id=rid + "e") == "boom-free"
        kill(p)  # after the reply
        p2 = _restart(tmp_path, hub, name, rec, data, delay_ms=0)
        assert client.request(name, {"v": "one"}, timeout=5, request_id=rid) == {"v": "one"}
        assert client.request(name, "boom-free", timeout=5, request_id=rid + "e") == "boom-free"
        assert lines(rec) == [rid, rid + "e"], "a request ran again after the restart"
    finally:
        client.close()
        kill(p)
        if p2 is not None:
            kill(p2)  # type: ignore[arg-type]


def test_outcome_log_off_keeps_replies_in_memory_only(tmp_path: Path) -> None:
    node = make_node(tmp_path / "n", unique("m"))
    try:
        with Service(node, "plain", lambda r: r.payload, outcome_log=False):
            pass
        assert not (tmp_path / "n" / "reqrep" / "streams" / "plain.outcomes").exists()
        with Service(node, "logged", lambda r: r.payload):
            pass
        assert (tmp_path / "n" / "reqrep" / "streams" / "logged.outcomes").is_dir()
    finally:
        node.close()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_outcome_log_is_bounded_and_keeps_a_long_running_request_across_trims(
        tmp_path: Path) -> None:
    mesh = unique("m")
    s = make_node(tmp_path / "s", mesh)
    ctrl = next(e for e in s.info().endpoints["control"] if e.startswith("tcp://"))
    c = make_node(tmp_path / "c", mesh, ctrl)
    name = unique("svc")
    limit = 256 << 10
    svc = Service(s, name, cache_max_bytes=limit)
    client = Client(c, heartbeat_s=0.1, liveness=3)
    held: list[object] = []
    answered: list[str] = []
    try:
        def serve() -> None:
            for req in svc.requests():
                if req.id == "long":
                    held.append(req)  # never answered: still running at the "crash"
                else:
                    req.reply(req.payload)
                    answered.append(req.id)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        wait_until(lambda: c.who_offers("service", name), 10, what="offer")
        with pytest.raises(MeshError):
            client.request(name, "x", timeout=0.3, request_id="long")
        assert held
        body = b"b" * 1024
        for i in range(600):  # about 2.4 x cache_max_bytes of replies
            assert client.request(name, body, timeout=5, request_id=f"r{i}") == body
        olog = tmp_path / "s" / "reqrep" / "streams" / f"{name}.outcomes"
        # retention (window, cache_max_bytes) plus the floor of the running request (capped
        # at cache_max_bytes more) plus the active segment
        assert _dir_bytes(olog) < 2 * limit + (64 << 10) + (32 << 10), _dir_bytes(olog)
        svc.close()
        t.join(5)
        svc = Service(s, name, lambda r: r.payload, cache_max_bytes=limit)
        wait_until(lambda: c.who_offers("service", name), 10, what="offer again")
        with pytest.raises(OutcomeUnknown):
            client.request(name, "x", timeout=5, request_id="long")
        assert client.request(name, body, timeout=5, request_id="r599") == body
        assert svc.stats().executed == 0, "a request ran again after the restart"
        assert svc.stats().outcome_unknown == 1
    finally:
        client.close()
        svc.close()
        c.close()
        s.close()


def test_damaged_outcome_log_never_runs_a_retry_again(tmp_path: Path) -> None:
    mesh = unique("m")
    s = make_node(tmp_path / "s", mesh)
    ctrl = next(e for e in s.info().endpoints["control"] if e.startswith("tcp://"))
    c = make_node(tmp_path / "c", mesh, ctrl)
    name = unique("svc")
    svc = Service(s, name, lambda r: r.payload)
    client = Client(c)
    try:
        wait_until(lambda: c.who_offers("service", name), 10, what="offer")
        for i in range(40):
            assert client.request(name, f"p{i}", timeout=5, request_id=f"r{i}") == f"p{i}"
        svc.close()
        seg = next((tmp_path / "s" / "reqrep" / "streams").glob("*.outcomes/*.log"))
        raw = bytearray(seg.read_bytes())
        for where in (len(raw) // 3, 2 * len(raw) // 3):  # two records in the middle
            raw[where] ^= 0xFF
        seg.write_bytes(bytes(raw))
        svc = Service(s, name, lambda r: r.payload)  # opens: the damage is skipped
        assert svc._olog is not None and svc._olog.stats().corrupt_records >= 1
        wait_until(lambda: c.who_offers("service", name), 10, what="offer again")
        unknown = 0
        for i in range(40):
            try:
                assert client.request(name, f"p{i}", timeout=5, request_id=f"r{i}") == f"p{i}"
            except OutcomeUnknown:
                unknown += 1  # its reply record was the damaged one
        assert svc.stats().executed == 0, "a retry ran again after the restart"
        assert unknown <= 2
    finally:
        client.close()
        svc.close()
        c.close()
        s.close()


def test_a_full_disk_never_runs_a_request_whose_running_mark_was_not_written(
        tmp_path: Path) -> None:
    # A request run without its RUNNING record could run again after a crash and restart
    # (nothing says it started). With the disk full such requests are refused unrun (BUSY):
    # every request that ran has its RUNNING record in the log.
    import os
    import subprocess

    import msgpack

    from mesh.log import LogDirectory
    from patterns.reqrep import ServiceBusy

    odir = tmp_path / "srv" / "reqrep" / "streams" / "full.outcomes"
    odir.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(odir)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    mesh = unique("m")
    hub = make_node(tmp_path / "hub", mesh)
    srv = make_node(tmp_path / "srv", mesh, next(
        e for e in hub.info().endpoints["control"] if e.startswith("tcp://")))
    ran: list[str] = []
    busy: list[str] = []
    try:
        with Service(srv, "full", lambda r: ran.append(r.id) or r.payload) as svc, \
                Client(hub, heartbeat_s=0.05) as client:
            responders(hub, "full", 1)
            assert client.request("full", b"before", timeout=5.0) == b"before"
            filler = odir / "filler"
            with open(filler, "wb", buffering=0) as f:  # to the last byte
                for chunk in (65536, 4096, 64, 1):
                    try:
                        while True:
                            f.write(b"\0" * chunk)
                    except OSError:
                        pass
            for i in range(40):
                try:
                    client.request("full", b"x" * 512, timeout=0.3, request_id=f"full-{i}")
                except ServiceBusy:
                    busy.append(f"full-{i}")
            assert svc.stats().outcome_log_errors >= 1
            os.unlink(filler)
        marked = set()
        lg = LogDirectory(tmp_path / "srv" / "reqrep").open("full.outcomes")
        try:
            for rec in lg.iter(lg.first_offset or 0):
                kind, _caller, rid, _digest, _frames = msgpack.unpackb(rec.payload, raw=False)
                if kind == 1:
                    marked.add(rid)
        finally:
            lg.close()
        unmarked = [rid for rid in ran if rid not in marked]
        assert not unmarked, f"ran without a RUNNING record: {unmarked} (busy: {busy})"
    finally:
        srv.close()
        hub.close()
        subprocess.run(["umount", "-l", str(odir)], capture_output=True)
