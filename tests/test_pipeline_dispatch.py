"""Unit tests of the pure pipeline logic: dispatcher state machine, backoff, retry budget."""

from __future__ import annotations

import random

import pytest

from mesh.errors import ConfigError
from patterns.pipeline.backoff import Backoff, RetryBudget, RetryBudgetConfig
from patterns.pipeline.dispatch import DispatchConfig, Dispatcher

W1 = b"w1"
W2 = b"w2"


def make(**kw: object) -> Dispatcher:
    cfg = DispatchConfig(**kw)  # type: ignore[arg-type]
    return Dispatcher(cfg, 0.0, rng=random.Random(7), wall=lambda: 1000.0)


def sent_ids(out: list[tuple[bytes, list[tuple[int, int, int, object, object]]]]) -> dict[bytes, list[int]]:
    res: dict[bytes, list[int]] = {}
    for ident, items in out:
        res.setdefault(ident, []).extend(i[0] for i in items)
    return res


def test_dispatch_respects_credit_and_fifo() -> None:
    d = make()
    d.add_many((i, None, None) for i in range(10))
    d.worker_ready(W1, 3)
    out = sent_ids(d.dispatch(0.0))
    assert out == {W1: [0, 1, 2]}
    assert d.dispatch(0.0) == []  # no credit left: nothing else is sent
    assert d.on_ack(W1, [0, 1], 0.1) == 2
    assert sent_ids(d.dispatch(0.1)) == {W1: [3, 4]}
    assert d.take_effects().acked == [0, 1]


def test_two_workers_share_and_slow_worker_gets_only_its_credit() -> None:
    d = make()
    d.add_many((i, None, None) for i in range(300))
    d.worker_ready(W1, 1)
    d.worker_ready(W2, 100)
    out = sent_ids(d.dispatch(0.0))
    assert len(out[W1]) == 1 and len(out[W2]) == 100
    d.on_ack(W2, out[W2], 0.1)
    out2 = sent_ids(d.dispatch(0.1))
    assert W1 not in out2 and len(out2[W2]) == 100


def test_ack_deadline_redelivers_to_other_worker_and_counts_deliveries() -> None:
    d = make(ack_wait=5.0)
    d.add(0)
    d.worker_ready(W1, 1)
    d.worker_ready(W2, 1)
    first = d.dispatch(0.0)
    ident = first[0][0]
    other = W2 if ident == W1 else W1
    d.tick(4.9)
    assert d.dispatch(4.9) == []
    d.tick(5.0)
    again = d.dispatch(5.0)
    assert again == [(other, [(0, 2, 5000, None, None)])]
    assert d.counters["timeouts"] == 1
    # The timed-out worker still holds a zombie slot (it may be busy): no new work for it yet.
    assert d.worker_load()[ident] == (1, 1)
    # A late ack from the first worker is accepted (work done); the second's ack is stale.
    assert d.on_ack(ident, [0], 6.0) == 1
    assert d.on_ack(other, [0], 6.1) == 0
    assert d.counters["stale_answers"] == 1 and d.counters["forged_acks"] == 0


def test_zombie_slot_released_after_second_wait() -> None:
    d = make(ack_wait=1.0)
    d.add_many([(0, None, None), (1, None, None)])
    d.worker_ready(W1, 1)
    d.dispatch(0.0)
    d.tick(1.0)
    assert d.dispatch(1.0) == []  # zombie holds the only slot
    d.tick(2.0)
    assert sent_ids(d.dispatch(2.0)) == {W1: [0]}


def test_nack_backoff_bounds_and_max_deliveries_to_dlq() -> None:
    bo = Backoff(base=1.0, factor=2.0, cap=3.0)
    d = make(max_deliveries=4, backoff=bo, ack_wait=100.0)
    d.add(0, key=None)
    d.worker_ready(W1, 1)
    now = 0.0
    for attempt in range(1, 5):
        out = d.dispatch(now)
        assert out == [(W1, [(0, attempt, 100_000, None, None)])], attempt
        assert d.on_nack(W1, 0, now, error_type="ValueError", error_message=f"boom{attempt}")
        if attempt < 4:
            due = d.next_deadline()
            assert due is not None
            # Only the ack deadline (now + 100) and the retry are scheduled.
            wait = min(due, now + 100.0) - now
            assert 0.0 <= wait <= bo.bound(attempt)
            now += wait
            d.tick(now)
    eff = d.take_effects()
    assert len(eff.dead) == 1
    dl = eff.dead[0]
    assert dl.reason == "max_deliveries" and dl.deliveries == 4
    assert [a.outcome for a in dl.history] == ["nack"] * 4
    assert [a.error_message for a in dl.history] == ["boom1", "boom2", "boom3", "boom4"]
    assert len(eff.failed) == 4
    assert d.stats()["unacked"] == 0


