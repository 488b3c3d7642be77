"""`mesh store PREFIX --data-dir D` and `mesh pub --replicas K`, as a user runs them: a one-shot
`mesh pub --replicas 1` exits as soon as a store holds its event (its temporary data dir is
gone then), and a late `mesh sub --from beginning` still gets the event, from the store."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.test_cli_observe import LOOP, Bg, ce_text, mesh
from tests.util import unique


def test_one_shot_pub_with_replicas_exits_once_held_and_a_late_subscriber_reads_the_store(
        tmp_path: Path) -> None:
    m, topic = unique("m"), "plant.boiler"
    store = Bg("store", "plant.", "--data-dir", str(tmp_path / "store"), "--mesh", m, *LOOP,
               tmp=tmp_path)
    try:
        ep = store.endpoint()
        t0 = time.monotonic()
        r = mesh("pub", topic, "hot", "--replicas", "1", "--peer", ep, "--mesh", m, *LOOP,
                 "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["seqs"] == [0] and out["replicas"] == 1
        assert time.monotonic() - t0 < 30  # returned once held: no linger, no subscriber
        # The publisher and its (temporary) data dir are gone: only the store has the event.
        s = mesh("sub", topic, "--from", "beginning", "--count", "1", "--timeout", "30",
                 "--json", "--peer", ep, "--mesh", m, *LOOP, timeout=60)
        assert s.returncode == 0, s.stderr
        ce = json.loads(s.stdout.splitlines()[0])
        assert ce_text(ce) == "hot" and ce["meshseq"] == 0
        store.p.send_signal(signal.SIGTERM)
        code, text, err = store.finish()
        assert code == 0, err
        assert "holds plant.boiler" in text
    finally:
        store.stop()


def test_pub_replicas_without_a_store_is_a_one_line_error(tmp_path: Path) -> None:
    m = unique("m")
    r = mesh("pub", "plant.x", "hot", "--replicas", "1", "--replica-timeout", "0.5",
             "--mesh", m, *LOOP, timeout=60)
    assert r.returncode == 1
    assert "held by 0 of 1 store(s)" in r.stderr and "Traceback" not in r.stderr


def test_store_needs_a_data_dir(tmp_path: Path) -> None:
    r = mesh("store", "plant.", "--mesh", unique("m"), *LOOP)
    assert r.returncode == 1 and "--data-dir" in r.stderr and "Traceback" not in r.stderr


def test_mesh_streams_shows_what_a_store_holds_and_its_lag(tmp_path: Path) -> None:
    # `mesh streams DIR` on a store's data dir: each copy (origin, stream, seqs held, the
    # origin's epoch), its lag behind the origin's head from the running store's metrics,
    # and the archives.
    from mesh import Node
    from mesh.metrics import serve_prometheus
    from patterns.pubsub import frames
    from patterns.pubsub.publisher import Publisher
    from patterns.pubsub.store import Store
    from tests.util import wait_until

    stream = unique("s").replace("-", "")
    sdir = tmp_path / "store"
    with Node(data_dir=sdir, interface="127.0.0.1", mdns=False) as sn:
        store = Store(sn, topics=(stream,))
        ep = sn.info().endpoints["control"][0]
        with Node(data_dir=tmp_path / "pub", interface="127.0.0.1", mdns=False,
                  static_peers=(ep,)) as pn:
            wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10)
            with Publisher(pn, stream, replicas=1, heartbeat_s=0.1) as pub:
                pub.publish_many(list(range(30)))
                epoch = pub.stats().epoch
                wait_until(lambda: store.lag().get((pn.id, stream)) == 0, 10,
                           what=lambda: store.lag())
                rep = store._replica((pn.id, stream), create=False)
                assert rep is not None
                store._archive(rep, 10, 30)  # as a new epoch taking 10.. back would
                server, port = serve_prometheus(sn)
                try:
                    r = mesh("streams", str(sdir), "--json", "--metrics",
                             f"http://127.0.0.1:{port}/metrics")
                finally:
                    server.close()
                assert r.returncode == 0, r.stderr
                rows = [x for x in json.loads(r.stdout) if "replica_of" in x]
                copy = next(x for x in rows if "archive" not in x)
                assert (copy["replica_of"], copy["stream"], copy["oldest"], copy["head"],
                        copy["epoch"], copy["records"], copy["lag"]) == (
                    pn.id, stream, 0, 30, epoch, 30, 0)
                arch = next(x for x in rows if "archive" in x)
                assert (arch["oldest"], arch["head"]) == (10, 30)
                r = mesh("streams", str(sdir))
                assert f"{stream} (copy of node {pn.id[:12]}): holds 0..29 " \
                    f"(origin epoch {epoch})" in r.stdout
                assert f"{stream} (archive of node {pn.id[:12]}): holds 10..29" in r.stdout
        store.close()


def test_mesh_top_shows_what_each_store_holds(tmp_path: Path) -> None:
    # `mesh top --once` pointed at a store node: a REPLICAS row per copy (stream, origin by
    # name, store, head, lag behind the origin).
    import os
    import subprocess
    import sys

    from patterns.pubsub import frames
    from patterns.pubsub.publisher import Publisher
    from patterns.pubsub.store import Store
    from tests.util import REPO, ctrl, make_node, wait_until

    m, stream = unique("m"), unique("s").replace("-", "")
    with make_node(tmp_path / "depot", m) as sn, Store(sn, topics=(stream,)) as store, \
            make_node(tmp_path / "sensor", m, (ctrl(sn),)) as pn:
        wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10)
        with Publisher(pn, stream, replicas=1, heartbeat_s=0.1) as pub:
            pub.publish_many(list(range(12)))
            wait_until(lambda: store.lag().get((pn.id, stream)) == 0, 10)
            env = dict(os.environ, PYTHONPATH=REPO)
            base = [sys.executable, "-m", "mesh", "top", "--peer", ctrl(sn), "--no-mdns",
                    "--interface", "127.0.0.1", "--mesh", m, "--name", "topper", "--once",
                    "--timeout", "10"]
            r = subprocess.run([*base, "--json"], env=env, capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
            view = json.loads(r.stdout)
            assert [(x["stream"], x["origin"], x["origin_name"], x["store"], x["head"],
                     x["lag"]) for x in view["replicas"]] == [
                (stream, pn.id, "sensor", "depot", 12, 0)]
            r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            at = lines.index("REPLICAS (1)")
            assert lines[at + 1].split() == ["STREAM", "ORIGIN", "STORE", "HEAD", "LAG"]
            row = lines[at + 2]
            assert row.split() == [stream, "sensor", "depot", "12", "0"]
