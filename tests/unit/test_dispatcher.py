"""relayq.daemon.dispatcher driven directly: no thread, no sleep, a fake clock."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.daemon.dispatcher import (
    ACTIVE,
    AGAIN,
    DONE,
    QUEUED,
    RECHECK,
    RECHECK_MAX,
    RECHECK_MIN,
    WAITING,
    Dispatcher,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def d(clock: Clock) -> Dispatcher:
    return Dispatcher(clock)


def test_a_message_is_queued_once(d: Dispatcher) -> None:
    assert d.dispatch("A", False) is True
    assert d.dispatch("A", False) is False  # already queued
    assert d.dispatch("A", True) is False  # ... but the queued run is now forced
    assert d.claim("A") is True
    assert d.state("A") == ACTIVE
    assert d.dispatch("A", False) is False  # being delivered: not queued again


def test_a_normal_run_while_in_flight_is_covered_by_it(d: Dispatcher) -> None:
    d.dispatch("A", False)
    d.claim("A")
    d.dispatch("A", False)
    assert d.finish("A", 1, False) == DONE
    assert d.state("A") is None


def test_a_forced_run_asked_while_in_flight_runs_after_it(d: Dispatcher) -> None:
    d.dispatch("A", False)
    assert d.claim("A") is False
    d.dispatch("A", True)
    assert d.finish("A", 1, True) == AGAIN  # still queued: once more, forced
    assert d.state("A") == QUEUED
    assert d.claim("A") is True
    assert d.finish("A", 1, False) == DONE  # a forced run sets no recheck


def test_a_forced_run_for_a_message_already_gone_is_dropped(d: Dispatcher) -> None:
    d.dispatch("A", False)
    d.claim("A")
    d.dispatch("A", True)
    assert d.finish("A", 0, False) == DONE
    assert d.state("A") is None


def test_a_due_message_locked_elsewhere_is_rechecked_with_backoff(
    d: Dispatcher, clock: Clock
) -> None:
    d.dispatch("A", False)
    d.claim("A")
    assert d.finish("A", 1, True) == RECHECK
    assert d.state("A") == WAITING
    assert d.next_wait(0.25) == pytest.approx(RECHECK_MIN)
    assert d.due_rechecks() == []  # not yet
    delays = []
    for _ in range(16):
        clock.now += d.next_wait(1e9)
        assert d.due_rechecks() == ["A"]
        assert d.claim("A") is False
        assert d.finish("A", 1, True) == RECHECK
        delays.append(d.records["A"].at - clock.now)
    assert delays[0] == pytest.approx(2 * RECHECK_MIN)
    assert all(b == pytest.approx(min(2 * a, RECHECK_MAX)) for a, b in itertools.pairwise(delays))
    assert delays[-1] == RECHECK_MAX
    assert d.next_wait(0.25) == 0.25  # the poll comes first


def test_a_recheck_that_finds_it_settled_forgets_it(d: Dispatcher, clock: Clock) -> None:
    d.dispatch("A", False)
    d.claim("A")
    d.finish("A", 1, True)
    clock.now += 1
    assert d.due_rechecks() == ["A"]
    d.claim("A")
    assert d.finish("A", 1, False) == DONE  # not due (or held, or settled): no recheck
    assert d.records == {}
    assert d.next_wait(0.25) == 0.25


def test_a_waiting_message_dispatched_early_keeps_its_backoff(
    d: Dispatcher, clock: Clock
) -> None:
    d.dispatch("A", False)
    d.claim("A")
    d.finish("A", 1, True)
    assert d.dispatch("A", False) is True  # a queue run before the recheck
    d.claim("A")
    start = clock.now
    d.finish("A", 1, True)
    assert d.records["A"].at - start == pytest.approx(2 * RECHECK_MIN)


def test_stopping_forgets_what_is_queued_and_lets_deliveries_finish(d: Dispatcher) -> None:
    for qid in "ABC":
        d.dispatch(qid, False)
    d.claim("A")
    d.stop()
    assert d.in_flight() == ["A"]
    assert d.claim("B") is None
    assert d.dispatch("D", True) is False
    d.dispatch("A", True)
    assert d.finish("A", 1, True) == DONE  # no once-more and no recheck after stop
    assert d.records == {}


def test_a_finish_or_claim_of_an_unknown_message_is_harmless(d: Dispatcher) -> None:
    assert d.claim("X") is None
    assert d.finish("X", 1, True) == DONE
    d.dispatch("A", False)
    assert d.finish("A", 1, True) == DONE  # queued, not active: nothing changes
    assert d.state("A") == QUEUED


# --- property: random sequences of events against a model of the shell ---------------

QIDS = ["A", "B", "C"]
events = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.sampled_from(QIDS), st.booleans()),
        st.tuples(st.just("force"), st.sampled_from(QIDS)),
        st.tuples(st.just("claim")),
        st.tuples(st.just("finish"), st.integers(0, 3), st.integers(0, 1), st.booleans()),
        st.tuples(st.just("recheck"), st.floats(0, 60)),
        st.tuples(st.just("stop")),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(events)
def test_no_event_sequence_breaks_the_rules(seq: list[tuple[object, ...]]) -> None:
    clock = Clock()
    d = Dispatcher(clock)
    work: deque[str] = deque()  # the shell's work queue
    active: dict[str, bool] = {}  # qid -> force of the run in hand (the workers)
    owed: set[str] = set()  # forced runs asked and not yet started
    stopped = False

    def put(qid: str) -> None:
        assert qid not in work, f"{qid} queued twice"
        work.append(qid)

    for event in seq:
        kind = event[0]
        if kind in ("new", "force"):
            qid = str(event[1])
            force = kind == "force" or bool(event[2] if len(event) > 2 else False)
            if d.dispatch(qid, force):
                put(qid)
            if not stopped:  # nothing is forgotten: it is queued, or being delivered
                assert qid in work or qid in active
                if force:
                    owed.add(qid)
        elif kind == "claim" and work:
            qid = work.popleft()
            force = d.claim(qid)
            if stopped:
                assert force is None
                continue
            assert force is not None and qid not in active, f"{qid} dispatched twice at once"
            assert force or qid not in owed  # an owed forced run is the next run
            owed.discard(qid)
            active[qid] = force
        elif kind == "finish" and active:
            qid = sorted(active)[int(str(event[1])) % len(active)]
            left, due = int(str(event[2])), bool(event[3])
            force = active.pop(qid)
            answer = d.finish(qid, left, due and not force)
            if stopped:
                assert answer == DONE
            elif qid in owed and left:
                assert answer == AGAIN  # the forced run asked meanwhile comes now
                put(qid)
            elif left and due and not force:
                assert answer == RECHECK and d.state(qid) == WAITING
            else:
                assert answer == DONE
                owed.discard(qid)  # gone (left 0): nothing to force any more
        elif kind == "recheck":
            clock.now += float(str(event[1]))
            wait = d.next_wait(0.25)
            assert 0.0 <= wait <= 0.25
            for qid in d.due_rechecks():
                put(qid)
        elif kind == "stop":
            stopped = True
            d.stop()
            work.clear()  # the shell drains its queue
            owed.clear()
        # the records and the shell agree
        for qid, rec in d.records.items():
            assert (rec.state == QUEUED) == (qid in work), (qid, rec, work)
            assert (rec.state == ACTIVE) == (qid in active), (qid, rec, active)
            if rec.state == WAITING:
                assert RECHECK_MIN <= rec.delay <= RECHECK_MAX
        assert set(work) <= set(d.records) and set(active) <= set(d.records)
        assert d.in_flight() == sorted(active)
