"""The suite's own order (tests/conftest.py): slow tests first, the rest as collected."""

from __future__ import annotations

from typing import Any

import pytest
from tests.conftest import slow_first, timeout_of


class Item:
    """Just what the ordering reads of a pytest item."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name = name
        self.mark = pytest.mark.timeout(*args, **kwargs).mark if args or kwargs else None

    def get_closest_marker(self, name: str) -> Any:
        assert name == "timeout"
        return self.mark


def test_the_timeout_mark_or_the_default() -> None:
    assert timeout_of(Item("a"), 120) == 120  # type: ignore[arg-type]
    assert timeout_of(Item("b", 900), 120) == 900  # type: ignore[arg-type]
    assert timeout_of(Item("c", timeout=300), 120) == 300  # type: ignore[arg-type]
    assert timeout_of(Item("d", 0), 120) == 120  # type: ignore[arg-type]


def test_slow_first_and_otherwise_stable() -> None:
    items = [Item("u1"), Item("quick", 60), Item("s300", 300), Item("u2"), Item("s900", 900),
             Item("t300", 300), Item("u3", 90)]
    got = [i.name for i in slow_first(items, 120)]  # type: ignore[arg-type]
    assert got == ["s900", "s300", "t300", "u1", "quick", "u2", "u3"]
