"""Helpers shared by the tests: waiting on conditions, unique names, child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(
    cond: Callable[[], T], timeout: float = 5.0, interval: float = 0.005, what: str = ""
) -> T:
    """Poll ``cond`` until it returns a truthy value; return it, or fail after ``timeout``.

    This is the only way tests wait: on a condition with a deadline, never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or cond!r}")
        # Back off a little so a busy poll does not steal the CPU from the processes under test.
        time.sleep(interval)  # a poll interval, not a fixed wait for an outcome
        interval = min(interval * 1.5, 0.05)


def unique(prefix: str = "t") -> str:
    """A name no other test (or parallel run) uses: for topics, meshes, queues."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def python_child(code: str, *args: str, env: dict[str, str] | None = None,
                 **popen: object) -> subprocess.Popen[bytes]:
    """Start ``python -c code args...`` with this repository importable."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", code, *args], env=full_env, **popen
    )
