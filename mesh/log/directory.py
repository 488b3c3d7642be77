"""A data directory holding one log per stream: ``<root>/streams/<name>/``."""

from __future__ import annotations

import os
import re

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


class LogDirectory:
    """The streams of one data directory.

    Args:
        root: the data directory; logs live in ``root/streams/<stream>/``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.streams_dir = os.path.join(self.root, "streams")

    def path_for(self, stream: str) -> str:
        """The directory of ``stream``'s log.

        Raises:
            ConfigError: the stream name is not valid.
        """
        return os.path.join(self.streams_dir, validate_stream_name(stream))

    def open(self, stream: str, config: LogConfig | None = None, *,
             readonly: bool = False) -> Log:
        """Open (creating it when writing) the log of ``stream``; see :meth:`Log.open`.

        Raises:
            ConfigError: the stream name is not valid.
            LogLocked: another process writes this stream.
            LogError: the log cannot be opened.
        """
        return Log.open(self.path_for(stream), config=config, readonly=readonly)

    def streams(self) -> list[str]:
        """The names of the streams present, sorted."""
        try:
            names = os.listdir(self.streams_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _NAME.fullmatch(n)
                      and os.path.isdir(os.path.join(self.streams_dir, n)))
