"""Fixtures the tests that create real users share."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest
from tests.helpers.users import ensure_users, install_launchers

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture(scope="module")
def launchers() -> Iterator[Path]:
    """The test users, and relayq's launchers installed where they can run them."""
    ensure_users()
    root = install_launchers()
    yield root
    shutil.rmtree(root, ignore_errors=True)
