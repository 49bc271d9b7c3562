"""`relayq import FILE... [--from KIND] [--write]`: another MTA's configuration as a
relayq.toml, each setting with the line it came from and every setting that
cannot be carried over named (relayq.core.peers)."""

from __future__ import annotations

import os
import sys

from relayq.core import (
    peer_dma,
    peer_exim4,
    peer_msmtp,
    peer_nullmailer,
    peer_postfix,
    peer_sendmail,
    peer_ssmtp,
)
from relayq.core.config import SYSTEM_CONFIG, parse
from relayq.core.errors import EX_CANTCREAT, EX_NOINPUT, EX_OK, ConfigError, RelayqError
from relayq.core.peers import (
    GENERICS_NAME,
    SECRET_KEYS,
    Imported,
    detect,
    generics_text,
    render,
)

KINDS = {m.KIND: m for m in (peer_sendmail, peer_nullmailer, peer_ssmtp, peer_dma, peer_msmtp,
                              peer_postfix, peer_exim4)}
MAX_FILE = 1 << 20  # a configuration file, not a mailbox


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise RelayqError(f"{path}: {exc.strerror}", EX_NOINPUT) from None
    if len(data) > MAX_FILE:
        raise RelayqError(f"{path}: larger than {MAX_FILE} bytes: not a configuration file",
                          EX_NOINPUT)
    return data.decode("utf-8", "replace")


def convert(paths: list[str], kind: str | None) -> list[Imported]:
    """Each file read, its format found (or `kind`), one result per format."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        text = _read(path)
        groups.setdefault(kind or detect(path, text, KINDS), []).append((path, text))
    return [KINDS[k].convert(files) for k, files in groups.items()]


def _write(path: str, text: str, private: bool) -> None:
    """A new file only (the administrator's existing one is never replaced), written
    whole or not at all; 0600 when it holds a password."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.relayq-import")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o600 if private else 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # fails if the file exists: never replaced
    except FileExistsError:
        raise RelayqError(f"{path} exists: relayq import never replaces a configuration "
                          "(print it without --write and merge by hand)", EX_CANTCREAT) from None
    except OSError as exc:
        raise RelayqError(f"{exc.filename or path}: {exc.strerror}", EX_CANTCREAT) from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _generics_path(target: str) -> str:
    """Where the generics file a peer made goes: next to the relayq.toml (next to the
    system one when the configuration is /dev/null, i.e. none)."""
    base = SYSTEM_CONFIG if os.path.realpath(target) == os.devnull else target
    return os.path.join(os.path.dirname(os.path.abspath(base)), GENERICS_NAME)


def run_import(paths: list[str], kind: str | None, write: bool, target: str) -> int:
    results = convert(paths, kind)
    generics = generics_text(results)
    where = _generics_path(target) if generics else ""
    first = next((r for r in results if r.generics), None)  # one file for all of them
    if first is not None:
        first.set("generics_file", where, first.generics[0][0])
    text = render(results, secrets=write, generics_at="" if write else where)
    try:
        parse(text, "(imported)")  # what is printed is a configuration relayq takes
    except ConfigError as exc:
        raise RelayqError(f"the imported settings are not a valid relayq.toml: {exc}",
                          78) from None
    if write:
        private = any(s.key in SECRET_KEYS for r in results for s in r.settings)
        if generics:
            _write(where, generics, private=False)
        try:
            _write(target, text, private)
        except RelayqError:
            if generics:
                os.unlink(where)  # both files or neither
            raise
        if generics:
            print(f"relayq: wrote {where} (generics_file)", file=sys.stderr)
        print(f"relayq: wrote {target}"
              + (" (mode 0600: it holds a password)" if private else ""), file=sys.stderr)
    else:
        sys.stdout.write(text)
    notes = sum(len(r.notes) for r in results)
    if notes:
        print(f"relayq: {notes} setting{'s' if notes != 1 else ''} not carried over "
              "(listed at the end)", file=sys.stderr)
    return EX_OK