def test_nack_explicit_delay() -> None:
    d = make()
    d.add(0)
    d.worker_ready(W1, 1)
    d.dispatch(0.0)
    d.on_nack(W1, 0, 0.0, delay=2.5)
    d.tick(2.4)
    assert d.dispatch(2.4) == []
    d.tick(2.5)
    assert sent_ids(d.dispatch(2.5)) == {W1: [0]}


def test_term_goes_straight_to_dlq() -> None:
    d = make(max_deliveries=10)
    d.add(0)
    d.worker_ready(W1, 1)
    d.dispatch(0.0)
    assert d.on_term(W1, 0, 0.1, reason="bad input")
    dead = d.take_effects().dead
    assert dead[0].reason == "term" and dead[0].history[0].error_message == "bad input"


def test_in_progress_extends_deadline() -> None:
    d = make(ack_wait=2.0)
    d.add(0)
    d.worker_ready(W1, 1)
    d.dispatch(0.0)
    assert d.on_in_progress(W1, [0], 1.5) == 1
    d.tick(2.0)
    assert d.counters["timeouts"] == 0
    d.tick(3.5)
    assert d.counters["timeouts"] == 1


def test_worker_gone_returns_tasks_at_once_in_order() -> None:
    d = make()
    d.add_many((i, None, None) for i in range(5))
    d.worker_ready(W1, 3)
    d.dispatch(0.0)
    assert d.worker_gone(W1, 0.5) == 3
    for n in range(3):
        d.worker_ready(f"x{n}".encode(), 10)
    # Back at the front at once, each alone on an idle worker (quarantine); 3, 4 wait.
    out = d.dispatch(0.5)
    assert sorted(i for _, items in out for i, *_ in items) == [0, 1, 2]
    for ident, items in out:
        d.on_ack(ident, [items[0][0]], 0.6)
    assert sorted(i for _, items in d.dispatch(0.6) for i, *_ in items) == [3, 4]


def test_poison_that_kills_worker_is_dead_lettered_after_bound() -> None:
    d = make(max_deliveries=3)
    d.add(0)
    for n in range(3):
        ident = f"w{n}".encode()
        d.worker_ready(ident, 1)
        assert sent_ids(d.dispatch(float(n))) == {ident: [0]}
        d.worker_gone(ident, float(n))
    dead = d.take_effects().dead
    assert dead and dead[0].deliveries == 3
    assert [a.outcome for a in dead[0].history] == ["worker_gone"] * 3


def test_restore_at_max_is_dead_lettered() -> None:
    d = make(max_deliveries=3)
    d.restore(5, None, 3)
    d.restore(6, None, 1)
    eff = d.take_effects()
    assert [x.task_id for x in eff.dead] == [5]
    d.worker_ready(W1, 5)
    assert d.dispatch(0.0) == [(W1, [(6, 2, 30_000, None, None)])]


def test_forged_acks_are_ignored_and_counted() -> None:
    d = make()
    d.add_many([(0, None, None), (1, None, None)])
    d.worker_ready(W1, 1)
    d.worker_ready(W2, 1)
    out = sent_ids(d.dispatch(0.0))
    holder = next(k for k, v in out.items() if 0 in v)
    intruder = W2 if holder == W1 else W1
    assert d.on_ack(intruder, [0], 0.1) == 0  # never got task 0
    assert d.on_ack(holder, [99], 0.1) == 0  # unknown id
    assert d.on_ack(b"stranger", [0], 0.1) == 0  # unknown worker
    assert not d.on_nack(b"stranger", 0, 0.1)
    assert d.counters["forged_acks"] == 4
    assert d.on_ack(holder, [0], 0.2) == 1


