"""relayq.core.qshape: the queue by domain and age, like Postfix's qshape(1) (issue 15 §3).
A fixed `now` stands for the clock: the function takes it as an argument."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core.qshape import Message, domain_of, limits, render, shape

NOW = 1_800_000_000.0


def msg(age_minutes: float, sender: str, *rcpts: str) -> Message:
    return Message(NOW - age_minutes * 60, sender, list(rcpts))


def test_default_buckets_are_qshapes() -> None:
    assert limits() == [5, 10, 20, 40, 80, 160, 320, 640, 1280]
    assert limits(4, 10) == [10, 20, 40]
    assert limits(4, 10, linear=True) == [10, 20, 30]
    assert limits(1, 5) == []
    with pytest.raises(ValueError):
        limits(0)
    with pytest.raises(ValueError):
        limits(3, 0)


def test_recipient_domains_by_age() -> None:
    table = shape([msg(1, "a@x.org", "u@example.org", "v@Example.ORG."),
                   msg(7, "a@x.org", "w@example.net"),
                   msg(5, "b@y.org", "z@example.org"),  # 5 minutes: past the first bucket
                   msg(3000, "", "q@example.net")], NOW)
    assert table.labels == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert table.total == ("TOTAL", 5, [2, 2, 0, 0, 0, 0, 0, 0, 0, 1])
    assert table.rows == [("example.org", 3, [2, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
                          ("example.net", 2, [0, 1, 0, 0, 0, 0, 0, 0, 0, 1])]


def test_sender_domains_count_messages() -> None:
    table = shape([msg(1, "a@x.org", "u@e.org", "v@e.org"), msg(2, "", "w@e.org"),
                   msg(2, "b@x.org", "t@e.org")], NOW, by_sender=True, limits=[5])
    assert table.labels == ["T", "5", "5+"]
    assert table.total == ("TOTAL", 3, [3, 0])
    assert table.rows == [("x.org", 2, [2, 0]), ("MAILER-DAEMON", 1, [1, 0])]


def test_ties_sort_by_name_and_the_future_is_the_first_bucket() -> None:
    table = shape([msg(-10, "s@a.org", "r@b.org"), msg(0, "s@a.org", "r@a.org")], NOW,
                  limits=[5])
    assert [r[0] for r in table.rows] == ["a.org", "b.org"]
    assert table.total == ("TOTAL", 2, [2, 0])


def test_parent_domains() -> None:
    rcpts = [f"u@h{i}.example.com" for i in range(5)] + ["u@one.example.net", "u@com"]
    table = shape([msg(1, "s@a.org", *rcpts)], NOW, parents=True, limits=[5])
    names = [r[0] for r in table.rows]
    assert ".example.com" in names and table.rows[0] == (".example.com", 5, [5, 0])
    assert ".example.net" not in names  # one subdomain: fewer than min_subdomains
    assert ".com" not in names  # top level domains are not shown
    assert table.total == ("TOTAL", 7, [7, 0])  # a parent row counts nothing twice
    fewer = shape([msg(1, "s@a.org", *rcpts)], NOW, parents=True, min_subdomains=1, limits=[5])
    assert (".example.net", 1, [1, 0]) in fewer.rows


def test_domain_of() -> None:
    assert domain_of("User@Example.ORG.") == "example.org"
    assert domain_of("root") == "root"
    assert domain_of("") == "MAILER-DAEMON"
    assert domain_of('"a@b"@c.org') == "c.org"


def test_render_aligns_columns() -> None:
    table = shape([msg(1, "a@x.org", "u@example.org")] * 12, NOW, limits=[5, 10])
    text = render(table)
    assert len({len(line) for line in text.splitlines()}) == 1  # right edges line up
    assert text.splitlines() == [
        "             T  5 10 10+",
        "      TOTAL 12 12  0   0",
        "example.org 12 12  0   0",
    ]


def test_empty_queue() -> None:
    table = shape([], NOW)
    assert table.rows == [] and table.total[1] == 0 and sum(table.total[2]) == 0
    assert render(table).splitlines()[1].split() == ["TOTAL", *["0"] * 11]


ADDR = st.builds(lambda local, dom: f"{local}@{dom}",
                 st.sampled_from(["a", "b", "root"]),
                 st.sampled_from(["example.org", "h1.example.org", "example.net", "x.io"]))
MESSAGES = st.lists(st.builds(Message, st.floats(NOW - 10**6, NOW + 100),
                              st.one_of(st.just(""), ADDR), st.lists(ADDR, max_size=4)),
                    max_size=30)
SHAPE_ARGS = st.tuples(st.integers(1, 12), st.integers(1, 60), st.booleans())


@given(MESSAGES, SHAPE_ARGS, st.booleans())
def test_rows_sum_to_the_totals_and_each_is_counted_once(
    messages: list[Message], args: tuple[int, int, bool], by_sender: bool
) -> None:
    count, first, linear = args
    table = shape(messages, NOW, limits=limits(count, first, linear=linear), by_sender=by_sender)
    name, total, buckets = table.total
    expected = len(messages) if by_sender else sum(len(m.recipients) for m in messages)
    assert name == "TOTAL" and total == expected == sum(buckets)
    assert len(buckets) == count and len(table.labels) == count + 1
    for _, row_total, row in table.rows:
        assert row_total == sum(row) > 0
    assert [sum(col) for col in zip(*(r[2] for r in table.rows), strict=True)] == \
        (buckets if table.rows else [])
    counts = [r[1] for r in table.rows]
    assert counts == sorted(counts, reverse=True)


@given(MESSAGES)
def test_parent_rows_never_change_the_total(messages: list[Message]) -> None:
    plain = shape(messages, NOW)
    with_parents = shape(messages, NOW, parents=True, min_subdomains=1)
    assert with_parents.total == plain.total
    added = [r for r in with_parents.rows if r not in plain.rows]
    assert all(r in with_parents.rows for r in plain.rows)
    assert all(r[0].startswith(".") for r in added)
