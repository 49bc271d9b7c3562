"""Shared fixtures: test PKI (trustme) and a smarthost factory (loopback only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from relayq.testing.smarthost import SmarthostFactory
from relayq.testing.tls import TestPKI

if TYPE_CHECKING:
    from collections.abc import Iterator


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
