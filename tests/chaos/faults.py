"""Faults: a seeded random schedule, and the machinery that injects each kind.

Kinds (``Fault.kind``):

* ``kill``: SIGKILL the role, restart it ``duration`` s later (same data directory).
* ``stop``: SIGSTOP the role (a frozen peer: sockets open, nothing answered), SIGCONT later.
* ``stall`` / ``cut``: the role's control link to the hub goes through a userspace TCP proxy
  (:class:`tests.tcp_proxy.Proxy`); ``stall`` stops forwarding bytes both ways, ``cut`` closes every
  connection and refuses new ones, for ``duration`` s.
* ``partition``: the role runs in its own network namespace, on a port of a bridge in the
  root namespace (:class:`tests.netns.HostBridge`); its port goes down (``ip link set ...
  down``) for ``duration`` s, then up. Every packet to and from the role is lost: control
  *and* data sockets, both directions, connections left open (unlike ``stall``/``cut``,
  which only sit on the control link to the hub). Scheduled only when the harness could
  create namespaces (root, ``ip netns``): see :func:`schedule`.
* ``disk_full``: restart the role with ``RLIMIT_FSIZE`` a few KiB above its newest log
  segment (writes then fail with EFBIG); ``duration`` s later restart it without the limit.
* ``torn_tail``: SIGKILL the role, append a torn half-batch of garbage to the newest segment
  of each of its logs (what a crash mid-write leaves), restart it.
* ``lost_tail``: a power cut under the default fsync policy: SIGKILL the role, then cut the
  newest segment of each of its logs back to the start of one of its last three batches
  (records acknowledged, written but not yet fsynced), each log at its own point, restart it.
  A publisher's stream logs, or a producer's ``.tasks`` and ``.journal`` (fsynced by separate
  flushers, so cut apart). The harness writes ``{"ev": "lost_tail", "stream", "from"}`` into
  the role's output, so the checker knows which acknowledged seqs (task ids) the cut took and
  that they are reused under a new writer epoch: subscribers must report a ``StreamReset``
  wherever they had passed them, and no journal fact of a lost task may apply to a new one.
* ``clock_jump``: restart the role with its wall clock a year ahead (``CHAOS_CLOCK_SKEW_S``:
  ``time.time``/``time.time_ns`` patched in the role), for ``duration`` s, then restart it
  with the real clock: what it logged meanwhile carries far-future timestamps, and the
  records after must carry real ones again (the final check compares them with the clock).
* ``flood``: for ``duration`` s, send garbage at every endpoint any role bound: random ZeroMQ
  multiparts through a DEALER, and random bytes on raw TCP connections.
* ``wrong_key``: for ``duration`` s, CURVE DEALERs with a fresh random keypair (and a random
  server key) connect to every endpoint and send: the chaos mesh runs plaintext, so this is
  the handshake-mismatch case; a wrong key against a CURVE mesh is covered by
  tests/test_security_mesh.py.

The schedule is a pure function of the seed and of whether namespaces work (:func:`schedule`), so a failing run is rerun
exactly (the timing of the processes under it still varies: see docs/architecture.md).
"""

from __future__ import annotations

import os
import random
import socket
import threading
from dataclasses import dataclass
from typing import Any

import zmq