def test_per_key_ordering_one_at_a_time() -> None:
    d = make(per_key_ordering=True)
    d.add_many([(0, "a", None), (1, "a", None), (2, "b", None), (3, "a", None)])
    d.worker_ready(W1, 10)
    d.worker_ready(W2, 10)
    first = sent_ids(d.dispatch(0.0))
    assert sorted(i for ids in first.values() for i in ids) == [0, 2]
    holder = next(k for k, v in first.items() if 0 in v)
    # Task 0 fails: key "a" stays held through the retry, so 1 and 3 still wait.
    assert d.on_nack(holder, 0, 0.0, delay=1.0)
    assert d.dispatch(0.5) == []
    d.tick(1.0)
    again = sent_ids(d.dispatch(1.0))
    assert [i for ids in again.values() for i in ids] == [0]
    holder = next(iter(again))
    assert d.on_ack(holder, [0], 1.1) == 1
    nxt = sent_ids(d.dispatch(1.1))
    assert [i for ids in nxt.values() for i in ids] == [1]
    assert d.on_ack(next(iter(nxt)), [1], 1.2) == 1
    last = sent_ids(d.dispatch(1.2))
    assert [i for ids in last.values() for i in ids] == [3]


def test_retry_budget_throttles_storm() -> None:
    d = make(retry_budget=RetryBudgetConfig(rate=10.0, burst=2), backoff=Backoff(0.0, 1.0, 0.0))
    d.add_many((i, None, None) for i in range(6))
    d.worker_ready(W1, 10)
    d.dispatch(0.0)
    for i in range(6):
        d.on_nack(W1, i, 0.0)
    # Burst of 2 immediately, then one per 0.1 s.
    assert len(sent_ids(d.dispatch(0.0)).get(W1, [])) == 2
    d.tick(0.1)
    assert len(sent_ids(d.dispatch(0.1)).get(W1, [])) == 1
    d.tick(0.4)
    assert len(sent_ids(d.dispatch(0.4)).get(W1, [])) == 3
    assert d.counters["retries_throttled"] == 4


