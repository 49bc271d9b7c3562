"""Retry timing: capped exponential backoff with jitter."""

from __future__ import annotations

import pytest

from relayq.core import policy


def test_backoff_doubles_to_the_cap() -> None:
    assert [policy.next_delay(n, 300, 4000) for n in range(6)] == [
        0.0, 300.0, 600.0, 1200.0, 2400.0, 4000.0]


def test_backoff_jitter_stays_within_ten_percent_and_the_cap() -> None:
    assert policy.next_delay(1, 300, 4000, 0.0) == pytest.approx(270.0)
    assert policy.next_delay(1, 300, 4000, 0.999999) == pytest.approx(330.0, abs=0.01)
    assert policy.next_delay(10, 300, 4000, 0.999999) == 4000.0  # never above the cap
    assert policy.next_delay(10, 300, 4000, 0.0) == pytest.approx(3600.0)
