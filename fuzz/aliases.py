"""Fuzz the aliases parser."""

import atheris

with atheris.instrument_imports():
    from harness import run, text

    from relayq.core import aliases


def target(data: bytes) -> None:
    aliases.parse(text(data))


if __name__ == "__main__":
    run(target, (aliases.AliasError,))
