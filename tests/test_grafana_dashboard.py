"""deploy/grafana/zeromesh.json cannot drift from what nodes export: every metric its queries
name exists in a real ``/metrics`` scrape of a mesh running every pattern (the mesh of
tests/test_cli_top.py: a publisher and a durable subscriber, a queue and a worker, a service
with calls and a client)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from mesh.metrics import parse_prometheus, serve_prometheus
from tests.test_cli_top import Busy, busy  # noqa: F401  (the module-scoped mesh fixture)
from tests.util import REPO

DASHBOARD = Path(REPO) / "deploy" / "grafana" / "zeromesh.json"

#: PromQL words that look like identifiers but are not metric names
_PROMQL = {
    "sum", "avg", "min", "max", "count", "by", "without", "rate", "irate", "increase",
    "histogram_quantile", "topk", "bottomk", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "abs", "clamp_min", "clamp_max", "delta", "deriv",
    "label_values", "time", "vector", "scalar", "bool",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (labels, functions, variables removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # strings
    e = re.sub(r"\{[^}]*\}", "", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                      # range selectors
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)  # grouping labels
    e = re.sub(r"\$\w+", "", e)                           # dashboard variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if word in _PROMQL or rest.startswith("("):
            continue
        names.add(word)
    return names


def _targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", ()):
            out.append((p["title"], t["expr"]))
    return out


def test_metric_names_parser() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, name) (rate(x_bucket{kind="a",'
                        ' instance=~"$instance"}[$__rate_interval])))') == {"x_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / sum(rate(b_total{q=\"}\"}[5m]))") == {
        "a_total", "b_total"}


def test_every_queried_metric_exists_in_a_real_scrape(busy: Busy) -> None:  # noqa: F811
    dash = json.loads(DASHBOARD.read_text())
    scraped: set[str] = set()
    for node in (busy.alpha, busy.beta):
        server, port = serve_prometheus(node)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped |= set(parse_prometheus(r.read().decode()))
        finally:
            server.close()
    targets = _targets(dash)
    used: set[str] = set()
    for title, expr in targets:
        names = metric_names(expr)
        assert names, (title, expr)
        missing = names - scraped
        assert not missing, f"panel {title!r} queries {sorted(missing)}, not exported"
        used |= names
    # the panels the dashboard promises: streams, queues, services, node
    titles = {p["title"] for p in dash["panels"]}
    for t in ("Publish rate", "Durable subscriber lag", "Queue depth", "In flight",
              "Dead-letter queue", "Redeliveries", "Calls per second", "Errors",
              "Latency histogram", "Peers", "Control traffic", "Budgets refused"):
        assert t in titles, t
    assert "event_processing_duration_seconds_bucket" in used
    # the template variable reads a family every node exports
    (var,) = dash["templating"]["list"]
    assert metric_names(var["definition"].replace("label_values(", "").split(",")[0]) <= scraped
    assert {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p} == {
        "${DS_PROMETHEUS}"}
