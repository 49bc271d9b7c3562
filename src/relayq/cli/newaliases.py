"""`newaliases` (= `sendmail -bi`, `relayq newaliases`): check the aliases file."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from relayq.cli._exit import run
from relayq.core.errors import EX_OK, RelayqError

if TYPE_CHECKING:
    from relayq.core.config import Config


def _main(argv: list[str]) -> int:
    from relayq.system import configfile

    path = None
    if argv[:1] == ["-C"] and len(argv) > 1:
        path = argv[1]
    elif argv:
        from relayq.core.errors import UsageError

        raise UsageError("usage: newaliases [-C config]")
    cfg = configfile.select(path).load()  # -C is root's (77)
    return check(cfg)


def check(cfg: Config) -> int:
    """Prove the aliases file parses, and say so in sendmail's words:
    "PATH: N aliases, longest N bytes, N bytes total".

    There is no compiled form: the file is small and parsed at each local
    delivery. A missing file means no aliases (a null client needs none).
    """
    from relayq.core import aliases
    from relayq.core.errors import EX_CONFIG

    path = cfg.aliases_file
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        print(f"{path}: no aliases file, no aliases")
        return EX_OK
    except OSError as exc:
        raise RelayqError(f"aliases_file: cannot read {path}: {exc.strerror}",
                          EX_CONFIG) from None
    table = aliases.parse(text, path)  # AliasError: file:line and exit 65
    for warning in table.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: {len(table.entries)} aliases, longest {table.longest} bytes, "
          f"{table.total} bytes total")
    return EX_OK


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(sys.argv[1:] if argv is None else argv), "newaliases")


if __name__ == "__main__":
    sys.exit(main())
