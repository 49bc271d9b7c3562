"""maildrop/: how users who may not write the queue hand mail over, and how it is taken.

A caller that is neither root nor the queue's owner (`Spool.writable()`)
writes its request to `maildrop/tHEX` (mode 0640): the sendmail arguments
that matter, then the message as read. It asks the daemon over its socket
(relayq.system.control) to take that file; the daemon checks that the asker owns
it (SO_PEERCRED), copies it into the queue through enqueue() and removes it.
When no daemon answers, the caller renames the file to `dHEX` and syncs the
file system: the message is then durable and waits there until the daemon
starts or root runs the queue, which take every `d` file.

The file's owner is the submitter; nothing inside it is trusted. Every entry
is hostile until proven otherwise (Postfix pickup's rules): opened without
following a symbolic link and without blocking, read only if it is a regular
file with one link, not owned by root and not over the size limit, and never
read past that limit. A refused entry is logged once and removed. Two takers
never take one file: each holds flock(LOCK_EX) on it while copying.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from relayq.core.errors import DataError, PermissionRefused, QueueError, RelayqError, TempFailure

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from relayq.core.config import Config
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context, Request
    from relayq.system.log import Log

MAGIC = b"relayq-drop 1\n"
MAX_HEAD = 1 << 20  # the request part: fields and recipients
MAX_VALUE = 4096  # sendmail refuses longer arguments too
MAX_RCPTS = 10000
DEFAULT_LIMIT = 100 << 20  # message size when max_message_size is 0 (no limit for root)
STALE = 86400  # an unfinished tHEX file older than this was abandoned by its writer
KEEP_PATIENCE = 60.0  # seconds the writer waits for a taker holding its file
SINGLE = frozenset({"sender", "name", "notify", "ret", "envid", "body", "hops", "mode"})
FLAGS = frozenset({"extract", "idots", "bs"})
HEX = frozenset("0123456789abcdef")
CLOCK_SLACK = 3600  # a message queued this long "before" its drop file was written may be its copy
REFUSED = (64, 65)  # what the message itself earns (bad address, too large...); else: later


def identity(name: str, st: os.stat_result) -> str:
    """What names a drop file in the envelope of its message: the random part of its
    name (tHEX and dHEX are one file), its inode and its mtime."""
    return f"{name[1:]}:{st.st_ino}:{st.st_mtime_ns}"


class Malformed(DataError):
    """The request part is not what our client writes: a planted or damaged file."""


def size_limit(cfg: Config) -> int:
    return cfg.max_message_size or DEFAULT_LIMIT


def valid_name(name: str) -> bool:
    return len(name) == 33 and name[0] in "td" and all(c in HEX for c in name[1:])


def encode(fields: list[tuple[str, str]]) -> bytes:
    """The request part; values were checked by the argument parser (no CR, LF, NUL)."""
    out = [MAGIC]
    for key, value in fields:
        out.append(f"{key} {value}\n".encode("utf-8", "surrogateescape"))
    out.append(b"\n")
    return b"".join(out)


def decode(head: bytes) -> dict[str, str | list[str]]:
    """The request part of a drop file (without MAGIC); DataError if anything is off."""
    fields: dict[str, str | list[str]] = {}
    rcpts: list[str] = []
    for raw in head.split(b"\n") if head else []:
        line = raw.decode("utf-8", "surrogateescape")
        key, sep, value = line.partition(" ")
        if not sep or len(value) > MAX_VALUE or any(ord(c) < 32 or c == "\x7f" for c in value):
            raise Malformed("malformed request line")
        if key == "rcpt":
            if len(rcpts) >= MAX_RCPTS:
                raise Malformed(f"more than {MAX_RCPTS} recipient arguments")
            rcpts.append(value)
        elif key in SINGLE or key in FLAGS:
            if key in fields:
                raise Malformed(f"{key} given twice")
            fields[key] = value
        else:
            raise Malformed(f"unknown request field {key!r}")
    fields["rcpt"] = rcpts
    return fields


# -- the submitting side (any user) ---------------------------------------------------


class Pending:
    """A written, not yet durable, request file of ours (tHEX), its descriptor open."""

    def __init__(self, drop: str, name: str, fd: int) -> None:
        self.drop = drop
        self.name = name
        self.fd = fd

    def taken(self) -> bool:
        return os.fstat(self.fd).st_nlink == 0

    def keep(self) -> bool:
        """No daemon took it (as far as we heard): make it durable as dHEX for the next
        taker. True if a taker had it after all."""
        import time

        deadline = time.monotonic() + KEEP_PATIENCE
        while True:  # a taker still copying it finishes first (but nobody holds us forever)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # rename regardless: a taker finds it under either name
                time.sleep(0.05)
        if self.taken():
            return True
        final = "d" + self.name[1:]
        try:
            os.rename(os.path.join(self.drop, self.name), os.path.join(self.drop, final))
        except FileNotFoundError:
            if self.taken():
                return True
            raise QueueError("the message vanished from the drop directory before it "
                             "was queued", 75) from None
        except OSError as exc:
            raise _error("keep the message in the drop directory", exc) from None
        try:
            os.fsync(self.fd)
            _syncfs(self.fd)  # the rename too: we may not open maildrop/ to fsync it
        except OSError as exc:
            raise _error("sync the drop directory", exc) from None
        self.name = final
        return False

    def discard(self) -> None:
        try:
            os.unlink(os.path.join(self.drop, self.name))
        except OSError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def write(spool: Spool, fields: list[tuple[str, str]], chunks: Iterable[bytes],
          limit: int, *, count_hops: bool = False) -> Pending:
    """Write the request and the message to a new maildrop/tHEX; with `count_hops`
    (no -h given) refuse, as the taker would, a header of too many Received fields."""
    from relayq.core import policy

    hops = policy.HopCounter()
    drop = spool.maildrop
    name = "t" + os.urandom(16).hex()
    path = os.path.join(drop, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except FileNotFoundError:
        raise QueueError(f"cannot submit: {spool.root} belongs to another user and has no "
                         "drop directory (start the relayq daemon, or run sendmail -q as "
                         "root once)", 75) from None
    except OSError as exc:
        raise _error("create a file in the drop directory", exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # while held, nobody takes it as abandoned
        os.fchmod(fd, 0o640)  # the taker may be the queue's group, whatever our umask
        size = 0
        head = encode(fields)
        _write_all(fd, head)
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise DataError(f"Message is too large (over {limit} bytes)")
            if count_hops:
                hops.feed(chunk)
            _write_all(fd, chunk)
        refusal = policy.hop_refusal(hops.hops) if count_hops else ""
        if refusal:  # a loop: the caller still has the message, exit 0 would lose it
            raise DataError(refusal)
    except BaseException as exc:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _error("write to the drop directory", exc) from None
        raise
    return Pending(drop, name, fd)


def request_fields(req: Request, mode: str) -> list[tuple[str, str]]:
    """What the taker needs of a Request; DataError for a value it would refuse."""
    from relayq.core import policy

    fields: list[tuple[str, str]] = []
    if req.sender is not None:
        fields.append(("sender", req.sender))
    if req.full_name:
        fields.append(("name", req.full_name))
    for key, on in (("extract", req.extract), ("idots", req.ignore_dots), ("bs", req.bs)):
        if on:
            fields.append((key, ""))
    fields.extend(("rcpt", r) for r in req.recipients)
    for key, value in (("notify", req.notify), ("ret", req.ret), ("envid", req.envid),
                       ("body", req.body), ("mode", mode)):
        if value:
            fields.append((key, value))
    if req.hops is not None:
        fields.append(("hops", str(req.hops)))
    for key, value in fields:
        if len(value) > MAX_VALUE or any(ord(c) < 32 or c == "\x7f" for c in value):
            raise DataError(f"{key}: control characters or over {MAX_VALUE} characters")
    if len(req.recipients) > MAX_RCPTS:
        raise DataError(f"more than {MAX_RCPTS} recipient arguments")
    refusal = policy.hop_refusal(req.hops) if req.hops is not None else ""
    if refusal:  # the taker's rule, before the exit 0 (a loop must not be dropped later)
        raise DataError(refusal)
    if sum(len(k) + len(v) + 2 for k, v in fields) + len(MAGIC) + 1 > MAX_HEAD:
        raise DataError("too many or too long recipient arguments")
    return fields


def hand_over(spool: Spool, fields: list[tuple[str, str]], chunks: Iterable[bytes],
              limit: int, *, count_hops: bool = False) -> str:
    """Submit as a user who may not write the queue: the queue id the daemon gave
    ("" when it took the file but its answer was lost), or the drop file's name
    when no daemon took it (it waits, durable, in maildrop/)."""
    from relayq.system import control

    pending = write(spool, fields, chunks, limit, count_hops=count_hops)
    try:
        fcntl.flock(pending.fd, fcntl.LOCK_UN)  # complete: the daemon may take it now
        conn = control.Connection.open(spool.socket_path, f"take {pending.name}", 300.0)
        status = None
        if conn is not None:
            try:
                status = conn.status()
            finally:
                conn.close()
        if status is not None:
            code, text = status
            if code == 0:
                return text
            if code in REFUSED:  # refused for good: the caller hears why; nothing stays
                pending.discard()
                raise RelayqError(text, code)
        # no daemon, or it could not queue it now: the next taker will
        return "" if pending.keep() else pending.name
    finally:
        pending.close()


def hand_over_request(cfg: Config, spool: Spool, req: Request, chunks: Iterable[bytes],
                      mode: str = "") -> str:
    return hand_over(spool, request_fields(req, mode), chunks, size_limit(cfg),
                     count_hops=req.hops is None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _syncfs(fd: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


def _error(action: str, exc: OSError) -> RelayqError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TempFailure(f"cannot {action}: no space left on the queue file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionRefused(f"cannot {action}: {exc.strerror}")
    return QueueError(f"cannot {action}: {exc.strerror or exc}")


# -- the taking side (the daemon, root's queue runs) ---------------------------------


_NOTED: set[tuple[int, int]] = set()  # entries we could not remove: logged once
_TOLD: dict[int, int] = {}  # uid -> notices queued by this process
MAX_NOTICES = 10  # per user and process: planted files cannot make a mail flood


def _note(key: tuple[int, int]) -> None:
    if len(_NOTED) >= 100_000:
        _NOTED.clear()  # a flood of unremovable entries: log them again rather than grow
    _NOTED.add(key)


class Hostile(Exception):
    """An entry that is not a request file of ours; its text is the reason."""


class TooLarge(Hostile):
    """A file over the size limit: not read, but its owner may be told."""


class Busy(Exception):
    """Another taker holds the file (or it went away meanwhile)."""


class Taker:
    """Copies maildrop/ files into the queue; one per process is enough."""

    def __init__(self, cfg: Config, spool: Spool, log: Log, ctx: Context) -> None:
        self.cfg = cfg
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
                        if (st.st_dev, st.st_ino) in _NOTED:
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

    def _once(self, st: os.stat_result, line: str) -> None:
        """Log about a file left in place once, not at every look at maildrop/."""
        key = (st.st_dev, st.st_ino)
        if key not in _NOTED:
            _note(key)
            self.log.error(line)

    def _tell_owner(self, st: os.stat_result, name: str, reason: str) -> None:
        """The submitter heard exit 0 long ago: a refusal must reach them by mail."""
        import pwd

        from relayq.queue.submit import Request, enqueue

        if _TOLD.get(st.st_uid, 0) >= MAX_NOTICES:
            return
        _TOLD[st.st_uid] = _TOLD.get(st.st_uid, 0) + 1
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
        req = Request(user="MAILER-DAEMON", uid=0)  # relayq's own notice, like a bounce
        req.sender = ""  # a notice never bounces
        req.recipients = [rcpt]
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

        from relayq.queue.submit import Request, enqueue

        head, first = _read_head(fd)
        chunks = _reader(fd, first, size_limit(self.cfg))
        fields = decode(head)
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = str(st.st_uid)
        req = Request(user=user, uid=st.st_uid)
        sender = fields.get("sender")
        req.sender = sender if isinstance(sender, str) else None
        req.full_name = str(fields.get("name", ""))
        req.extract = "extract" in fields
        req.ignore_dots = "idots" in fields
        req.bs = "bs" in fields
        rcpts = fields["rcpt"]
        req.recipients = list(rcpts) if isinstance(rcpts, list) else []
        req.notify = str(fields.get("notify", ""))
        req.ret = str(fields.get("ret", ""))
        req.envid = str(fields.get("envid", ""))
        req.body = str(fields.get("body", ""))
        req.drop = identity(name, st)
        hops = str(fields.get("hops", ""))
        if hops:
            if not (hops.isascii() and hops.isdigit()) or len(hops) > 3:
                raise Malformed("malformed hop count")
            req.hops = int(hops)
        note = _check_dsn(req)
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
            if key not in _NOTED:
                _note(key)
                self.log.warning(f"{what}; cannot remove it ({exc.strerror}), ignored")
            return
        _NOTED.discard(key)
        self.log.warning(f"{what}; removed")


def _check_dsn(req: Request) -> str:
    """What sendmail's -N, -R, -B and -V allow, made canonical by the rule of every way
    in (relayq.core.dsnparams); Malformed for what no client of ours writes. Returns a note
    for the log when an ENVID had to be changed: a file written by an older relayq,
    which took any printable -V with exit 0, is still delivered (xtext-encoded, or
    without its ENVID when that is too long), never refused after that exit 0."""
    from relayq.core import dsnparams

    try:
        req.notify = dsnparams.notify(req.notify) if req.notify else ""
        req.ret = dsnparams.ret(req.ret) if req.ret else ""
        req.body = dsnparams.body(req.body) if req.body else ""
    except dsnparams.BadParam as exc:
        raise Malformed(f"malformed request: {exc}") from None
    if not req.envid:
        return ""
    try:
        req.envid = dsnparams.envid(req.envid)
        return ""
    except dsnparams.BadParam as exc:
        reason = str(exc)
    raw = req.envid
    try:
        req.envid = dsnparams.envid(dsnparams.xtext_encode(raw))
        return f"ENVID {raw!r} ({reason}) sent xtext-encoded as {req.envid}"
    except dsnparams.BadParam:
        req.envid = ""
        return f"ENVID {raw!r} ({reason}) left out"


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


def _read_head(fd: int) -> tuple[bytes, bytes]:
    """(the request part without MAGIC, the message bytes read past it)."""
    buf = b""
    while True:
        end = buf.find(b"\n\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEAD:
            raise Malformed("request part too long")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise Malformed("truncated request part")
        buf += chunk
    if not buf.startswith(MAGIC):
        raise Malformed("not a relayq drop file")
    return buf[len(MAGIC) : end], buf[end + 2 :]
