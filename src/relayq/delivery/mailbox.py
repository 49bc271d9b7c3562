"""Mailboxes: the only code that writes a user's mbox, Maildir or alias file.

mbox (as mutt, mailx and Postfix's local(8) read and write it):

    From SENDER Thu Nov 27 12:00:00 2025     (envelope sender, MAILER-DAEMON for <>)
    Return-Path: <SENDER>
    Delivered-To: RECIPIENT
    ...the message, every line starting "From " written as ">From "...
    (empty line)

Invariants of an mbox append:

- The file is opened with O_NOFOLLOW|O_APPEND and refused unless it is a
  regular file with one link owned by the expected user (Postfix's
  safe_open(); dma's and mail.local's symlink holes). A refusal leaves the
  target untouched and is a temporary failure, so an administrator can look.
- Two locks, both taken before writing: a dotlock `PATH.lock` (created with
  O_EXCL; one older than DOTLOCK_STALE seconds is removed as stale) and an
  fcntl write lock on the whole file. Either held by someone else past the
  timeout is a temporary failure.
- Any error while writing or syncing truncates the file back to its old
  length: a reader never sees half a message.

Maildir (qmail's maildir(5)): the message is written to tmp/UNIQUE, fsynced,
linked into new/UNIQUE and the directory fsynced, so new/ only ever holds
complete messages.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO

DOTLOCK_STALE = 300.0  # seconds; sendmail's mail.local and mutt use five minutes
LOCK_TIMEOUT = 30.0
CHUNK = 1 << 16

_counter = 0


class MailboxError(Exception):
    """Delivery into a mailbox failed; `status` is the RFC 3463 code (4.x.x: try later)."""

    def __init__(self, message: str, status: str = "4.2.0") -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def temporary(self) -> bool:
        return self.status.startswith("4")


def from_line(sender: str, now: float) -> bytes:
    """The mbox separator: `From sender asctime` in local time."""
    who = sender or "MAILER-DAEMON"
    who = "".join(c if c > " " else "_" for c in who)
    return f"From {who} {time.asctime(time.localtime(now))}\n".encode("utf-8", "surrogateescape")


def trace_headers(sender: str, recipient: str) -> bytes:
    """Return-Path and Delivered-To, as a local delivery agent adds them."""
    return (f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n"
            .encode("utf-8", "surrogateescape"))


def escaped_lines(data: BinaryIO) -> Iterator[bytes]:
    """The message from its start with `From ` at a line start escaped as `>From `."""
    data.seek(0)
    at_start = True
    while piece := data.readline(CHUNK):
        if at_start and piece.startswith(b"From "):
            piece = b">" + piece
        at_start = piece.endswith(b"\n")
        yield piece


def _plain(data: BinaryIO) -> Iterator[bytes]:
    data.seek(0)
    while chunk := data.read(CHUNK):
        yield chunk


def _write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_error(path: str, exc: OSError) -> MailboxError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return MailboxError(f"{path}: {exc.strerror} (mailbox full)", "4.2.2")
    if exc.errno == errno.EFBIG:
        return MailboxError(f"{path}: {exc.strerror} (mailbox full)", "4.2.2")
    return MailboxError(f"{path}: write failed: {exc.strerror or exc}", "4.3.0")


# -- opening and locking ------------------------------------------------------


def open_for_append(path: str, expect_uid: int | None, create_mode: int = 0o600) -> int:
    """Open (or create) a mailbox for appending, refusing anything but a plain file.

    Refused: a symlink (O_NOFOLLOW), a FIFO (O_NONBLOCK makes a reader-less
    FIFO fail instead of hang; fstat catches one with a reader), a directory,
    a device, a file with more than one link, and a file owned by someone
    other than expect_uid. lstat after open must name the same inode.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except FileNotFoundError:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, create_mode)
    except OSError as exc:
        reason = {
            errno.ELOOP: "refused: a symbolic link",
            errno.EISDIR: "refused: a directory",
            errno.ENXIO: "refused: not a regular file",
            errno.EEXIST: "appeared while being created",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise MailboxError(f"{path}: {reason}", "4.2.0") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MailboxError(f"{path}: refused: not a regular file")
        if st.st_nlink != 1:
            raise MailboxError(f"{path}: refused: {st.st_nlink} hard links")
        if expect_uid is not None and st.st_uid != expect_uid:
            raise MailboxError(f"{path}: refused: owned by uid {st.st_uid}, not {expect_uid}")
        try:
            lst = os.lstat(path)
        except OSError:
            raise MailboxError(f"{path}: replaced while being opened") from None
        if (lst.st_dev, lst.st_ino) != (st.st_dev, st.st_ino):
            raise MailboxError(f"{path}: replaced while being opened")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_mailbox(path: str, uid: int, gid: int) -> None:
    """As root: create a missing mbox, empty, for its user to fill.

    The user's own process may not create files in a spool like
    /var/mail (root:mail 2775) unless it has group mail; an empty file made
    here with O_CREAT|O_EXCL|O_NOFOLLOW (which never follows a symlink, not
    even a dangling one) and handed over with fchown is all root ever writes.
    An existing path is left alone; the user's open() judges it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY
                     | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise MailboxError(f"{path}: cannot create: {exc.strerror or exc}") from None
    try:
        os.fchown(fd, uid, gid)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise MailboxError(f"{path}: cannot give to uid {uid}: {exc.strerror or exc}") from None
    os.close(fd)


def _wait(deadline: float, pause: float) -> float:
    """Sleep a little before the next try; the growing pause is capped at one second."""
    if time.monotonic() >= deadline:
        raise TimeoutError
    time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
    return min(pause * 2, 1.0)


class DotLock:
    """`PATH.lock`, created with O_EXCL; stale after DOTLOCK_STALE seconds.

    A spool directory we may not write (no group mail) means no dotlock: the
    fcntl lock still excludes every modern reader, and mail is not held back
    for a lock file nobody could have created for us.
    """

    def __init__(self, path: str, timeout: float, stale: float = DOTLOCK_STALE) -> None:
        self.path = path + ".lock"
        self.timeout = timeout
        self.stale = stale
        self.held = False

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        pause = 0.05
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                try:
                    age = time.time() - os.lstat(self.path).st_mtime
                    if age > self.stale:
                        os.unlink(self.path)
                        continue
                except FileNotFoundError:
                    continue
                except OSError:
                    pass
                try:
                    pause = _wait(deadline, pause)
                except TimeoutError:
                    raise MailboxError(f"{self.path}: mailbox is locked (dotlock)") from None
                continue
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return
                raise MailboxError(f"{self.path}: {exc.strerror or exc}") from None
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except OSError:
                pass


def lock_fcntl(fd: int, path: str, timeout: float) -> None:
    """A whole-file fcntl write lock, the one mutt and mailx take."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise MailboxError(f"{path}: cannot lock: {exc.strerror or exc}") from None
        try:
            pause = _wait(deadline, pause)
        except TimeoutError:
            raise MailboxError(f"{path}: mailbox is locked (fcntl)") from None


# -- mbox ---------------------------------------------------------------------


def append_mbox(
    path: str,
    data: BinaryIO,
    *,
    sender: str,
    recipient: str,
    now: float,
    expect_uid: int | None = None,
    dotlock: bool = True,
    timeout: float = LOCK_TIMEOUT,
) -> None:
    """Append one message in mbox format; all or nothing (see the module docstring)."""
    lock = DotLock(path, timeout) if dotlock else None
    if lock is not None:
        lock.acquire()
    try:
        fd = open_for_append(path, expect_uid)
        try:
            lock_fcntl(fd, path, timeout)
            _append_locked(fd, path, data, sender, recipient, now)
        finally:
            os.close(fd)  # drops the fcntl lock
    finally:
        if lock is not None:
            lock.release()


def _append_locked(fd: int, path: str, data: BinaryIO, sender: str, recipient: str,
                   now: float) -> None:
    old_size = os.fstat(fd).st_size
    try:
        buf = bytearray(from_line(sender, now) + trace_headers(sender, recipient))
        last = b"\n"
        for piece in escaped_lines(data):
            buf += piece
            last = piece[-1:]
            if len(buf) >= CHUNK:
                _write_all(fd, bytes(buf))
                buf.clear()
        buf += b"\n" if last == b"\n" else b"\n\n"  # end the last line, then the empty line
        _write_all(fd, bytes(buf))
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, old_size)
        except OSError:
            pass
        raise _write_error(path, exc) from None


