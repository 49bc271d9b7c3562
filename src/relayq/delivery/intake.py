"""The taking side of maildrop/: drop files users wrote become queued messages.

relayq.queue.maildrop is the writer's side and the file format; this is the
reader's, run by the daemon (a user's `take` request over the control socket,
and its looks at the directory) and by root's queue runs. The file's owner is
the submitter; nothing inside it is trusted. Every entry is hostile until
proven otherwise (Postfix pickup's rules): opened without following a
symbolic link and without blocking, read only if it is a regular file with
one link, not owned by root and not over the size limit, and never read past
that limit. A refused entry is logged once and removed; a file we may not open
(EACCES: a maildrop/ that was not set-gid to our group when it was written) is
a user's accepted mail and stays, logged once with the chgrp that fixes it. Two takers never take
one file: each holds flock(LOCK_EX) on it while copying. What a process has
said already (Notices) is an object the caller keeps, not a global.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from typing import TYPE_CHECKING

from relayq.core.errors import DataError, PermissionRefused, RelayqError, TempFailure
from relayq.queue.maildrop import (
    MAGIC,
    MAX_HEAD,
    REFUSED,
    Malformed,
    decode,
    identity,
    read_head,
    size_limit,
    valid_name,
)
from relayq.queue.submit import Request, enqueue

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.core.config import Config
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log

STALE = 86400  # an unfinished tHEX file older than this was abandoned by its writer
CLOCK_SLACK = 3600  # a message queued this long "before" its drop file was written may be its copy
MAX_NOTICES = 10  # per user and Notices (process): planted files cannot make a mail flood
MAX_NOTED = 100_000  # unremovable entries remembered; past that, logged again rather than grow


class Notices:
    """What a taking process has said already: the entries it could not remove
    (logged once, not at every look at maildrop/) and the notices it queued per
    user. The daemon keeps one for its life; a Taker made without one has its own."""

    def __init__(self, max_notices: int = MAX_NOTICES, max_noted: int = MAX_NOTED) -> None:
        self.max_notices = max_notices
        self.max_noted = max_noted
        self.noted: set[tuple[int, int]] = set()  # (st_dev, st_ino)
        self.told: dict[int, int] = {}  # uid -> notices queued

    def seen(self, key: tuple[int, int]) -> bool:
        return key in self.noted

    def note(self, key: tuple[int, int]) -> bool:
        """Remember `key`; False if it was noted already (nothing to log)."""
        if key in self.noted:
            return False
        if len(self.noted) >= self.max_noted:
            self.noted.clear()  # a flood of unremovable entries: log them again
        self.noted.add(key)
        return True

    def forget(self, key: tuple[int, int]) -> None:
        self.noted.discard(key)

    def may_tell(self, uid: int) -> bool:
        """Count one notice to `uid`; False once it has had its share."""
        if self.told.get(uid, 0) >= self.max_notices:
            return False
        self.told[uid] = self.told.get(uid, 0) + 1
        return True


def request_of(fields: dict[str, str | list[str]], user: str, uid: int, drop: str) -> Request:
    """The Request a decoded drop file asks for, as submitted by `user`; Malformed for
    a hop count our client never writes (DSN values: check_dsn)."""
    sender, rcpts, hops = fields.get("sender"), fields.get("rcpt", []), str(fields.get("hops", ""))
    if hops and (not (hops.isascii() and hops.isdigit()) or len(hops) > 3):
        raise Malformed("malformed hop count")
    return Request(user=user, uid=uid, sender=sender if isinstance(sender, str) else None,
                   full_name=str(fields.get("name", "")), extract="extract" in fields,
                   ignore_dots="idots" in fields, bs="bs" in fields,
                   recipients=list(rcpts) if isinstance(rcpts, list) else [],
                   notify=str(fields.get("notify", "")), ret=str(fields.get("ret", "")),
                   envid=str(fields.get("envid", "")), body=str(fields.get("body", "")),
                   hops=int(hops) if hops else None, drop=drop)


class Hostile(Exception):
    """An entry that is not a request file of ours; its text is the reason."""


class TooLarge(Hostile):
    """A file over the size limit: not read, but its owner may be told."""


class Unreadable(Exception):
    """A drop file we may not open (EACCES): accepted mail, never removed; the text
    is the log line's reason and fix."""


class Busy(Exception):
    """Another taker holds the file (or it went away meanwhile)."""


