"""The node's data directory: its lock, its stable id, its proof key and its incarnation.

``<data_dir>/node.lock`` makes one live Node per directory; ``node.id`` is the node's stable
id; ``node.proof_key`` is the secret behind the HELLO proof (mesh.membership);
``node.incarnation`` counts the starts (:func:`next_incarnation`). All move with the
directory, so a node keeps its identity across restarts and host moves.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import time
import uuid
from pathlib import Path

from mesh.errors import ConfigError, DataDirInUse

__all__ = ["NODE_ID_RE", "load_node_id", "load_proof_key", "lock_data_dir", "next_incarnation"]

log = logging.getLogger(__name__)

#: A node id: 32 lowercase hex characters (a UUID4 without dashes).
NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def lock_data_dir(data_dir: Path) -> int:
    """Take ``data_dir/node.lock`` (an exclusive ``flock``, which dies with its process) and
    write our pid in it; returns the descriptor to close at the end.

    Raises:
        DataDirInUse: another live Node holds it (its pid is named).
        ConfigError: the lock file cannot be opened.
    """
    path = data_dir / "node.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or None
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DataDirInUse(str(data_dir), holder) from None
        raise ConfigError(f"cannot lock {path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def load_proof_key(data_dir: Path) -> bytes:
    """Read ``data_dir/node.proof_key`` (32 random bytes, mode 0600), creating it when absent.

    A node's HELLOs carry ``HMAC(key, receiver id | endpoint)``; a receiver rebinds a node id
    at once to a new connection showing the proof the old one showed. The key lives with the
    node id, so it survives restarts and moves with the data dir, as the id does.

    Raises:
        ConfigError: the file cannot be read or written, or has the wrong size.
    """
    path = data_dir / "node.proof_key"
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this data dir made it first
            return load_proof_key(data_dir)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc}") from exc
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if len(key) != 32:
        raise ConfigError(f"{path} is damaged ({len(key)} bytes, expected 32); delete it "
                          "(peers then wait a moment before they believe this node's restart)")
    return key


def _fsync_dir(data_dir: Path) -> None:
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_atomic(data_dir: Path, name: str, text: str) -> None:
    """Write ``data_dir/name`` by temp file + fsync + rename + directory fsync."""
    tmp = data_dir / f".{name}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_dir / name)
    _fsync_dir(data_dir)


def load_node_id(data_dir: Path) -> str:
    """Read ``data_dir/node.id``, creating it (atomic write + rename + fsync) when absent.

    Raises:
        ConfigError: the file exists but does not hold a node id, or cannot be written.
    """
    path = data_dir / "node.id"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if text is not None:
        if not NODE_ID_RE.match(text):
            raise ConfigError(f"{path} does not hold a node id (32 hex chars): {text[:40]!r}")
        return text
    node_id = uuid.uuid4().hex
    try:
        _write_atomic(data_dir, "node.id", node_id + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    return node_id


def next_incarnation(data_dir: Path, now_ms: int | None = None) -> int:
    """This start's incarnation: larger than that of every earlier start of ``data_dir``.

    Call it holding ``node.lock`` and before the first HELLO. The rule:
    ``max(previous + 1, wall-clock ms)``, where ``previous`` is the number in
    ``node.incarnation``. The file is rewritten (temp file, fsync, rename, directory fsync)
    before this returns, so no HELLO can carry a number a lost write would let a later start
    use again. Normally the value is the wall-clock time of the start in ms; it keeps growing
    by one when the clock stands still or steps back.

    A damaged file (not a positive decimal integer: disk corruption, a hand edit) gives one
    warning and ``max(wall-clock ms, the file's mtime in ms) + 1``: every earlier value was
    at most the wall-clock time of its start (plus one per start in the same millisecond),
    and the file's mtime is the time of the last write, so this is larger unless the clock
    was set back since. A missing file is a first start (no warning).

    Raises:
        ConfigError: the file cannot be read or written.
    """
    path = data_dir / "node.incarnation"
    wall = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        text = path.read_text(encoding="ascii").strip()
        previous: int | None = int(text) if text.isdigit() else None
        if previous is None or previous <= 0:
            mtime_ms = int(path.stat().st_mtime * 1000)
            log.warning("%s is damaged (%r); this start's incarnation is taken from the clock",
                        path, text[:40])
            value = max(wall, mtime_ms) + 1
        else:
            value = max(previous + 1, wall)
    except FileNotFoundError:
        value = max(1, wall)
    except UnicodeDecodeError:
        log.warning("%s is damaged (not ASCII); this start's incarnation is taken from the "
                    "clock", path)
        value = max(wall, int(path.stat().st_mtime * 1000)) + 1
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        _write_atomic(data_dir, "node.incarnation", f"{value}\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    return value
