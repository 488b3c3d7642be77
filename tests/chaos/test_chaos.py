"""The CI chaos runs: a fixed seed always, and one random seed (printed, so a failure is rerun
with ``python -m tests.chaos.run --seed N --duration S``) when ``ZEROMESH_CHAOS_RANDOM=1``.

CI runs the fixed seed only: a failure there is reproducible from the seed alone. Random seeds
explore new schedules, which is the soak's job (``python -m tests.chaos.run --long``); a new
schedule that breaks an invariant is a finding to reproduce and fix, not a red build that a
rerun turns green. About 20-25 s each on 2 busy cores."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from tests import netns
from tests.chaos import faults
from tests.chaos.harness import ROLES
from tests.chaos.run import run

DURATION = 16.0
SEED = 1987


def _run(seed: int, tmp_path: Path, kinds: list[str] | None = None) -> None:
    buf = io.StringIO()
    rep = run(seed, DURATION, tmp_path / "run", kinds=kinds, out=buf)
    assert rep.ok, buf.getvalue()
    # The run must really have exercised the mesh, not passed on an idle one.
    assert rep.facts["acked_publishes"] > 500, buf.getvalue()
    assert rep.facts["tasks_pushed"] > 200 and rep.facts["requests_ok"] > 100, buf.getvalue()
    # A clock jump was judged on a record its role wrote after the jump back, not skipped.
    jumped = {f.target for f in faults.schedule(seed, DURATION, ROLES,
                                                netns=netns.available() is None)
              if f.kind == "clock_jump" and (kinds is None or "clock_jump" in kinds)}
    for role in jumped:
        assert f"{role}_last_record_clock_skew_s" in rep.facts, buf.getvalue()


@pytest.mark.timeout(110)
def test_fixed_seed_every_fault_kind(tmp_path: Path) -> None:
    # Seed 1987's schedule holds all 11 kinds within DURATION where the roles run in network
    # namespaces (a clock jump and then a lost tail on pub0, among them); without namespaces
    # (not root) the same seed draws 6 kinds, no partition, and the run says so.
    netns_ok = netns.available() is None
    sched = faults.schedule(SEED, DURATION, ROLES, netns=netns_ok)
    kinds = {f.kind for f in sched}
    if netns_ok:
        assert "partition" in kinds and len(kinds) == len(faults.TARGETS), sched
    else:
        print(f"chaos CI run without partition faults: {netns.available()}")
        assert "partition" not in kinds and len(kinds) >= 6, sched
    _run(SEED, tmp_path)


@pytest.mark.timeout(110)
def test_power_cuts_of_publishers_and_the_work_queue(tmp_path: Path) -> None:
    # Seed 1, kinds lost_tail and kill over 12 s: three power cuts of publishers' streams and
    # two of the producer's .tasks and .journal (cut at different points), among kills. Every
    # acknowledged event or task the cut did not take is delivered, subscribers report a
    # StreamReset where they had passed a lost seq, and no journal fact of a lost task applies
    # to the new task that reuses its id (it would vanish: never acked, never dead-lettered).
    sched = faults.schedule(1, 12.0, ROLES, kinds=["lost_tail", "kill"])
    cut = [f.target for f in sched if f.kind == "lost_tail"]
    assert cut.count("producer") == 2 and any(t.startswith("pub") for t in cut), sched
    buf = io.StringIO()
    rep = run(1, 12.0, tmp_path / "run", kinds=["lost_tail", "kill"], out=buf)
    assert rep.ok, buf.getvalue()
    assert rep.facts["tasks_lost_by_power_cuts"] > 0, buf.getvalue()
    assert rep.facts["acked_lost_by_power_cuts"] > 0, buf.getvalue()


@pytest.mark.timeout(110)
@pytest.mark.skipif(os.environ.get("ZEROMESH_CHAOS_RANDOM") != "1",
                    reason="random-seed chaos runs with ZEROMESH_CHAOS_RANDOM=1 (CI runs the "
                           "reproducible fixed seed)")
def test_random_seed(tmp_path: Path) -> None:
    seed = random.randrange(1 << 31)
    print(f"chaos random seed {seed}: rerun with python -m tests.chaos.run --seed {seed} "
          f"--duration {DURATION}")
    _run(seed, tmp_path)
