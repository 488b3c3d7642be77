"""Pure logic of mesh.budget: caps, refusals counted, keys freed, log lines limited."""

from __future__ import annotations

import logging

import pytest

from mesh.budget import Budget, LogLimiter
from mesh.errors import ConfigError


def test_budget_caps_per_key_and_total_and_counts_refusals() -> None:
    b = Budget("links", per_key=3, total=5)
    assert all(b.take("a") for _ in range(3))
    assert not b.take("a")  # per-key cap
    assert b.take("b", 2)
    assert not b.take("c")  # node cap
    assert b.refused == 2 and b.refused_by == {"a": 1, "c": 1}
    b.give("a", 2)
    assert b.held("a") == 1 and b.held() == 3
    assert b.take("c")
    b.drop("b")
    assert b.held() == 2 and b.keys() == 2
    b.give("a", 10)  # never below zero; the key is forgotten
    assert b.held("a") == 0 and b.keys() == 1
    assert b.stats() == {"links_held": 1, "links_keys": 1, "links_refused": 2}


def test_budget_key_table_is_bounded_by_the_node_cap() -> None:
    b = Budget("subs", per_key=1, total=100)
    for i in range(10_000):
        b.take(i)
    assert b.keys() == 100 and b.refused == 9_900
    assert len(b.refused_by) <= 1024


def test_budget_rejects_bad_caps() -> None:
    with pytest.raises(ConfigError):
        Budget("x", 0, 10)


def test_log_limiter_bursts_then_one_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    lim = LogLimiter(logging.getLogger("t.budget"), burst=3, interval_s=10.0,
                     clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.budget"):
        logged = [lim.warning("k", "bad frame from %s", "p") for _ in range(1000)]
        assert sum(logged) == 3 and lim.suppressed == 997
        now[0] = 10.5
        assert lim.warning("k", "bad frame from %s", "p")
        assert lim.warning("other", "another key %d", 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[3] == "bad frame from p (997 more like this held back)"


def test_give_through_returns_every_answer_up_to_the_proven_one() -> None:
    import collections

    from mesh.budget import Budget

    b = Budget("replay", per_key=100, total=150)
    sent: collections.OrderedDict[int, int] = collections.OrderedDict()
    for tok, n in ((1, 10), (2, 20), (3, 30)):
        assert b.take("p", n)
        sent[tok] = n
    assert b.room("p") == 40
    b.give_through("p", sent, 99)  # never sent: nothing returned
    b.give_through("p", sent, None)
    assert b.held("p") == 60 and list(sent) == [1, 2, 3]
    b.give_through("p", sent, 2)  # the answer with token 2 was read, so was 1
    assert b.held("p") == 30 and list(sent) == [3]
    assert b.take("q", 100) and b.room("p") == 20  # the total's cap is the tighter one
