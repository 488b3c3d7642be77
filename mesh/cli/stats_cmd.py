"""``mesh stats``: a node's metrics, from its endpoint or from its data directory.

``mesh stats --url http://127.0.0.1:9464/metrics`` (or ``--port 9464``) scrapes a running node
(see :func:`mesh.metrics.serve_prometheus`); ``--watch`` refreshes every ``--interval`` seconds
and shows per-second rates of counters. ``mesh stats --data-dir DIR`` reads what a stopped (or
running) node left on disk: its streams' sizes and fsync counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mesh.cli._node_opts import port_number, positive_seconds
from mesh.errors import ConfigError

Samples = dict[str, list[tuple[dict[str, str], float]]]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stats``."""
    p = subparsers.add_parser("stats", help="a node's metrics (endpoint or data dir)",
                              description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", default=None, help="a metrics endpoint URL")
    src.add_argument("--port", type=port_number, default=None, help="a metrics port on --host")
    src.add_argument("--data-dir", default=None, help="read a data directory instead")
    p.add_argument("--host", default="127.0.0.1", help="host for --port (default %(default)s)")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=positive_seconds, default=2.0,
                   help="seconds between refreshes")
    p.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)  # tests: N rounds
    p.add_argument("--all", action="store_true", help="also show zero values")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)


def scrape(url: str) -> Samples:
    """Fetch and parse a metrics endpoint.

    Raises:
        ConfigError: unreachable, or not the text format.
    """
    from mesh.metrics import parse_prometheus

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return parse_prometheus(r.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read metrics from {url}: {exc}") from exc


def from_data_dir(path: Path) -> Samples:
    """Per-stream log gauges of a data directory, named like the live ones.

    Raises:
        ConfigError: not a directory.
    """
    from mesh.cli.streams_cmd import collect

    out: Samples = {}
    for row in collect(path):
        if "head" not in row:
            continue
        lab = {"stream": row["stream"]}
        out.setdefault("log_bytes", []).append((lab, float(row["bytes"])))
        out.setdefault("log_records", []).append((lab, float(row["records"])))
        out.setdefault("log_segments", []).append((lab, float(row["segments"])))
        out.setdefault("stream_head", []).append((lab, float(row["head"])))
        for s in row["subscribers"]:
            if s["lag"] is not None:
                out.setdefault("consumer_lag", []).append(
                    ({"stream": row["stream"], "consumer": s["name"]}, float(s["lag"])))
    return out


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _fmt(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else f"{v:.6g}"


def render(samples: Samples, prev: Samples | None, dt: float, show_all: bool) -> str:
    """Human text: one line per series; histograms as count and mean; rates with --watch."""
    lines: list[str] = []
    flat: dict[str, float] = {}
    for name, series in samples.items():
        for labels, v in series:
            flat[_key(name, labels)] = v
    before: dict[str, float] = {}
    for name, series in (prev or {}).items():
        for labels, v in series:
            before[_key(name, labels)] = v
    for name in sorted(samples):
        if name.endswith("_bucket") or name.endswith("_sum"):
            continue
        for labels, v in samples[name]:
            if not show_all and v == 0:
                continue
            k = _key(name, labels)
            text = f"{k} {_fmt(v)}"
            if name.endswith("_count"):
                total = flat.get(_key(name[:-6] + "_sum", labels))
                if total is not None and v:
                    text += f" (mean {total / v * 1000:.3f} ms)"
            if prev is not None and dt > 0 and (name.endswith("_total")
                                                or name.endswith("_count")) and k in before:
                text += f"  {(v - before[k]) / dt:.1f}/s"
            lines.append(text)
    return "\n".join(lines) if lines else "(no non-zero metrics)"


def cmd_stats(args: argparse.Namespace) -> int:
    """``mesh stats``."""
    if args.url is None and args.port is None and args.data_dir is None:
        raise ConfigError("give --url, --port or --data-dir")
    url = args.url or (f"http://{args.host}:{args.port}/metrics" if args.port else None)

    def read() -> Samples:
        return scrape(url) if url else from_data_dir(Path(args.data_dir))

    prev: Samples | None = None
    prev_t = 0.0
    rounds = 0
    while True:
        now = time.monotonic()
        cur = read()
        rounds += 1
        if args.json:
            print(json.dumps({n: [{"labels": lab, "value": v} for lab, v in s]
                              for n, s in cur.items()}), flush=True)
        else:
            text = render(cur, prev, now - prev_t, args.all)
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place for a person watching
            print(text, flush=True)
            if args.watch and not sys.stdout.isatty():
                print("--", flush=True)
        if not args.watch or (args.count is not None and rounds >= args.count):
            return 0
        prev, prev_t = cur, now
        time.sleep(max(0.1, args.interval))