#: Which fault kinds make sense for which role kinds (roles with a log for the disk faults).
TARGETS: dict[str, tuple[str, ...]] = {
    "kill": ("pub", "sub", "producer", "worker", "poolworker", "resp", "client"),
    "stop": ("pub", "sub", "producer", "worker", "poolworker", "resp"),
    "stall": ("pub", "sub", "producer", "worker", "poolworker", "resp", "client"),
    "cut": ("pub", "sub", "producer", "worker", "poolworker", "resp", "client"),
    "partition": ("pub", "sub", "producer", "worker", "poolworker", "resp", "client"),
    "disk_full": ("pub", "producer"),
    "torn_tail": ("pub", "producer"),
    "lost_tail": ("pub", "producer"),
    "clock_jump": ("pub",),
    "flood": ("*",),
    "wrong_key": ("*",),
}


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: start ``at`` s into the run, on ``target``, for ``duration`` s."""

    at: float
    kind: str
    target: str
    duration: float

    def __str__(self) -> str:
        return f"t={self.at:6.2f}s  {self.kind:<9} {self.target:<9} for {self.duration:.2f}s"


def schedule(seed: int, duration: float, roles: list[str], kinds: list[str] | None = None,
             mean_gap: float = 1.5, netns: bool = False) -> list[Fault]:
    """The fault schedule of a run: a pure function of its arguments.

    Faults never overlap on the same role; the last one ends well before ``duration`` so the
    mesh has time to recover before the invariants are checked. ``partition`` is drawn only
    when ``netns`` (the roles run in namespaces); without it a seed gives the schedule it gave
    before the kind existed.
    """
    from tests.chaos.roles import kind_of
    rng = random.Random(seed)
    kinds = [k for k in (kinds or sorted(TARGETS)) if netns or k != "partition"]
    if not kinds:
        return []
    busy_until: dict[str, float] = {}
    out: list[Fault] = []
    t = 1.0 + rng.random()
    while True:
        kind = rng.choice(kinds)
        length = round(rng.uniform(0.3, 2.0), 2)
        if t + length > duration - 1.0:
            break
        allowed = TARGETS[kind]
        cands = [r for r in roles if (allowed == ("*",) or kind_of(r) in allowed)
                 and busy_until.get(r, 0) <= t and kind_of(r) != "hub"]
        if allowed == ("*",):
            target = "*"
        elif cands:
            target = rng.choice(cands)
        else:
            t += rng.expovariate(1 / mean_gap)
            continue
        busy_until[target] = t + length + 0.5
        out.append(Fault(round(t, 2), kind, target, length))
        t += rng.expovariate(1 / mean_gap)
    return out


def tear_tail(data_dir: str, rng: random.Random) -> list[str]:
    """Append a torn half-batch (garbage) to the newest segment of every log under
    ``data_dir``; return the files touched. Acknowledged records are left intact: this is
    what a crash in the middle of a write leaves, not bit rot."""
    touched = []
    for root, _dirs, files in os.walk(data_dir):
        segs = sorted(f for f in files if f.endswith(".log"))
        if not segs:
            continue
        path = os.path.join(root, segs[-1])
        # A plausible batch start (length, crc, magic, version) then garbage, cut short.
        junk = (rng.randrange(40, 4000)).to_bytes(4, "little") + rng.randbytes(4) \
            + bytes([0xA7, 1]) + rng.randbytes(rng.randrange(0, 30))
        with open(path, "ab") as f:
            f.write(junk)
        touched.append(path)
    return touched


#: How far ahead the wall clock jumps in a ``clock_jump`` fault.
CLOCK_JUMP_S = 365 * 24 * 3600


def top_is_queue(log_dir: str) -> bool:
    return os.path.basename(os.path.dirname(os.path.dirname(log_dir))) == "queues"


def lose_tail(data_dir: str, rng: random.Random) -> list[tuple[str, int]]:
    """Cut the newest segment of every stream and queue log under ``data_dir`` back to the
    start of one of its last three batches (a power cut took what was not fsynced); return
    ``(log name, first lost offset)`` per log cut."""
    from mesh.log import format as fmt
    cuts = []
    dirs = [os.path.join(data_dir, "streams"), os.path.join(data_dir, "queues", "streams")]
    for name, d in [(n, os.path.join(top, n)) for top in dirs if os.path.isdir(top)
                    for n in sorted(os.listdir(top))]:
        if top_is_queue(d) and not (name.endswith(".tasks") or ".journal" in name):
            continue  # the DLQ logs are fsynced at every write: a power cut keeps them
        segs = sorted(f for f in os.listdir(d) if f.endswith(".log"))
        if not segs:
            continue
        path = os.path.join(d, segs[-1])
        with open(path, "rb") as f:
            buf = f.read()
        starts: list[tuple[int, int]] = []  # (byte position, base offset) of each valid batch
        p = 0
        while p < len(buf):
            try:
                hdr = fmt.check_batch(buf, p)
            except fmt.FrameError:
                break
            starts.append((p, hdr.base_offset))
            p += hdr.length
        if not starts:
            continue
        pos, off = rng.choice(starts[-3:])
        os.truncate(path, pos)
        for f in os.listdir(d):
            if f.endswith(".index"):
                os.unlink(os.path.join(d, f))  # may point past the cut; rebuilt on open
        cuts.append((name, off))
    return cuts


def newest_segment_size(data_dir: str) -> int:
    """Size of the largest newest-segment under ``data_dir`` (for the RLIMIT_FSIZE fault)."""
    size = 0
    for root, _dirs, files in os.walk(data_dir):
        segs = sorted(f for f in files if f.endswith(".log"))
        if segs:
            size = max(size, os.path.getsize(os.path.join(root, segs[-1])))
    return size


class Flood:
    """Sends garbage at a set of tcp endpoints from a thread until stopped."""

    def __init__(self, endpoints: list[str], seed: int, ctx: zmq.Context[Any],
                 curve: bool = False) -> None:
        self.endpoints = endpoints
        self.curve = curve
        self.rng = random.Random(seed)
        self.ctx = ctx
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-flood", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        dealers = []
        for ep in self.endpoints:
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.SNDHWM, 100)
            if self.curve:  # a peer with a key nobody knows
                pub, sec = zmq.curve_keypair()
                d.curve_secretkey, d.curve_publickey = sec, pub
                d.curve_serverkey = zmq.curve_keypair()[0]
            d.connect(ep)
            dealers.append(d)
        try:
            while not self._stop.is_set():
                for d in dealers:
                    frames = [self.rng.randbytes(self.rng.randrange(0, 64))
                              for _ in range(self.rng.randrange(1, 5))]
                    try:
                        d.send_multipart(frames, zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.ZMQError:
                        pass
                for ep in [] if self.curve else self.endpoints:  # raw bytes, no ZMTP greeting
                    host, port = ep.removeprefix("tcp://").rsplit(":", 1)
                    try:
                        with socket.create_connection((host, int(port)), timeout=0.2) as s:
                            s.sendall(self.rng.randbytes(self.rng.randrange(1, 512)))
                            self.sent += 1
                    except OSError:
                        pass
                self._stop.wait(0.005)  # pacing the flood so the two cores still run the mesh
        finally:
            for d in dealers:
                d.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
