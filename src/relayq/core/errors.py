"""Failure classes, each carrying its sysexits(3) code and a one-line message.

The command-line wrapper (`relayq.cli._exit`) is the only place these become
an exit status; everything below it raises and lets it decide.
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_OSFILE = 72
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78


class RelayqError(Exception):
    """A failure the user must hear about in one line, with its exit code."""

    code = EX_SOFTWARE

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(RelayqError):
    code = EX_USAGE


class DataError(RelayqError):
    """Bad message content or a malformed address."""

    code = EX_DATAERR


class ConfigError(RelayqError):
    code = EX_CONFIG


class PermissionRefused(RelayqError):
    code = EX_NOPERM


class TempFailure(RelayqError):
    """Nothing was committed; the caller may try again later."""

    code = EX_TEMPFAIL


class QueueError(RelayqError):
    """The spool could not be read or written (disk full, permissions, I/O)."""

    code = EX_IOERR


class DamagedQueueFile(RelayqError):
    """A queue file that cannot be parsed; the runner quarantines it."""

    code = EX_DATAERR
