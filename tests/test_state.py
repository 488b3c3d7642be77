"""The crash-safe state store: API, typed errors, and survival of SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import pytest

from mesh.errors import ClosedError, StateError
from mesh.state import StateStore
from tests.util import python_child


def test_put_get_items_delete(data_dir: Path) -> None:
    with StateStore(data_dir / "state.db") as st:
        assert st.get("cursors", "a", 7) == 7
        st.put("cursors", "a", 10)
        st.put_many("cursors", {"b": {"off": 3, "raw": b"\x00"}, "c": [1, 2]})
        st.put("other", "a", "x")
        assert st.get("cursors", "a") == 10
        assert list(st.items("cursors")) == [("a", 10), ("b", {"off": 3, "raw": b"\x00"}),
                                             ("c", [1, 2])]
        assert st.delete("cursors", "a") and not st.delete("cursors", "a")
        assert st.namespaces() == ["cursors", "other"]
    with StateStore(data_dir / "state.db") as st:
        assert st.get("cursors", "c") == [1, 2]


def test_bad_values_and_closed_store_get_typed_errors(data_dir: Path) -> None:
    st = StateStore(data_dir / "s.db")
    with pytest.raises(StateError):
        st.put("ns", "k", object())
    with pytest.raises(StateError):
        st.put_many("ns", {"ok": 1, "bad": object()})
    assert st.get("ns", "ok") is None  # nothing of the failed batch was stored
    st.close()
    st.close()
    with pytest.raises(ClosedError):
        st.get("ns", "k")
    (data_dir / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError):
        StateStore(data_dir / "junk.db")


def test_threads_share_one_store(data_dir: Path) -> None:
    with StateStore(data_dir / "t.db") as st:
        def work(n: int) -> None:
            for i in range(50):
                st.put(f"w{n}", str(i), i)
        ts = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert all(len(list(st.items(f"w{n}"))) == 50 for n in range(4))


CHILD = """
import sys
from mesh.state import StateStore
st = StateStore(sys.argv[1])
i = st.get("c", "n", 0)
while True:
    i += 1
    st.put_many("c", {"n": i, "copy": i})
    print(i, flush=True)
"""


def test_sigkilled_writer_loses_no_acknowledged_put(data_dir: Path) -> None:
    db = data_dir / "crash.db"
    acked = 0
    for round_ in range(5):
        child = python_child(CHILD, str(db), stdout=subprocess.PIPE)
        assert child.stdout is not None
        for _ in range(5 + round_ * 7):
            acked = int(child.stdout.readline())
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=10)
        if rest.split():
            acked = int(rest.split()[-1])
        with StateStore(db) as st:
            n = st.get("c", "n")
            assert n >= acked and st.get("c", "copy") == n  # both keys of one put_many
    assert acked > 5


def test_the_write_ahead_file_shrinks_after_a_large_transaction(tmp_path: Path) -> None:
    # One 24 MB transaction grows the WAL to about that; later commits checkpoint it, and it
    # is cut back (before: it kept its largest size forever).
    store = StateStore(tmp_path / "s.db")
    wal = tmp_path / "s.db-wal"
    try:
        store.put_many("big", {str(i): b"x" * 1024 for i in range(24_000)})
        peak = wal.stat().st_size
        assert peak > 20 << 20
        for i in range(5):
            store.delete("big", str(i))  # small commits: the auto-checkpoint runs
        assert wal.stat().st_size <= 4 << 20, (peak, wal.stat().st_size)
    finally:
        store.close()
