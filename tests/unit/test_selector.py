"""relayq.core.selector: sendmail's -qI/-qR/-qS rules (queue.c gatherq())."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core.errors import UsageError
from relayq.core.selector import Selector, matches, parse

QID = "6AQ1UaXXXX0001"


def sel(*args: str) -> list[Selector]:
    return [parse(a) for a in args]


@pytest.mark.parametrize(
    ("arg", "kind", "pattern", "negate"),
    [
        ("Ifoo", "I", "foo", False),
        ("R@example.org", "R", "@example.org", False),
        ("!Sroot", "S", "root", True),
        ("!R!", "R", "!", True),
        ("S<>", "S", "<>", False),
    ],
)
def test_parse(arg: str, kind: str, pattern: str, negate: bool) -> None:
    s = parse(arg)
    assert (s.kind, s.pattern, s.negate) == (kind, pattern, negate)
    assert s == Selector(kind, pattern, negate)


@pytest.mark.parametrize(
    "arg", ["", "!", "X", "Lfoo", "Qreason", "30m", "iFoo", "I", "!R", " Rfoo"]
)
def test_parse_refuses(arg: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(arg)
    assert info.value.code == 64


def test_no_selectors_match_everything() -> None:
    assert matches([], QID, "", [])


def test_id_is_a_case_sensitive_substring() -> None:
    assert matches(sel("IXXXX"), QID, "a@b", ["c@d"])
    assert not matches(sel("Ixxxx"), QID, "a@b", ["c@d"])
    assert not matches(sel("!IXXXX"), QID, "a@b", ["c@d"])


def test_recipient_and_sender_ignore_case() -> None:
    assert matches(sel("R@EXAMPLE.org"), QID, "a@b", ["Bob@example.ORG"])
    assert matches(sel("SROOT"), QID, "root@host", ["x@y"])
    assert not matches(sel("!SROOT"), QID, "root@host", ["x@y"])


def test_any_recipient_may_match() -> None:
    assert matches(sel("Rcarol"), QID, "a@b", ["bob@x", "carol@y"])
    assert not matches(sel("Rdave"), QID, "a@b", ["bob@x", "carol@y"])
    assert not matches(sel("Rbob"), QID, "a@b", [])


def test_same_kind_is_or() -> None:
    assert matches(sel("Sroot", "Salice"), QID, "alice@x", ["b@y"])
    assert matches(sel("Rbob", "Rcarol"), QID, "a@b", ["carol@y"])
    assert not matches(sel("Rbob", "Rcarol"), QID, "a@b", ["dave@y"])


def test_different_kinds_are_and() -> None:
    # the Bat Book's example: -qSroot -qRbiff@here
    assert matches(sel("Sroot", "Rbiff@here"), QID, "root", ["biff@here"])
    assert not matches(sel("Sroot", "Rbiff@here"), QID, "root", ["other@here"])
    assert not matches(sel("Sroot", "Rbiff@here"), QID, "alice", ["biff@here"])
    assert not matches(sel("Sroot", "Rbiff@here", "Inope"), QID, "root", ["biff@here"])


def test_negated_recipient_is_tested_per_recipient_like_sendmail() -> None:
    assert not matches(sel("!Rfoo"), QID, "a@b", ["foo@x"])
    assert matches(sel("!Rfoo"), QID, "a@b", ["bar@x"])
    # one recipient without "foo" is enough (sendmail's gatherq checks R lines one by one)
    assert matches(sel("!Rfoo"), QID, "a@b", ["foo@x", "bar@x"])


def test_null_sender_is_matched_as_angle_brackets() -> None:
    assert matches(sel("S<>"), QID, "", ["a@b"])
    assert not matches(sel("S<>"), QID, "root", ["a@b"])
    assert not matches(sel("!S<>"), QID, "", ["a@b"])


@given(
    pattern=st.text(min_size=1, max_size=5),
    value=st.text(max_size=20),
)
def test_negation_is_the_complement_for_single_values(pattern: str, value: str) -> None:
    for kind in "IRS":
        plain = matches([Selector(kind, pattern)], value, value, [value])
        negated = matches([Selector(kind, pattern, True)], value, value, [value])
        assert plain != negated


def test_repr_and_slots() -> None:
    s = parse("!Rfoo")
    assert repr(s) == "Selector('R', 'foo', negate=True)"
    assert not hasattr(s, "__dict__")
    with pytest.raises(ValueError):
        Selector("Q", "x")