class Taker:
    """Copies maildrop/ files into the queue (one look at the directory, or one file)."""

    def __init__(self, cfg: Config, spool: Spool, log: Log, ctx: Context,
                 notices: Notices | None = None) -> None:
        self.cfg = cfg
        self.notices = notices if notices is not None else Notices()
        self.spool = spool
        self.log = log
        self.ctx = ctx
        self._ids: list[str] | None = None  # the queue's ids, for _queued_as()
        self._drops: dict[str, str] = {}  # qid -> the drop file its envelope names

    def take(self, name: str, uid: int) -> tuple[str, str]:
        """Take one file the caller (uid, from SO_PEERCRED) just wrote: (qid, mode).

        Raises the refusal for the caller to hear; the file is then left to
        its owner, who removes it (so a lost reply never loses a message).
        """
        if not valid_name(name):
            raise DataError("not a drop file name")
        dfd = self._open_dir()
        try:
            try:
                if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_uid != uid:
                    raise PermissionRefused(f"{name} is not yours")  # and nothing about it
                fd, st = self._open(dfd, name)
            except Hostile as exc:
                raise DataError(f"{name}: {exc}") from None
            except Busy:
                raise TempFailure(f"{name} is being taken already") from None
            except Unreadable as exc:  # the queue's setup, not the message: it waits
                self._unreadable(dfd, name, str(exc))
                raise TempFailure(f"{name}: {exc}") from None
            except FileNotFoundError:
                raise RelayqError(f"{name}: no such drop file", 66) from None
            try:
                if st.st_uid != uid:  # replaced since the first look
                    raise PermissionRefused(f"{name} is not yours")
                qid, mode = self._copy(dfd, name, fd, st)
            finally:
                os.close(fd)
        finally:
            os.close(dfd)
        return qid, mode

    def take_all(self, now: float | None = None) -> list[tuple[str, str]]:
        """Take every dHEX file; log and remove whatever else is there."""
        now = time.time() if now is None else now
        try:
            dfd = self._open_dir()
        except FileNotFoundError:
            return []
        done: list[tuple[str, str]] = []
        try:
            with os.scandir(dfd) as entries:  # read as we go: a user may plant millions
                for entry in entries:
                    name = entry.name
                    if entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if self.notices.seen((st.st_dev, st.st_ino)):
                            continue  # could not be removed: logged once already
                    try:
                        item = self._take_entry(dfd, name, now)
                    except RelayqError as exc:  # the queue's trouble, not the file's: later
                        self.log.error(f"maildrop: {name}: {exc.message}; left for the next run")
                        continue
                    except Exception as exc:  # a bug must not stop the other users' mail
                        self.log.error(f"maildrop: {name}: internal error: "
                                       f"{type(exc).__name__}: {exc}; left for the next run")
                        continue
                    if item is not None:
                        done.append(item)
        finally:
            os.close(dfd)
        return done

    def _open_dir(self) -> int:
        return os.open(self.spool.maildrop,
                       os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _take_entry(self, dfd: int, name: str, now: float) -> tuple[str, str] | None:
        try:
            if not valid_name(name):
                raise Hostile("not a drop file name")
            if name[0] == "t":  # being written (its writer holds a lock) or abandoned
                st = os.lstat(name, dir_fd=dfd)
                if not stat.S_ISREG(st.st_mode):
                    raise Hostile("not a regular file")
                if now - st.st_mtime < STALE:
                    return None
                fd, st = self._open(dfd, name)  # Busy while its writer lives
                os.close(fd)
                self.log.info(f"maildrop: removed {name} (uid {st.st_uid}): abandoned "
                              "while being written")
                self._remove(dfd, name, st)
                return None
            fd, st = self._open(dfd, name)
        except FileNotFoundError:
            return None
        except Busy:
            return None
        except Unreadable as exc:  # a user's accepted mail: kept, and the fix logged once
            self._unreadable(dfd, name, str(exc))
            return None
        except TooLarge as exc:  # maybe only over a limit its writer could not read
            if name[0] == "d":
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                self._tell_owner(st, name, f"Message is too large ({exc})")
            self._refuse(dfd, name, str(exc))
            return None
        except Hostile as exc:
            self._refuse(dfd, name, str(exc))
            return None
        try:
            if name[0] == "d":  # a file a taker was copying when the power went?
                queued = self._queued_as(identity(name, st), st.st_mtime)
                if queued:
                    self.log.warning(f"maildrop: {name} from uid {st.st_uid} is queued "
                                     f"already as {queued} (its hand-over was cut off "
                                     "before the file's removal was durable); removed")
                    self._taken(dfd, name, st)
                    return None
            try:
                qid, mode = self._copy(dfd, name, fd, st)
            except RelayqError as exc:
                if exc.code not in REFUSED:  # the queue's trouble, not the file's: later
                    self._once(st, f"maildrop: {name}: {exc.message}; left for the next run")
                    return None
                self.log.error(f"maildrop: {name} from uid {st.st_uid} refused: {exc.message}")
                if not isinstance(exc, Malformed):  # not our client's file: no one to tell
                    self._tell_owner(st, name, exc.message)
                self._remove(dfd, name, st)
                return None
            except Exception as exc:  # a bug must not stop the other users' mail
                self._once(st, f"maildrop: {name}: internal error: {type(exc).__name__}: "
                               f"{exc}; left for the next run")
                return None
            return qid, mode
        finally:
            os.close(fd)

    def _unreadable(self, dfd: int, name: str, reason: str) -> None:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        self._once(st, f"maildrop: {name!r} (uid {st.st_uid}): {reason}")

    def _once(self, st: os.stat_result, line: str) -> None:
        """Log about a file left in place once, not at every look at maildrop/."""
        if self.notices.note((st.st_dev, st.st_ino)):
            self.log.error(line)

    def _tell_owner(self, st: os.stat_result, name: str, reason: str) -> None:
        """The submitter heard exit 0 long ago: a refusal must reach them by mail."""
        import pwd

        if not self.notices.may_tell(st.st_uid):
            return
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            self.log.error(f"maildrop: {name}: uid {st.st_uid} has no name to tell")
            return
        rcpt = f"{user}@{self.ctx.domain}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
        text = (f"From: Mail Delivery System <MAILER-DAEMON@{self.ctx.domain}>\n"
                f"To: <{rcpt}>\n"
                "Subject: Undelivered Mail: your message was not accepted\n"
                "Auto-Submitted: auto-replied\n\n"
                f"The message you handed to relayq at {when} (file {name}) could not\n"
                "be accepted, and was not sent:\n\n"
                f"    {' '.join(reason.split())}\n")
        req = Request(user="MAILER-DAEMON", uid=0,  # relayq's own notice, like a bounce
                      sender="", recipients=[user])  # a notice never bounces
        # (the bare name, qualified by enqueue(): local_forward then applies to it)
        try:
            msg, _ = enqueue(self.cfg, self.spool, req, [text.encode("utf-8", "replace")],
                             self.log, self.ctx)
        except RelayqError as exc:
            self.log.error(f"maildrop: {name}: cannot tell {rcpt}: {exc.message}")
            return
        msg.release()
        self.log.info(f"{msg.qid}: tells {rcpt} that {name} was refused")

    def _open(self, dfd: int, name: str) -> tuple[int, os.stat_result]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Hostile("a symbolic link") from None
            if exc.errno == errno.ENOENT:
                raise
            if exc.errno in (errno.EACCES, errno.EPERM) and self._wrong_group(dfd, name):
                raise Unreadable(self._fix(dfd, name, exc)) from None
            raise Hostile(f"cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            limit = size_limit(self.cfg) + MAX_HEAD
            if not stat.S_ISREG(st.st_mode):
                raise Hostile("not a regular file")
            if st.st_nlink != 1:
                raise Hostile(f"{st.st_nlink} hard links")
            if st.st_uid == 0:
                raise Hostile("owned by root, who never uses the drop directory")
            if st.st_mode & 0o022:  # another user could have written it: whose is it?
                raise Hostile(f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy() from None
            try:
                now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                raise Busy() from None
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise Busy()
            st = os.fstat(fd)
            if st.st_size > limit:
                ours = os.pread(fd, len(MAGIC), 0) == MAGIC  # our client's, or planted?
                raise (TooLarge if ours else Hostile)(
                    f"{st.st_size} bytes, over the limit of {limit}")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _wrong_group(self, dfd: int, name: str) -> bool:
        """Could this file we may not open be a client's, written where maildrop/ was
        not set-gid? Only if its group is not ours and the group may read it: anything
        else (mode 000, or our group and still closed) is planted, and removed, so
        that no user can make every run keep and log thousands of files."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        ours = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
        return not ours and bool(st.st_mode & stat.S_IRGRP)

    def _fix(self, dfd: int, name: str, exc: OSError) -> str:
        """What makes a file we may not read ours to take: its group, which maildrop/
        (set-gid, mode 3733) gives every file written there."""
        import grp

        try:
            group = grp.getgrgid(os.getegid()).gr_name
        except KeyError:
            group = str(os.getegid())
        path = os.path.join(self.spool.maildrop, name)
        gid = os.fstat(dfd).st_mode & stat.S_ISGID
        return (f"cannot be read by uid {os.geteuid()} ({exc.strerror}); left in place: "
                f"chgrp {group} {path}"
                + ("" if gid else f" (and chmod 3733 {self.spool.maildrop})"))

    def _queued_as(self, ident: str, mtime: float) -> str:
        """The queued message whose envelope names drop file `ident`, or "".

        Only messages queued after the file was written can be its copy (their
        queue id tells when, without reading them: a 1 h margin for a clock
        that stepped back); each envelope is read at most once per Taker.
        """
        from relayq.queue.names import qid_time

        if self._ids is None:
            self._ids = self.spool.ids()
        now = time.time()
        for qid in reversed(self._ids):  # newest first
            if qid_time(qid, now) < mtime - CLOCK_SLACK:
                break
            if qid not in self._drops:
                try:
                    self._drops[qid] = self.spool.read_envelope(qid).drop
                except (OSError, RelayqError):
                    self._drops[qid] = ""
            if self._drops[qid] == ident:
                return qid
        return ""

    def _copy(self, dfd: int, name: str, fd: int, st: os.stat_result) -> tuple[str, str]:
        """enqueue() the request as the file's owner, then remove the file durably;
        returns (qid, delivery mode).

        The order is what makes a crash harmless: the queue's commit is durable
        first (a crash before it leaves the file, taken again later: nothing
        lost); the file's unlink is made durable (fsync of maildrop/) while the
        new message is still locked, so no runner can send it before then; the
        envelope names the file (identity()), so a file that a crash between
        the two brings back is recognised as queued already, not queued twice.
        """
        import pwd

        head, first = read_head(fd)
        chunks = _reader(fd, first, size_limit(self.cfg))
        fields = decode(head)
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = str(st.st_uid)
        req = request_of(fields, user, st.st_uid, identity(name, st))
        note = check_dsn(req)
        if note:
            self.log.warning(f"maildrop: a file from uid {st.st_uid} ({user}): {note}")
        mode = str(fields.get("mode", ""))
        msg, _ = enqueue(self.cfg, self.spool, req, chunks, self.log, self.ctx)
        try:
            self._taken(dfd, name, st)
        finally:
            msg.release()  # only now may a runner claim it
        self.log.info(f"{msg.qid}: taken from the drop directory, submitted by uid "
                      f"{st.st_uid} ({user})")
        return msg.qid, mode

    def _taken(self, dfd: int, name: str, st: os.stat_result) -> None:
        """Remove a file whose message is queued, and make that removal durable (fsync
        of maildrop/, through the descriptor we hold): a power loss must not bring it
        back to be taken again."""
        try:
            self._remove(dfd, name, st)
            os.fsync(dfd)
        except OSError as exc:  # queued all the same; should the file stay or come
            self.log.error(f"maildrop: {name}: cannot remove it durably ({exc.strerror}); "
                           "the message is queued, and the file is known as its copy")

    def _remove(self, dfd: int, name: str, st: os.stat_result) -> None:
        """Unlink a file we took; its owner may have renamed tHEX to dHEX meanwhile."""
        for candidate in (name, "d" + name[1:]):
            try:
                now = os.stat(candidate, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                try:
                    os.unlink(candidate, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                return

    def _refuse(self, dfd: int, name: str, reason: str) -> None:
        """Log a hostile entry once and get rid of it without following it."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        key = (st.st_dev, st.st_ino)
        what = f"maildrop: {name!r} (uid {st.st_uid}): {reason}"
        try:
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.rmdir(name, dir_fd=dfd)
                except OSError:  # not empty: out of the way, where only root looks
                    aside = f"maildrop-{st.st_ino}-{int(time.time())}"
                    os.rename(name, os.path.join(self.spool.quarantine_dir, aside),
                              src_dir_fd=dfd)
                    self.log.warning(f"{what}; moved to {self.spool.quarantine_dir}/{aside}")
                    return
            else:
                os.unlink(name, dir_fd=dfd)
        except OSError as exc:
            if self.notices.note(key):
                self.log.warning(f"{what}; cannot remove it ({exc.strerror}), ignored")
            return
        self.notices.forget(key)
        self.log.warning(f"{what}; removed")


def check_dsn(req: Request) -> str:
    """What sendmail's -N, -R, -B and -V allow, made canonical by the rule of every way
    in (relayq.core.dsnparams); Malformed for what no client of ours writes. Returns a note
    for the log when an ENVID had to be changed (dsnparams.recorded_envid: a file written
    by an older relayq is still delivered, never refused after its exit 0)."""
    from relayq.core import dsnparams

    try:
        req.notify, req.ret, _, req.body = dsnparams.envelope(req.notify, req.ret, "", req.body)
        req.envid, note = dsnparams.recorded_envid(req.envid) if req.envid else ("", "")
    except dsnparams.BadParam as exc:
        raise Malformed(f"malformed request: {exc}") from None
    return note


def _reader(fd: int, first: bytes, limit: int) -> Iterator[bytes]:
    """`first`, then the file's remaining bytes; DataError once past `limit` in all."""
    total = len(first)
    if first:
        yield first
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise DataError(f"Message is too large (over {limit} bytes)")
        yield chunk


