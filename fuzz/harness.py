"""The shared part of relayq's atheris targets: run one parser on fuzzed input.

Each target module names a parser and the errors it may raise for bad input
(always relayq's own); anything else escaping is a crash that atheris
reports with the input that caused it. Run a target for a while:

    .venv/bin/python fuzz/address.py -max_total_time=300
    make fuzz                      # every target for FUZZ_SECONDS (default 60) each

`make test` runs each for a few thousand inputs (tests/system/test_fuzz_smoke.py).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import atheris

if TYPE_CHECKING:
    from collections.abc import Callable


def text(data: bytes) -> str:
    return atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))


def run(target: Callable[[bytes], object], allowed: tuple[type[BaseException], ...]) -> None:
    """Fuzz `target`; it may raise only the `allowed` errors."""

    def one(data: bytes) -> None:
        try:
            target(data)
        except allowed:
            pass

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
