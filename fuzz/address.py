"""Fuzz the address parser: command-line recipients and header address lists."""

import atheris

with atheris.instrument_imports():
    from harness import run, text

    from relayq.core import address
    from relayq.core.errors import RelayqError


def target(data: bytes) -> None:
    value = text(data)
    for found in address.parse_list(value):
        assert 0 <= found.start <= found.end <= len(value)
    for rcpt in address.parse_recipient_args(value):
        assert rcpt and "\n" not in rcpt and "\r" not in rcpt and "\0" not in rcpt


if __name__ == "__main__":
    run(target, (RelayqError,))
