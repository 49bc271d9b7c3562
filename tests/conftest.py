"""Shared fixtures: test PKI (trustme) and a smarthost factory (loopback only).

Also the order the suite runs in: the tests whose `pytest.mark.timeout` is above the
default (the slow ones; their timeout says how slow) go first, slowest first, so that
with `pytest -n N --maxschedchunk 1` (the Makefile's `test`) no worker picks up the
10,000-message load test near the end while the others sit idle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from relayq.testing.oauth2 import FakeTokenEndpoint
from relayq.testing.smarthost import SmarthostFactory
from relayq.testing.tls import TestPKI

if TYPE_CHECKING:
    from collections.abc import Iterator


def timeout_of(item: pytest.Item, default: float) -> float:
    """The item's own `pytest.mark.timeout` (function, class or module), else the default."""
    mark = item.get_closest_marker("timeout")
    if mark is None:
        return default
    value = mark.args[0] if mark.args else mark.kwargs.get("timeout", default)
    return float(value) if value else default


def slow_first(items: list[pytest.Item], default: float) -> list[pytest.Item]:
    """Tests with a timeout above the default first (largest first); the rest keep their
    order. Stable, so every xdist worker computes the same order."""
    return sorted(items, key=lambda item: -max(timeout_of(item, default), default))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    default = float(config.getoption("timeout", None) or config.getini("timeout") or 0)
    items[:] = slow_first(items, default)


@pytest.fixture(scope="session")
def pki() -> TestPKI:
    """Trusted CA + server cert for smarthost.example.org/localhost/127.0.0.1/::1, and an
    unknown CA."""
    return TestPKI()


@pytest.fixture
def smarthost_factory() -> Iterator[SmarthostFactory]:
    """Call it with Smarthost options; `.scripted(...)` for a raw ScriptedServer."""
    factory = SmarthostFactory()
    yield factory
    factory.close()


@pytest.fixture
def token_endpoint() -> Iterator[FakeTokenEndpoint]:
    """A started fake OAuth2 token endpoint on 127.0.0.1 (relayq.testing.oauth2)."""
    with FakeTokenEndpoint() as endpoint:
        yield endpoint
