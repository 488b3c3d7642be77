"""The ``mesh`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers: argparse._SubParsersAction) -> None``, which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Add a module name to ``_COMMAND_MODULES`` to plug a new command in.

A user mistake (a :class:`mesh.errors.MeshError`, a missing file...) is printed as one line on
stderr with a non-zero exit code, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mesh._version import __version__
from mesh.errors import MeshError

_COMMAND_MODULES: tuple[str, ...] = (
    "mesh.cli.log_cmd",
    "mesh.cli.peers_cmd",
    "mesh.cli.demo_cmd",
    "mesh.cli.dlq_cmd",
    "mesh.cli.bridge_cmd",
    "mesh.cli.keys_cmd",
    "mesh.cli.pubsub_cmd",
    "mesh.cli.pipeline_cmd",
    "mesh.cli.rpc_cmd",
    "mesh.cli.streams_cmd",
    "mesh.cli.stats_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full ``mesh`` argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="mesh", description="zeromesh: a brokerless messaging mesh on ZeroMQ."
    )
    parser.add_argument("--version", action="version", version=f"zeromesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command not built yet must not break the rest
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mesh`` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    _stop_on_signals()
    try:
        return int(func(args))
    except KeyboardInterrupt:  # SIGINT or SIGTERM: the node said goodbye and closed
        return 0
    except BrokenPipeError:
        return 0
    except (MeshError, OSError) as exc:
        print(f"mesh {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT both stop a command the same way: KeyboardInterrupt in the main
    thread, so every ``with`` block unwinds (the node sends its mDNS goodbye and BYE, logs are
    flushed and closed) and the command exits 0. Further signals are ignored meanwhile, so a
    second Ctrl-C or ``kill`` cannot cut the cleanup short."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # main() called from a thread (tests): signals are the main thread's

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
