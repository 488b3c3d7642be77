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
import re
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
    "mesh.cli.store_cmd",
    "mesh.cli.pipeline_cmd",
    "mesh.cli.rpc_cmd",
    "mesh.cli.streams_cmd",
    "mesh.cli.stats_cmd",
    "mesh.cli.top_cmd",
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
    _polish(parser)
    return parser


_REST = re.compile(r":[a-z]+:`~?([^`]+)`|``([^`]+)``")


def _plain(text: str | None) -> str | None:
    """Help text without reST markup (``x``, :func:`x`): a terminal shows it literally."""
    if not text:
        return text
    return _REST.sub(lambda m: (m.group(1) or m.group(2)).rsplit(".", 1)[-1]
                     if m.group(1) else m.group(2), text)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' paragraphs and shows every option's default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or \
                not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _polish(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    parser.description = _plain(parser.description)
    for action in parser._actions:
        action.help = _plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = _plain(choice.help)
            for child in action.choices.values():
                _polish(child)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mesh`` command line; returns the process exit code."""
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"zeromesh {__version__}")  # without importing every command
        return 0
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