def test_backoff_bounds_and_validation() -> None:
    bo = Backoff(base=0.5, factor=2.0, cap=4.0)
    assert [bo.bound(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert bo.bound(10**9) == 4.0
    rng = random.Random(1)
    for n in range(1, 20):
        assert 0 <= bo.delay(n, rng) <= bo.bound(n)
    with pytest.raises(ConfigError):
        Backoff(base=1.0, cap=0.5)
    with pytest.raises(ConfigError):
        DispatchConfig(max_deliveries=0)


def test_retry_budget_reserve() -> None:
    b = RetryBudget(RetryBudgetConfig(rate=2.0, burst=1), 0.0)
    assert b.reserve(0.0) == 0.0
    assert b.reserve(0.0) == pytest.approx(0.5)
    assert b.reserve(0.0) == pytest.approx(1.0)
    assert b.reserve(10.0) == 0.0


def test_batches_are_split_by_max_batch() -> None:
    d = make(max_batch=4)
    d.add_many((i, None, None) for i in range(10))
    d.worker_ready(W1, 10)
    out = d.dispatch(0.0)
    assert [len(items) for _, items in out] == [4, 4, 2]


def test_tasks_of_a_dead_worker_are_quarantined_one_per_idle_worker() -> None:
    d = make(max_deliveries=3)
    d.add_many((i, None, None) for i in range(4))
    d.worker_ready(W1, 3)
    assert sent_ids(d.dispatch(0.0)) == {W1: [0, 1, 2]}
    d.worker_gone(W1, 0.1)  # one of 0, 1, 2 killed it: each is now a suspect
    d.worker_ready(W2, 3)
    d.worker_ready(b"w3", 3)
    out = sent_ids(d.dispatch(0.2))
    # Each suspect goes alone to an idle worker; the third waits; 3 (not suspect) too, since
    # both workers are isolating.
    assert sorted(len(v) for v in out.values()) == [1, 1]
    holder = next(k for k, v in out.items() if v == [0])
    d.on_ack(holder, [0], 0.3)
    nxt = sent_ids(d.dispatch(0.3))
    assert nxt == {holder: [2]}
    # A suspect that fails without killing its worker is cleared (a plain nack).
    other = next(k for k, v in out.items() if v != [0])
    assert out[other] == [1]
    d.on_nack(other, 1, 0.4, delay=0.0)
    d.on_ack(holder, [2], 0.4)
    rest = sent_ids(d.dispatch(0.4))
    assert sorted(i for v in rest.values() for i in v) == [1, 3]
    assert d.take_effects().dead == []


def test_add_batch_keeps_data_keys_order_and_gauges_before_first_dispatch() -> None:
    d = make(per_key_ordering=True)
    d.add_batch(range(0, 3), None, [b"a", b"b", b"c"])
    d.add_batch(range(3, 5), "k", [b"d", b"e"])
    s = d.stats()
    assert s["added"] == 5 and s["unacked"] == 5 and s["pending"] == 5 and s["inflight"] == 0
    assert d.unacked_ids() == [0, 1, 2, 3, 4]
    d.worker_ready(W1, 10)
    # an answer for a task never delivered is forged, not stale (it was never sent anywhere)
    assert d.on_ack(W1, [1], 0.0) == 0 and d.counters["forged_acks"] == 1
    d.on_nack(W1, 2, 0.0)
    assert d.counters["forged_acks"] == 2 and d.counters["stale_answers"] == 0
    items = [i for _, batch in d.dispatch(0.0) for i in batch]
    # (id, delivery, ack_wait_ms, key, data): data and key as pushed; key 'k' holds back id 4
    assert [(i[0], i[3], i[4]) for i in items] == [(0, None, b"a"), (1, None, b"b"),
                                                  (2, None, b"c"), (3, "k", b"d")]
    assert d.on_ack(W1, [0, 1, 2, 3], 0.1) == 4
    assert [(i[0], i[3], i[4]) for _, b in d.dispatch(0.1) for i in b] == [(4, "k", b"e")]
    assert d.stats()["unacked"] == 1 and d.stats()["inflight"] == 1


def test_first_deliveries_without_objects_behave_like_tasks() -> None:
    """First deliveries ride on one flight record per dispatch pass: timeouts, IN_PROGRESS,
    TERM, stray acks and the gauges must behave exactly as for tasks with their own state."""
    d = make(ack_wait=2.0, max_deliveries=5)
    d.add_batch(range(0, 3), "k", [b"a", b"b", b"c"])  # a key, but no per-key ordering asked
    d.worker_ready(W1, 10)
    assert [i[0] for _, b in d.dispatch(0.0) for i in b] == [0, 1, 2]
    d.add_batch(range(3, 5), None, [b"d", b"e"])
    assert [(i[0], i[1]) for _, b in d.dispatch(1.0) for i in b] == [(3, 1), (4, 1)]
    s = d.stats()
    assert (s["unacked"], s["inflight"], s["pending"], s["delayed"]) == (5, 5, 0, 0)
    assert d.on_ack(W2, [1], 1.1) == 0 and d.counters["forged_acks"] == 1  # not W2's task
    assert d.on_in_progress(W1, [2], 1.5) == 1  # 2's deadline moves to 3.5
    assert d.on_term(W1, 0, 1.6, reason="bad")
    dead = d.take_effects().dead
    assert [(x.task_id, x.key, x.data, x.reason) for x in dead] == [(0, "k", b"a", "term")]
    d.tick(2.0)  # the first pass's deadline: 1 times out (2 was extended, 0 is dead)
    assert d.counters["timeouts"] == 1
    redo = [i for _, b in d.dispatch(2.0) for i in b]
    assert [(i[0], i[1], i[3], i[4]) for i in redo] == [(1, 2, "k", b"b")]
    failed = d.take_effects().failed
    assert [(tid, a.outcome, a.dispatched_at) for tid, a in failed] == [(1, "timeout", 1000.0)]
    assert d.on_ack(W1, [2, 3, 4], 2.5) == 3  # the late first deliveries are still accepted
    d.tick(3.0)  # the second pass's deadline: nothing of it is left in flight
    assert d.counters["timeouts"] == 1
    assert d.on_ack(W1, [1], 3.1) == 1  # the redelivery
    assert d.stats()["unacked"] == 0 and d.unacked_ids() == []
    assert d.counters["stale_answers"] == 0
