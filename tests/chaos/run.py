"""Run one chaos run: ``python -m tests.chaos.run --seed N --duration S [--long]``.

Prints the seed, the fault schedule, what was applied and the report; exits 1 on a violation.
The same seed gives the same schedule (see docs/architecture.md for what it cannot pin).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.chaos import faults
from tests.chaos.harness import Harness
from tests.chaos.invariants import Report, check


def run(seed: int, duration: float, run_dir: Path | None = None,
        kinds: list[str] | None = None, out: object = sys.stdout,
        netns: bool | None = None) -> Report:
    """One run; returns the report (and prints everything a rerun needs).

    ``netns``: None probes whether the roles can run in network namespaces (``partition``
    faults), False never uses them.
    """
    own = run_dir is None
    rd = Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-")) if run_dir is None else run_dir
    h = Harness(rd, seed, duration, kinds=kinds, netns=netns)

    def say(*a: object) -> None:
        print(*a, file=out, flush=True)  # type: ignore[call-overload]

    say(f"chaos seed {seed}, duration {duration}s, run dir {rd}")
    say(f"rerun: python -m tests.chaos.run --seed {seed} --duration {duration}"
        + (f" --kinds {','.join(kinds)}" if kinds else "")
        + (" --no-netns" if netns is False else ""))
    off = h.result.netns_off
    say("network partitions: " + ("on (roles in network namespaces)" if off is None
                                  else f"OFF, no namespaces here: {off}"))
    say("schedule:")
    for f in h.result.schedule:
        say("  ", f)
    by_kind = Counter(f.kind for f in h.result.schedule)
    say("faults by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())))
    try:
        result = h.run()
    finally:
        h.close()
    rep = check(result, h.cfg["subscribers"])
    say("notes:")
    for n in result.notes:
        say("  ", n)
    say("facts:")
    for k, v in rep.facts.items():
        say(f"   {k}: {v}")
    if rep.ok:
        say("OK: every invariant holds")
        if own:
            shutil.rmtree(rd, ignore_errors=True)
    else:
        say(f"VIOLATIONS ({len(rep.violations)}), files kept in {rd}:")
        for v in rep.violations:
            say("  ", v)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__)
    ap.add_argument("--seed", type=int, default=None, help="default: a random seed (printed)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of faults per run")
    ap.add_argument("--long", action="store_true",
                    help="soak: back-to-back runs (seed, seed+1, ...) until --soak-s elapsed")
    ap.add_argument("--soak-s", type=float, default=3600.0)
    ap.add_argument("--kinds", default="", help=f"comma list of {sorted(faults.TARGETS)}")
    ap.add_argument("--run-dir", type=Path, default=None, help="keep the files here")
    ap.add_argument("--no-netns", action="store_true",
                    help="never run roles in network namespaces (no partition faults)")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    kinds = [k for k in a.kinds.split(",") if k] or None
    netns = False if a.no_netns else None
    if not a.long:
        return 0 if run(seed, a.duration, a.run_dir, kinds, netns=netns).ok else 1
    import time
    end = time.monotonic() + a.soak_s
    n = 0
    while time.monotonic() < end:
        if not run(seed + n, a.duration, None, kinds, netns=netns).ok:
            print(f"soak failed at seed {seed + n} after {n} good runs")
            return 1
        n += 1
    print(f"soak: {n} runs, every invariant held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
