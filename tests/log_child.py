"""Crash child for the log tests: appends forever and prints each acknowledged offset.

Usage: python tests/log_child.py PATH MODE [COUNT]
  MODE "one":  log.append() under fsync=always, one record per line printed.
  MODE "many": log.append_many() of 7 records under fsync=always, prints the last offset.
Every payload is ``payload_for(offset)`` so the parent can check content, not only counts.

LOG_CHILD_TORN_AT=N makes the child write half of the batch that holds offset N and then
SIGKILL itself, so a torn tail is certain rather than left to the timing of a kill.
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh.log import (
    FsyncPolicy,
    Log,
    LogConfig,
    segment,
)


def payload_for(offset: int) -> bytes:
    return f"rec:{offset}:".encode() + bytes([offset % 251]) * (offset * 37 % 300)


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1 << 62
    torn_at = os.environ.get("LOG_CHILD_TORN_AT")
    cfg = LogConfig(fsync=FsyncPolicy.always(), segment_bytes=16384, index_interval_bytes=512)
    log = Log.open(path, config=cfg)
    if torn_at is not None:
        target = int(torn_at)
        real_write = os.write

        def torn_write(fd: int, data: bytes | memoryview) -> int:
            if log.next_offset <= target < log.next_offset + 7 and len(data) > 8:
                real_write(fd, bytes(data[: len(data) // 2]))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(fd, data)

        segment._os_write = torn_write
    out = sys.stdout
    done = 0
    while done < count:
        off = log.next_offset
        if mode == "one":
            got = log.append(payload_for(off))
            out.write(f"{got}\n")
        else:
            rng = log.append_many([payload_for(o) for o in range(off, off + 7)])
            out.write(f"{rng[-1]}\n")
        out.flush()
        done += 1
    log.close()


if __name__ == "__main__":
    main()
