"""StreamTracker and writer epochs: pure logic, no I/O (patterns/pubsub/gaps.py)."""

from __future__ import annotations

from patterns.pubsub.gaps import StreamTracker


def ev(n: int, first: int = 0) -> list[bytes]:
    return [b"e%d" % i for i in range(first, first + n)]


def confirmed(epoch: int, upto: int) -> StreamTracker:
    t = StreamTracker(0, epoch=epoch)
    ask = t.start(0.0).ask
    assert ask is not None and ask.epoch == epoch
    step = t.on_replay(ask.req, 0, ev(upto), upto, 0, False, 0.1, epoch=epoch)
    assert step.epoch is None and t.expected == upto
    return t


def test_a_new_live_epoch_is_held_until_the_publisher_confirms_where_it_starts() -> None:
    t = confirmed(7, 10)
    step = t.on_epoch(8, 1.0)
    assert step.ask is not None and step.ask.epoch == 7 and step.ask.start == 10
    held = t.on_live(10, ev(3, 10), 1.1)          # the new epoch's live data: not delivered
    assert not held.deliver and t.expected == 10
    # The publisher's log agrees up to 10 (a clean restart): adopt, no notice, deliver.
    step = t.on_replay(step.ask.req, 10, ev(3, 10), 13, 0, False, 1.2, epoch=8)
    assert step.epoch == (8, None, None)
    assert [f for f, _ in step.deliver] == [10] and t.expected == 13 and t.epoch == 8


def test_a_truncated_answer_rewinds_and_reports_what_was_lost() -> None:
    t = confirmed(7, 10)
    t.on_heartbeat(12, 1.0)                        # it knew of 10, 11 (never received)
    ask = t.on_epoch(9, 1.1).ask
    assert ask is not None
    step = t.on_replay(ask.req, 6, ev(2, 6), 8, 0, False, 1.2, epoch=9, truncate=6)
    assert step.epoch == (9, 6, (6, 12, 4))        # 6..11 lost, 4 of them delivered
    assert step.deliver == [(6, ev(2, 6))] and t.expected == 8
    assert t.stats.resets == 1 and t.stats.lost == 2


def test_an_old_epoch_that_ended_before_the_known_head_is_reported_without_rewind() -> None:
    t = confirmed(7, 10)
    t.on_heartbeat(15, 1.0)
    ask = t.on_epoch(9, 1.1).ask
    assert ask is not None
    step = t.on_replay(ask.req, 10, ev(2, 10), 12, 0, False, 1.2, epoch=9, epoch_end=12)
    assert step.epoch == (9, 10, (12, 15, 0))
    assert step.deliver == [(10, ev(2, 10))]


def test_a_skip_moves_past_damaged_records_and_delivers_what_follows() -> None:
    t = confirmed(7, 10)
    ask = t.on_heartbeat(20, 1.0).ask
    assert ask is not None
    step = t.on_replay(ask.req, 13, ev(2, 13), 20, 0, False, 1.1, epoch=7,
                       skip=(10, 13, "damaged"))
    assert step.skipped == (10, 13) and step.skip_reason == "damaged"
    assert step.deliver == [(13, ev(2, 13))] and t.expected == 15


def test_a_fresh_tracker_adopts_the_first_epoch_it_meets() -> None:
    t = StreamTracker(None)
    step = t.on_epoch(5, 0.0)
    assert step.epoch == (5, None, None) and step.ask is None and t.epoch == 5


def test_stale_live_traffic_of_an_old_epoch_does_not_hold_delivery_forever() -> None:
    t = confirmed(7, 10)
    ask = t.on_epoch(3, 1.0).ask                   # a late message of an older epoch
    assert ask is not None
    step = t.on_replay(ask.req, 10, [], 10, 0, False, 1.1, epoch=7)
    assert step.epoch is None
    assert t.on_live(10, ev(1, 10), 1.2).deliver == [(10, ev(1, 10))]
