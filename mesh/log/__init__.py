"""The durable log: per-stream segmented append-only files with a sparse index.

Public API::

    from mesh.log import Log, LogConfig, FsyncPolicy, Retention
    with Log.open(path, config=LogConfig(fsync=FsyncPolicy.always())) as log:
        off = log.append(b"payload")
        for rec in log.iter(0): ...

Layers: :mod:`mesh.log.format` (pure framing, no I/O) <- :mod:`mesh.log.segment` (one file
and its index) <- :mod:`mesh.log.log` (the log, fsync policies, recovery, retention) <-
:mod:`mesh.log.directory` (streams of a data directory).
"""

from mesh.log.directory import LogDirectory, set_atrest_key, validate_stream_name
from mesh.log.log import FsyncPolicy, Log, LogConfig, LogStats, Record, Retention
from mesh.log.verify import Problem, VerifyReport, verify_log

__all__ = [
    "FsyncPolicy",
    "Log",
    "LogConfig",
    "LogDirectory",
    "LogStats",
    "Problem",
    "Record",
    "Retention",
    "VerifyReport",
    "set_atrest_key",
    "validate_stream_name",
    "verify_log",
]
