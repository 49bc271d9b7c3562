"""delivery/limits: the shared counts, over a real state file, at chosen times."""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayq.core.config import parse
from relayq.delivery import limits

if TYPE_CHECKING:
    from pathlib import Path

T0 = 1_800_000_000.0  # a minute boundary


def make(tmp_path: Path, **keys: int) -> limits.Limits:
    text = f'queue_dir = "{tmp_path}"\n' + "".join(f"{k} = {v}\n" for k, v in keys.items())
    return limits.Limits(parse(text))


def test_the_state_stays_bounded_whatever_the_traffic(tmp_path: Path) -> None:
    lim = make(tmp_path, messages_per_minute=1000, recipients_per_day=10**9)
    for i in range(432):  # three days of a message every 10 minutes
        assert lim.reserve(3, T0 + 600 * i).count == 3
    lines = (tmp_path / "limits" / "default.state").read_text().splitlines()
    assert len(lines) <= 1 + 1 + 145  # magic, the last minute's message, a day's buckets


def test_a_split_says_when_the_rest_fits(tmp_path: Path) -> None:
    lim = make(tmp_path, recipients_per_day=10)
    assert lim.reserve(6, T0).count == 6
    g = lim.reserve(6, T0 + 3600)
    assert (g.count, g.which, g.limit) == (4, "recipients_per_day", 10)
    assert g.free_at == T0 + 60 + 86400  # the first six have aged out: two more fit
    none = lim.reserve(1, T0 + 7200)
    assert none.count == 0 and none.free_at == T0 + 60 + 86400
    assert lim.reserve(2, T0 + 60 + 86400).count == 2


def test_settle_gives_back_what_the_relay_did_not_take(tmp_path: Path) -> None:
    lim = make(tmp_path, messages_per_minute=1, recipients_per_day=5)
    g = lim.reserve(5, T0)
    lim.settle(g, 0, T0)  # refused whole: neither the message nor its recipients count
    g = lim.reserve(5, T0 + 1)
    assert g.count == 5
    lim.settle(g, 2, T0 + 1)
    assert lim.reserve(3, T0 + 61).count == 3
    assert lim.reserve(1, T0 + 122).count == 0


def test_a_clock_gone_back_counts_the_future_as_now(tmp_path: Path) -> None:
    lim = make(tmp_path, messages_per_minute=1)
    assert lim.reserve(1, T0 + 86400 * 30).count == 1  # the clock was a month ahead
    g = lim.reserve(1, T0)
    assert g.count == 0 and g.free_at == T0 + 60  # a minute from now, not a month
    assert lim.check(1, T0 + 61).count == 1
