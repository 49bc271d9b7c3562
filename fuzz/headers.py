"""Fuzz the header scanner: parse a block, serialize it back, byte for byte."""

import atheris

with atheris.instrument_imports():
    from harness import run, text

    from relayq.core.errors import RelayqError
    from relayq.core.headers import parse_block, serialize


def target(data: bytes) -> None:
    value = text(data)
    fields, rest, _ = parse_block(value)
    assert isinstance(serialize(fields), bytes) and value.endswith(rest)


if __name__ == "__main__":
    run(target, (RelayqError,))
