"""An account's OAuth2 token file: JSON, mode 0600, replaced whole, refreshed in turn.

Two workers whose tokens expire together must not both spend the refresh
token (a provider that rotates it may then refuse the older one) nor write a
half file: a refresh happens under an exclusive flock on a sibling
"<path>.lock", and a save is a new temporary file renamed over the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from typing import TYPE_CHECKING, Any

from relayq.core.errors import EX_DATAERR, EX_IOERR, EX_TEMPFAIL, RelayqError
from relayq.system.locks import flock_within
from relayq.system.textfile import NotRegular, open_regular, remove_leftovers, replace

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.core.config import Config

MAX_FILE = 256 * 1024


class TokenFile:
    """One token file. `owner` (uid, gid): what a root process gives the file, its
    lock and its directory (the queue's owner: the runner reads them after dropping
    privileges); None: the owner of the directory above the token directory."""

    def __init__(self, path: str, owner: tuple[int, int] | None = None) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self._owner = owner

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r})"

    # --- ownership -----------------------------------------------------------

    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) to chown to when running as root, or None."""
        if os.geteuid() != 0:
            return None
        if self._owner is not None:
            return self._owner
        try:
            st = os.stat(os.path.dirname(self.directory))
        except OSError:
            return None
        return (st.st_uid, st.st_gid) if st.st_uid != 0 else None

    def _ensure_directory(self) -> None:
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            return
        except OSError as exc:
            raise RelayqError(f"cannot create {self.directory}: {exc.strerror}",
                              EX_IOERR) from None
        owner = self.owner()
        if owner is not None:
            os.chown(self.directory, *owner)

    # --- the lock --------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, wait: float | None = None) -> Iterator[None]:
        """Hold the exclusive lock: a refresh (load, ask, save) happens once at a time.
        `wait`: give up after this many seconds (RelayqError, 75) instead of waiting on
        a holder that hangs."""
        self._ensure_directory()
        lock = self.path + ".lock"
        try:
            fd = open_regular(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RelayqError(f"cannot open {lock}: {exc.strerror}", EX_IOERR) from None
        try:
            owner = self.owner()
            if owner is not None:
                os.fchown(fd, *owner)
            _flock(fd, wait, lock)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # --- reading and writing ---------------------------------------------------

    def load(self) -> dict[str, Any]:
        """The file's object; {} when there is none. RelayqError naming a damaged one."""
        try:
            fd = open_regular(self.path)
        except FileNotFoundError:
            return {}
        except NotRegular:
            raise RelayqError(f"{self.path}: not a regular file, refusing it as the token "
                              "file", EX_DATAERR) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RelayqError(f"{self.path}: a symbolic link, refusing it as the "
                                  "token file", EX_DATAERR) from None
            raise RelayqError(f"cannot read {self.path}: {exc.strerror}", EX_IOERR) from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_FILE + 1)
        if not raw:
            return {}  # created but never written (a crash before its first save)
        try:
            data = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_FILE else None
        except (UnicodeDecodeError, ValueError):
            data = None
        if not isinstance(data, dict):
            raise RelayqError(f"{self.path}: damaged token file (not a JSON object); "
                              "run relayq oauth2 login again", EX_DATAERR)
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Replace the file with `data`, atomically and durably, mode 0600."""
        self._ensure_directory()
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
        remove_leftovers(self.path)  # a killed save's copies hold a refresh token
        try:
            replace(self.path, text.encode("utf-8"), 0o600, owner=self.owner(), durable=True)
        except OSError as exc:
            raise RelayqError(f"cannot write {self.path}: {exc.strerror}", EX_IOERR) from None


def _flock(fd: int, wait: float | None, lock: str) -> None:
    if wait is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    elif not flock_within(fd, wait, 0.05):
        raise RelayqError(f"{lock}: still held by another process after {wait:g} s (a "
                          "token request in progress)", EX_TEMPFAIL)


def dead_grants(cfg: Config) -> list[dict[str, Any]]:
    """The accounts that need a person (core.oauth2.needs_login: a dead grant, none
    given yet, another mailbox's): {"account", "user", "since", "error"} each, for
    `relayq status` (critical)."""
    from relayq.core.oauth2 import needs_login, token_file

    found = []
    for name, acct in cfg.accounts().items():
        if not acct.oauth2_provider:
            continue
        try:
            data = TokenFile(token_file(acct)).load()
        except RelayqError:
            continue
        why = needs_login(acct, data)
        if why:
            mark = data.get("reauth")
            since = mark.get("since") if isinstance(mark, dict) else None
            found.append({"account": name, "user": acct.user, "since": since, "error": why})
    return found