def append_file(path: str, data: BinaryIO, *, sender: str, recipient: str, now: float,
                timeout: float = LOCK_TIMEOUT) -> None:
    """An alias's /file target: mbox format, fcntl-locked, no dotlock, same refusals.

    /dev/null is accepted and nothing is written, as sendmail allows.
    """
    if path == "/dev/null":
        return
    append_mbox(path, data, sender=sender, recipient=recipient, now=now, expect_uid=None,
                dotlock=False, timeout=timeout)


# -- Maildir ------------------------------------------------------------------


def unique_name(now: float) -> str:
    """time.MusecPpidQn.host, with '/' and ':' in the host name escaped (maildir(5))."""
    global _counter
    _counter += 1
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    usec = int((now % 1) * 1_000_000)
    return f"{int(now)}.M{usec}P{os.getpid()}Q{_counter}.{host}"


def deliver_maildir(root: str, data: BinaryIO, *, sender: str, recipient: str,
                    now: float) -> str:
    """Deliver into Maildir `root` (created if missing); returns the new file's path."""
    try:
        for sub in ("", "tmp", "new", "cur"):
            try:
                os.mkdir(os.path.join(root, sub), 0o700)
            except FileExistsError:
                pass
        for sub in ("tmp", "new"):
            if not stat.S_ISDIR(os.lstat(os.path.join(root, sub)).st_mode):
                raise MailboxError(f"{root}/{sub}: refused: not a directory")
    except OSError as exc:
        raise MailboxError(f"{root}: {exc.strerror or exc}", "4.3.0") from None
    name = unique_name(now)
    tmp = os.path.join(root, "tmp", name)
    new = os.path.join(root, "new", name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise MailboxError(f"{tmp}: {exc.strerror or exc}", "4.3.0") from None
    linked = False
    try:
        try:
            _write_all(fd, trace_headers(sender, recipient))
            for chunk in _plain(data):
                _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, new)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.rename(tmp, new)  # file systems without hard links
        linked = True
        dfd = os.open(os.path.join(root, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        # all or nothing, as for mbox: a failure reported (and so retried later)
        # leaves no copy in new/, or the retry would deliver a second one
        for path in (tmp, new) if linked else (tmp,):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise _write_error(tmp, exc) from None
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return new
