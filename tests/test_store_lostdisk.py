"""A publisher that lost its log, with real processes (tests/store_child.py): with
``resume_from_stores`` (here through ``replicas=1``) a missing, wiped, emptied or damaged log
continues after what the stores hold, under a new epoch; without it the new epoch starts at
seq 0 and the store keeps the range it takes back in an archive (docs/architecture.md,
"Replicated streams")."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mesh.envelope import decode
from mesh.log import LogConfig
from mesh.node import Node
from patterns.pubsub.store import ARCHIVE_DIR, _Replica
from tests.test_store_procs import Child, children, held, hub, replica_content, start
from tests.util import ctrl, wait_until

__all__ = ["children", "hub"]  # the fixtures, used by name

N = 300


def _publish_and_lose(tmp_path: Path, hub: Node, children: list[Child], stream: str,
                      ) -> tuple[Child, Path, str]:
    peer = ctrl(hub)
    st = start(children, "store", str(tmp_path / "store"), hub.mesh, peer, "plant.")
    wait_until(lambda: st.has("READY"), 20, what="store up")
    pub_dir = tmp_path / "pub"
    pub = start(children, "pub", str(pub_dir), hub.mesh, peer, stream, "0", str(N), "1", "100")
    wait_until(lambda: pub.has("DONE"), 60, what=lambda: pub.lines[-3:])
    assert pub.has("ACK") == f"ACK {N - 1}"  # the store acked all of it
    origin = (pub_dir / "node.id").read_text().strip()
    pub.kill()
    wait_until(lambda: not hub.who_offers("stream", name=stream), 20, what="origin gone")
    return st, pub_dir, origin


def _lose(log_dir: Path, how: str) -> None:
    segs = sorted(p for p in log_dir.iterdir() if p.name.endswith(".log"))
    if how == "missing":
        shutil.rmtree(log_dir)
    elif how == "wiped":  # the directory is there, nothing in it
        for p in log_dir.iterdir():
            p.unlink()
    elif how == "emptied":  # the files are there, with no byte in them
        for p in log_dir.iterdir():
            if p.is_file():
                os.truncate(p, 0)
    elif how == "damaged":  # a segment that overlaps the first: the log cannot be opened
        shutil.copy(segs[0], log_dir / f"{5:020d}.log")


@pytest.mark.parametrize("how", ["wiped", "emptied", "damaged"])
def test_a_lost_log_continues_after_what_the_stores_hold(
        tmp_path: Path, hub: Node, children: list[Child], how: str) -> None:
    stream = "plant.level"
    st, pub_dir, origin = _publish_and_lose(tmp_path, hub, children, stream)
    log_dir = pub_dir / "streams" / stream
    _lose(log_dir, how)
    pub2 = start(children, "pub", str(pub_dir), hub.mesh, ctrl(hub), stream, str(N), "50",
                 "1", "50")
    wait_until(lambda: pub2.has("DONE"), 60, what=lambda: pub2.lines[-3:])
    head = pub2.has("HEAD")
    assert head is not None and int(head.split()[1]) == N, head  # no seq reused
    wait_until(lambda: held(st, origin, stream) == N + 50, 20, what=lambda: st.lines[-2:])
    pub2.stop()
    st.stop()
    got = replica_content(tmp_path / "store", origin, stream)
    assert [(s, decode(e).data) for s, e in got] == [(i, i) for i in range(N + 50)]
    assert not (tmp_path / "store" / "replicas" / ARCHIVE_DIR).exists()  # nothing taken back
    aside = list((pub_dir / "aside").iterdir()) if (pub_dir / "aside").exists() else []
    if how == "wiped":
        assert aside == []
    else:  # the damaged or emptied log is kept for the operator, out of streams/
        assert [p.name.split(".")[:3] for p in aside] == [
            [*stream.split("."), "damaged" if how == "damaged" else "empty"]]


def _archives(store_dir: Path, origin: str, stream: str) -> list[list[tuple[int, bytes]]]:
    out = []
    root = store_dir / "replicas" / ARCHIVE_DIR
    for d in sorted(root.iterdir()) if root.exists() else []:
        rep = _Replica(d, origin, stream, LogConfig())
        try:
            out.append([(s, rep.read(s, 1)[1][0]) for s in range(rep.oldest or 0,
                                                                  rep.head or 0)])
        finally:
            rep.close()
    return out


def test_without_resume_the_store_keeps_what_the_new_epoch_takes_back(
        tmp_path: Path, hub: Node, children: list[Child]) -> None:
    # The device is replaced (same identity, nothing else) and its publisher does not ask
    # the stores: the new epoch starts at seq 0, subscribers get a StreamReset, the copy
    # follows the origin (the authority) -- and the old epoch's history the store had
    # acked is not destroyed: it is in an archive, byte for byte.
    stream = "plant.flow"
    st, pub_dir, origin = _publish_and_lose(tmp_path, hub, children, stream)
    shutil.rmtree(pub_dir / "streams")
    pub2 = start(children, "pub", str(pub_dir), hub.mesh, ctrl(hub), stream, "1000", "100",
                 "0", "100")
    wait_until(lambda: pub2.has("DONE"), 60, what=lambda: pub2.lines[-3:])
    head = pub2.has("HEAD")
    assert head is not None and head.split()[1] == "0"  # a new log, at seq 0
    wait_until(lambda: held(st, origin, stream) == 100 and any(
        x.startswith(f"HOLD {origin} {stream} ") and int(x.split()[3]) < N for x in st.lines),
        20, what=lambda: st.lines[-3:])
    pub2.stop()
    st.stop()
    got = replica_content(tmp_path / "store", origin, stream)
    assert [(s, decode(e).data) for s, e in got] == [(i, 1000 + i) for i in range(100)]
    arch = _archives(tmp_path / "store", origin, stream)
    assert len(arch) == 1, arch
    assert [(s, decode(e).data) for s, e in arch[0]] == [(i, i) for i in range(N)]


def test_a_log_that_lost_its_tail_continues_after_what_the_stores_hold(
        tmp_path: Path, hub: Node, children: list[Child]) -> None:
    # A power cut took the publisher's unsynced tail, which the store had already copied
    # and acked: the restarted publisher must not give those seqs to new events.
    stream = "plant.valve"
    st, pub_dir, origin = _publish_and_lose(tmp_path, hub, children, stream)
    log_dir = pub_dir / "streams" / stream
    seg = max(p for p in log_dir.iterdir() if p.name.endswith(".log"))
    os.truncate(seg, seg.stat().st_size // 2)
    pub2 = start(children, "pub", str(pub_dir), hub.mesh, ctrl(hub), stream, str(N), "50",
                 "1", "50")
    wait_until(lambda: pub2.has("DONE"), 60, what=lambda: pub2.lines[-3:])
    head = pub2.has("HEAD")
    assert head is not None and int(head.split()[1]) == N, head
    wait_until(lambda: held(st, origin, stream) == N + 50, 20, what=lambda: st.lines[-2:])
    pub2.stop()
    st.stop()
    got = replica_content(tmp_path / "store", origin, stream)
    assert [(s, decode(e).data) for s, e in got] == [(i, i) for i in range(N + 50)]
    assert not (tmp_path / "store" / "replicas" / ARCHIVE_DIR).exists()
    assert [p.name.split(".")[2] for p in (pub_dir / "aside").iterdir()] == ["behind"]
