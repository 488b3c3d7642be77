"""A data directory holding one log per stream: ``<root>/streams/<name>/``."""

from __future__ import annotations

import dataclasses
import os
import re
import threading

from mesh.errors import ConfigError
from mesh.log.log import Log, LogConfig

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def validate_stream_name(name: str) -> str:
    """Return ``name`` if it is a valid stream name, else raise.

    A stream name is 1-200 characters of ``A-Z a-z 0-9 . _ -``, not starting with ``.`` or
    ``-``: it becomes a directory name, so nothing that could climb out of the data
    directory or hide a file is accepted.

    Raises:
        ConfigError: the name is not valid.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"invalid stream name {name!r}: use 1-200 of A-Z a-z 0-9 . _ -, "
                          "not starting with . or -")
    return name


# At-rest keys per data directory (real path), registered by the node that owns it, so every
# durable log a pattern opens there (streams, queues, DLQs) is encrypted without the patterns
# having to carry the key.
_KEYS: dict[str, bytes] = {}
_KEYS_LOCK = threading.Lock()


def set_atrest_key(root: str | os.PathLike[str], key: bytes | None) -> None:
    """Make every :class:`LogDirectory` in or below ``root`` encrypt with ``key`` (None: stop).

    The node calls this when ``SecurityConfig.atrest`` is on, with the key from its keystore.
    """
    real = os.path.realpath(os.fspath(root))
    with _KEYS_LOCK:
        if key is None:
            _KEYS.pop(real, None)
        else:
            _KEYS[real] = key


def _registered_key(root: str) -> bytes | None:
    # The node registers its data directory; patterns open LogDirectory on it or on a
    # directory below it (e.g. <data_dir>/streams): the nearest registered ancestor wins.
    path = os.path.realpath(root)
    with _KEYS_LOCK:
        while True:
            key = _KEYS.get(path)
            if key is not None:
                return key
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent


class LogDirectory:
    """The streams of one data directory.

    Args:
        root: the data directory; logs live in ``root/streams/<stream>/``.
        key: a 32-byte at-rest key: each log opened here is sealed with a
            ``RecordCipher(key, aad=stream name)`` unless its config brings a cipher. None:
            the key registered with :func:`set_atrest_key` for ``root`` or the nearest
            directory above it, if any.
    """

    def __init__(self, root: str | os.PathLike[str], *, key: bytes | None = None) -> None:
        self.root = os.fspath(root)
        self.streams_dir = os.path.join(self.root, "streams")
        if key is None and _KEYS:
            key = _registered_key(self.root)
        self.key = key

    def path_for(self, stream: str) -> str:
        """The directory of ``stream``'s log.

        Raises:
            ConfigError: the stream name is not valid.
        """
        return os.path.join(self.streams_dir, validate_stream_name(stream))

    def open(self, stream: str, config: LogConfig | None = None, *,
             readonly: bool = False, start_offset: int = 0) -> Log:
        """Open (creating it when writing) the log of ``stream``; see :meth:`Log.open`.

        Raises:
            ConfigError: the stream name is not valid.
            DecryptionFailed: the log is encrypted under another key, or encrypted and opened
                without one (or plaintext and opened with one).
            LogLocked: another process writes this stream.
            LogError: the log cannot be opened.
        """
        path = self.path_for(stream)
        if self.key is not None and (config is None or config.cipher is None):
            from mesh.security.atrest import RecordCipher  # only when encryption is on

            config = dataclasses.replace(config or LogConfig(),
                                         cipher=RecordCipher(self.key, aad=stream.encode()))
        return Log.open(path, config=config, readonly=readonly, start_offset=start_offset)

    def streams(self) -> list[str]:
        """The names of the streams present, sorted."""
        try:
            names = os.listdir(self.streams_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _NAME.fullmatch(n)
                      and os.path.isdir(os.path.join(self.streams_dir, n)))
