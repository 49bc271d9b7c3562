"""Fuzz sendmail's flag parser with hostile argument vectors."""

import atheris

with atheris.instrument_imports():
    from harness import run

    from relayq.cli.flags import parse
    from relayq.core.errors import RelayqError


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    argv = [fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
            for _ in range(fdp.ConsumeIntInRange(0, 8))]
    parse(argv)


if __name__ == "__main__":
    run(target, (RelayqError,))
