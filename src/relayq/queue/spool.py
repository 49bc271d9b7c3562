"""The queue on disk: the only module that creates, changes or removes queue files.

Layout under the queue directory:

    queue/QID.d    the message (headers and body, LF line ends); never replaced,
                   so it is also the lock: a runner holds flock(LOCK_EX) on it
    queue/QID.e    the envelope record (relayq.core.envelope), replaced atomically
    queue/QID.t    a new envelope being written (ignored by readers)
    quarantine/    damaged files moved out of the way, with a log line
    maildrop/      (shared queues only: made by root, or by a service user in a
                   top directory others may enter) where users who may not write
                   queue/ leave mail for the daemon or a queue run (relayq.queue.maildrop)
    relayq.sock    (while the daemon runs) its local socket (relayq.system.control)

Who may write: root, or the user owning queue/, commits directly. A queue
made by root is public: its top directory is 0711 (no listing), queue/ and
quarantine/ stay 0700, and maildrop/ is 1733 (anyone may create a file there,
nobody but its owner may list it or remove another user's file). A queue made
by an ordinary user is that user's private queue and has no maildrop/.

Commit point: the data file is written and fsynced, the envelope is written to
QID.t, fsynced and renamed to QID.e, and the directory is fsynced. A crash
before that leaves no QID.e, so nothing is visible; the stray files are
removed by a later scan. A failed write, fsync or close fails the commit.

Queue IDs are 14 characters of sendmail's base-60 alphabet: year%60, month,
day, hour, minute, second, four characters of microseconds and four of the
process id. They sort by submission time and are unique on the host (the data
file is created with O_EXCL, and a collision picks the next microsecond).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time

from relayq.core.envelope import MAX_REPLY, Envelope
from relayq.core.errors import DamagedQueueFile, QueueError, RelayqError, TempFailure

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwx"
STALE_SECONDS = 3600  # stray .d/.t files older than this, and unlocked, are debris
KINDS = (".d", ".e", ".t", ".f")  # data, envelope, envelope being written, in flight


def _b60(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 60)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def make_qid(now: float, pid: int) -> str:
    t = time.gmtime(now)
    head = "".join(
        ALPHABET[v] for v in (t.tm_year % 60, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    )
    return head + _b60(int((now % 1) * 1_000_000), 4) + _b60(pid, 4)


def qid_time(qid: str, now: float) -> float:
    """When a queue id was made (UTC seconds): the inverse of make_qid, with the
    year taken as the latest one not after `now` that matches year % 60."""
    import calendar

    try:
        y, mo, d, h, mi, sec = (ALPHABET.index(c) for c in qid[:6])
        micro = 0
        for c in qid[6:10]:
            micro = micro * 60 + ALPHABET.index(c)
    except ValueError:
        return 0.0
    this_year = time.gmtime(now).tm_year
    year = this_year - ((this_year - y) % 60)
    try:
        return calendar.timegm((year, mo, d, h, mi, sec, 0, 0, 0)) + micro / 1_000_000
    except (ValueError, OverflowError):
        return 0.0


def _unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    if "threading" not in sys.modules:  # one thread (sendmail): no one to share with,
        _fsync_path(path)  # and importing threading would cost 4 ms
        return
    _group_sync(path).sync()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GroupSync:
    """One directory fsync shared by the threads that need it at the same time.

    A caller's change (a rename, an unlink) is made before it asks; any fsync
    that *starts* after it asked makes that change durable. So while one
    fsync runs, later callers wait and are all served by the next one: with
    N concurrent commits (the listener's sessions) about 2 fsyncs instead of N.
    """

    def __init__(self, path: str) -> None:
        import threading

        self.path = path
        self.cond = threading.Condition()
        self.asked = 0  # requests registered
        self.done = 0  # every request up to this one is durable
        self.running = False
        self.rounds = 0  # fsyncs made (for tests and curiosity)

    def sync(self) -> None:
        with self.cond:
            self.asked += 1
            mine = self.asked
            while self.done < mine and self.running:
                self.cond.wait()
            if self.done >= mine:
                return
            self.running = True
            covers = self.asked
        try:
            _fsync_path(self.path)
        except BaseException:
            with self.cond:
                self.running = False
                self.cond.notify_all()
            raise
        with self.cond:
            self.running = False
            self.done = max(self.done, covers)
            self.rounds += 1
            self.cond.notify_all()


_SYNCS: dict[str, _GroupSync] = {}


def _group_sync(path: str) -> _GroupSync:
    sync = _SYNCS.get(path)
    if sync is None:
        sync = _SYNCS.setdefault(path, _GroupSync(path))
    return sync


def _become(uid: int, gid: int) -> None:
    from relayq.system import privilege

    try:
        privilege.drop_to(uid, gid)
    except OSError as exc:
        raise RelayqError(f"cannot become uid {uid}, the queue's owner: {exc.strerror}",
                          71) from None


def _io_error(action: str, exc: OSError) -> RelayqError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TempFailure(f"cannot {action}: no space left on the queue file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return QueueError(f"cannot {action}: {exc.strerror}", code=77)
    if exc.errno == errno.EROFS:
        return QueueError(f"cannot {action}: {exc.strerror}", code=73)
    return QueueError(f"cannot {action}: {exc.strerror or exc}")


class Spool:
    """A queue directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.queue = os.path.join(root, "queue")
        self.quarantine_dir = os.path.join(root, "quarantine")
        self.maildrop = os.path.join(root, "maildrop")
        self.socket_path = os.path.join(root, "relayq.sock")

    def ensure(self, owner: tuple[int, int] | None = None, public: bool | None = None) -> None:
        """Create the queue directories (private to the owner) if missing; as
        root, also the public drop directory (see the module docstring).

        `owner` (uid, gid): the daemon's service user (daemon_user), who gets
        the directories; maildrop/ becomes set-gid to its group, so users'
        files there (mode 0640) are readable by it. `public`: make maildrop/
        (default: when root); the system daemon running as its service user
        asks for it, a user's private queue never has one.
        """
        for path in (self.root, self.queue, self.quarantine_dir):
            if os.path.isdir(path):
                continue
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
                _fsync_dir(os.path.dirname(path))  # the new directory itself must survive
            except OSError as exc:
                raise _io_error(f"create queue directory {path}", exc) from None
        if public is None:
            public = os.geteuid() == 0
        if public and not os.path.lexists(self.maildrop):
            self._publish()
        if owner is not None:
            self._give(owner)

    def _give(self, owner: tuple[int, int]) -> None:
        """Hand the directories to the service user, through descriptors opened without
        following links: once it owns the queue, any entry in it may be its trap."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            top = os.open(self.root, flags)
            try:
                for name in ("", "queue", "quarantine", "maildrop"):
                    fd = os.open(name, flags, dir_fd=top) if name else top
                    try:
                        st = os.fstat(fd)
                        if (st.st_uid, st.st_gid) != owner:
                            os.fchown(fd, *owner)
                        if name == "maildrop":
                            os.fchmod(fd, 0o3733)
                    finally:
                        if fd != top:
                            os.close(fd)
            finally:
                os.close(top)
        except OSError as exc:
            raise _io_error(f"give the queue to uid {owner[0]}", exc) from None

    def enter(self) -> None:
        """Root in a queue that belongs to another user (daemon_user) becomes that user
        for the rest of the process: that user can plant links and files in the queue,
        and root must never follow or write them (SECURITY.md).

        The top directory is the administrator's path (followed); queue/ inside it
        is looked at without following a link. Anything unexpected is refused.
        """
        if os.geteuid() != 0:
            return
        for path, follow in ((self.root, True), (self.queue, False)):
            try:
                st = os.stat(path, follow_symlinks=follow)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise _io_error(f"look at the queue directory {path}", exc) from None
            if st.st_uid != 0:
                _become(st.st_uid, st.st_gid)
                return

    def _publish(self) -> None:
        try:
            st = os.stat(self.root)
            if st.st_uid == 0 and st.st_mode & 0o777 == 0o700:
                os.chmod(self.root, 0o711)  # users reach maildrop/ and the socket, list nothing
            os.mkdir(self.maildrop, 0o700)
            fd = os.open(self.maildrop, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
            try:
                # a service user reads users' files through the group (set-gid: theirs)
                os.fchmod(fd, 0o1733 if os.geteuid() == 0 else 0o3733)
            finally:
                os.close(fd)
            _fsync_dir(self.root)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _io_error(f"create the drop directory {self.maildrop}", exc) from None

    def writable(self) -> bool:
        """May this process commit to the queue itself (root, or the queue's owner)?

        False means: hand the message over through maildrop/ (relayq.queue.maildrop).
        A queue that does not exist yet will be created by, and belong to, us.
        """
        euid = os.geteuid()
        if euid == 0:
            return True
        for path in (self.queue, self.root):
            try:
                return os.stat(path).st_uid == euid
            except FileNotFoundError:
                continue
            except OSError:
                return False
        parent = os.path.dirname(os.path.abspath(self.root))
        while not os.path.exists(parent) and parent != "/":
            parent = os.path.dirname(parent)  # makedirs will create the rest as us
        return os.access(parent, os.W_OK)

    def _path(self, qid: str, ext: str) -> str:
        return os.path.join(self.queue, qid + ext)

    # -- writing a new message ------------------------------------------------

    def create(self, qid: str | None = None) -> NewMessage:
        """Allocate a queue id (or take `qid`) and open its data file, locked, for writing.

        A given `qid` is a report's id recorded in the message it is about
        (Envelope.notice): a data file of that name without an envelope is
        what a crash left of the same report, and is written again.
        """
        now = time.time()
        pid = os.getpid()
        for _ in range(1000):
            name = qid or make_qid(now, pid)
            try:
                fd = os.open(
                    self._path(name, ".d"),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o600,
                )
            except FileExistsError:
                if qid is not None:
                    fd = self._reopen(qid)
                else:
                    now += 0.000001
                    continue
            except FileNotFoundError:
                self.ensure()
                continue
            except OSError as exc:
                raise _io_error("create a queue file", exc) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            return NewMessage(self, name, fd)
        raise TempFailure("cannot allocate a queue id")

    def _reopen(self, qid: str) -> int:
        """The debris of a report whose making was cut off, truncated for writing again."""
        if os.path.exists(self._path(qid, ".e")):
            raise TempFailure(f"{qid}: queue id already committed")
        try:
            fd = os.open(self._path(qid, ".d"), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise _io_error("create a queue file", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink == 0:  # swept meanwhile: start afresh
                raise TempFailure(f"{qid}: report debris removed meanwhile; try again")
            os.ftruncate(fd, 0)
        except BlockingIOError:
            os.close(fd)
            raise TempFailure(f"{qid}: report being written by another process") from None
        except OSError as exc:
            os.close(fd)
            raise _io_error("create a queue file", exc) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def report_queued(self, qid: str, about: str) -> bool:
        """Is report `qid` about message `about` committed (and not yet delivered)?"""
        try:
            return self.read_envelope(qid).about == about
        except FileNotFoundError:
            return False
        except DamagedQueueFile:
            return False

    def bury(self, claim: Claim, reason: str) -> None:
        """Keep a message nobody can be told about as a dead letter in quarantine/.

        mailq lists it and `relayq status` counts it; only an operator removes it.
        """
        claim.envelope.dead = reason
        claim.record()
        self.quarantine(claim.qid, "dead")
        claim.finished = True  # out of the queue
        claim.release()

    def write_envelope(self, env: Envelope, first: bool = False) -> None:
        """Replace QID.e atomically: temp file, fsync, rename, directory fsync.

        With `first` (the commit of a new message) a failure removes QID.e
        too, so a commit the caller saw fail never leaves a message behind.
        """
        tmp = self._path(env.qid, ".t")
        final = self._path(env.qid, ".e")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                data = env.dumps()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            _fsync_dir(self.queue)
        except OSError as exc:
            for path in (tmp, final) if first else (tmp,):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise _io_error(f"write envelope {env.qid}", exc) from None

    # -- reading --------------------------------------------------------------

    def names(self) -> list[str]:
        """The queue directory's entries (one listing, shared by sweep() and ids())."""
        try:
            return os.listdir(self.queue)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _io_error("read the queue directory", exc) from None

    def stream_ids(self, counts: dict[str, int] | None = None) -> Iterator[str]:
        """Committed queue ids in directory order, as the directory is read.

        For queue runs: the first id comes at once and no listing the size
        of the queue is held. `counts` (pass {}) ends up with how many files
        of each KINDS the directory held, for debris_suspected().
        Entries removed meanwhile (by deliveries) may or may not appear;
        every other entry appears once.
        """
        try:
            with os.scandir(self.queue) as entries:
                for entry in entries:
                    name = entry.name
                    ext = name[-2:]
                    if counts is not None and ext in KINDS:
                        counts[ext] = counts.get(ext, 0) + 1
                    if ext == ".e":
                        yield name[:-2]
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _io_error("read the queue directory", exc) from None

    @staticmethod
    def debris_suspected(counts: dict[str, int]) -> bool:
        """After stream_ids(): a data file without envelope, or a temp file, may be debris."""
        return (counts.get(".d", 0) != counts.get(".e", 0) or counts.get(".t", 0) > 0
                or counts.get(".f", 0) > 0)

    def ids(self, names: list[str] | None = None) -> list[str]:
        """Queue ids of committed messages, oldest first."""
        if names is None:
            names = self.names()
        return sorted(n[:-2] for n in names if n.endswith(".e"))

    def read_envelope(self, qid: str) -> Envelope:
        try:
            with open(self._path(qid, ".e"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _io_error(f"read envelope {qid}", exc) from None
        env = Envelope.loads(raw, qid)
        if not os.path.exists(self._path(qid, ".d")):
            raise DamagedQueueFile(f"{qid}: envelope without data file")
        return env

    def data_path(self, qid: str) -> str:
        return self._path(qid, ".d")

    def is_locked(self, qid: str) -> bool:
        """True while a runner (or the submitting process) holds the message."""
        try:
            fd = os.open(self._path(qid, ".d"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- claiming for delivery ------------------------------------------------

    def claim(self, qid: str, wait: float = 0.0) -> Claim | None:
        """Lock a message for delivery, or None if another process holds it or it is gone.

        The envelope is read only after the lock is held: a record read before
        could already have been replaced by the previous holder. `wait` gives
        a holder that long to let go: the daemon learns of a new message at
        its rename, while the writer still holds the lock for the directory
        fsync, about a millisecond.
        """
        try:
            fd = os.open(self._path(qid, ".d"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if os.path.exists(self._path(qid, ".e")):
                raise DamagedQueueFile(f"{qid}: envelope without data file") from None
            return None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.0005)
        try:
            env = self.read_envelope(qid)
        except FileNotFoundError:
            os.close(fd)  # delivered and removed by the previous holder
            return None
        except BaseException:
            os.close(fd)
            raise
        return Claim(self, env, fd)

    def adopt(self, qid: str, fd: int) -> Claim:
        """Turn a lock already held (the submitter's, across fork) into a claim."""
        return Claim(self, self.read_envelope(qid), fd)

    # -- damage and debris ----------------------------------------------------

    def quarantine(self, qid: str, suffix: str = "") -> None:
        """Move a message's files out of the queue so the rest keeps flowing.

        Both are linked into quarantine/ (synced) before either leaves queue/: a
        crash in between leaves the message in the queue, never half of it in each
        (a data file alone in queue/ would be swept as debris). `suffix` names the
        copies (default: a time stamp); the same suffix again replaces them.
        """
        os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
        suffix = suffix or time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for ext in (".d", ".e"):
            src = self._path(qid, ext)
            dst = os.path.join(self.quarantine_dir, f"{qid}{ext}.{suffix}")
            tmp = dst + ".t"
            try:
                _unlink_if_there(tmp)
                os.link(src, tmp)
                os.rename(tmp, dst)
                moved.append(src)
            except FileNotFoundError:
                pass
        _fsync_dir(self.quarantine_dir)
        for src in reversed(moved):  # the envelope first, as finish() does
            _unlink_if_there(src)
        _fsync_dir(self.queue)

    def dead_letters(self) -> Iterator[tuple[str, Envelope, int]]:
        """(qid, envelope, data size) of each dead letter kept in quarantine/ (see bury)."""
        try:
            names = sorted(os.listdir(self.quarantine_dir))
        except OSError:
            return
        for name in names:
            qid, _, rest = name.partition(".")
            if not rest.startswith("e.") or rest.endswith(".t"):
                continue
            path = os.path.join(self.quarantine_dir, name)
            try:
                env = Envelope.loads(_read_small(path), qid)
                size = os.stat(os.path.join(self.quarantine_dir, f"{qid}.d{rest[1:]}")).st_size
            except (OSError, DamagedQueueFile):
                continue
            if env.dead:
                yield qid, env, size

    def remove_dead(self, qid: str) -> bool:
        """The operator's command for a dead letter (`relayq delete QID`): True if it was one."""
        if not any(q == qid for q, _, _ in self.dead_letters()):
            return False
        for name in os.listdir(self.quarantine_dir):
            if name.startswith((f"{qid}.e.", f"{qid}.d.")):
                os.unlink(os.path.join(self.quarantine_dir, name))
        _fsync_dir(self.quarantine_dir)
        return True

    def sweep(self, now: float | None = None, names: list[str] | None = None) -> list[str]:
        """Remove debris of crashed writers; returns what was removed.

        With as many data files as envelopes and no temp file there is no
        debris to look for (an envelope without data is damage, which claim()
        quarantines; the next sweep then sees the difference): at 100,000
        messages that check is a count instead of a set of every name.
        """
        now = time.time() if now is None else now
        removed: list[str] = []
        if names is None:
            names = self.names()
        counts: dict[str, int] = {}
        for name in names:
            ext = name[-2:]
            if ext in KINDS:
                counts[ext] = counts.get(ext, 0) + 1
        if not self.debris_suspected(counts):
            return removed
        committed = {n[:-2] for n in names if n.endswith(".e")}
        for name in names:
            qid, ext = name[:-2], name[-2:]
            if ext not in (".d", ".t", ".f") or (ext in (".d", ".f") and qid in committed):
                continue
            path = os.path.join(self.queue, name)
            try:
                if now - os.stat(path).st_mtime < STALE_SECONDS:
                    continue
            except FileNotFoundError:
                continue
            claim_fd = self._lock_orphan(qid) if ext == ".d" else None
            if ext == ".d" and claim_fd is None:
                continue
            try:  # under the lock: a runner writing a report again waits for it
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
            finally:
                if claim_fd is not None:
                    os.close(claim_fd)
        return removed

    def _lock_orphan(self, qid: str) -> int | None:
        try:
            fd = os.open(self._path(qid, ".d"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.path.exists(self._path(qid, ".e")):
            os.close(fd)
            return None
        return fd

    def listing(
        self, ids: list[str] | None = None
    ) -> Iterator[tuple[str, Envelope | None, str, int, bool]]:
        """(qid, envelope or None, problem, data size, locked) for each message, for mailq.

        The lock state comes from /proc/locks, read again every LOCKS_EVERY
        seconds: mailq takes no lock itself (a test lock could make a queue
        run skip the message), and one stat of the data file is all it costs
        per message. Without /proc each data file is test-locked instead. A
        message delivered since the directory was listed comes back with the
        problem "job completed" (sendmail's words); one bad file never stops
        the listing.
        """
        queue = self.queue + "/"
        held: set[int] | None = None
        fresh_until = 0.0
        for n, qid in enumerate(self.ids() if ids is None else ids):
            try:
                raw = _read_small(queue + qid + ".e")
            except FileNotFoundError:
                yield qid, None, "job completed", 0, False
                continue
            except OSError as exc:
                yield qid, None, f"cannot read envelope: {exc.strerror}", 0, False
                continue
            try:
                env = Envelope.loads(raw, qid)
            except DamagedQueueFile as exc:
                yield qid, None, exc.message, 0, False
                continue
            try:
                st = os.stat(queue + qid + ".d")
            except OSError:
                gone = not os.path.exists(self._path(qid, ".e"))
                yield qid, None, "job completed" if gone else "envelope without data file", 0, False
                continue
            if n % 64 == 0 and time.monotonic() >= fresh_until:
                held = _held_inodes(st.st_dev)  # can cost milliseconds: not too often
                fresh_until = time.monotonic() + LOCKS_EVERY
            locked = st.st_ino in held if held is not None else self.is_locked(qid)
            yield qid, env, "", st.st_size, locked


LOCKS_EVERY = 0.25  # seconds: a long listing reads /proc/locks again this often


def _held_inodes(dev: int) -> set[int] | None:
    """Inodes on device `dev` with an flock held (not waited for), from /proc/locks."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:"
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    held = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" second
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].startswith(want):
            ino = parts[5][len(want):]
            if ino.isdigit():
                held.add(int(ino))
    return held


def _read_small(path: str) -> bytes:
    """A whole small file with plain system calls (io.open costs more than the read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        first = os.read(fd, 65536)
        if len(first) < 65536:
            return first  # a short read of a regular file is its end
        chunks = [first]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class NewMessage:
    """A message being written; invisible until commit()."""

    def __init__(self, spool: Spool, qid: str, fd: int) -> None:
        self.spool = spool
        self.qid = qid
        self.fd = fd
        self.size = 0
        self.done = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.abort()
            raise _io_error("write the message to the queue", exc) from None
        self.size += len(data)

    def commit(self, env: Envelope) -> None:
        """The commit point. The data file stays locked (self.fd) until release()."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.abort()
            raise _io_error("sync the message to disk", exc) from None
        try:
            self.spool.write_envelope(env, first=True)
        except BaseException:
            self.abort()
            raise
        self.done = True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def detach(self) -> int:
        """Hand the locked descriptor to the caller (for adopt() or a child process)."""
        fd, self.fd = self.fd, -1
        return fd

    def abort(self) -> None:
        """Forget a message that was never committed."""
        if self.done:
            return
        self.done = True
        try:
            os.unlink(self.spool._path(self.qid, ".d"))
        except OSError:
            pass
        self.release()

    def __enter__(self) -> NewMessage:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.abort()


class Claim:
    """A message locked by this process for delivery."""

    def __init__(self, spool: Spool, env: Envelope, fd: int) -> None:
        self.spool = spool
        self.envelope = env
        self.fd = fd
        self._reserve = -1  # the in-flight file, written full (see mark_sending)
        self._reserved = 0
        self.finished = False  # removed from the queue: every recipient final, reports made

    @property
    def qid(self) -> str:
        return self.envelope.qid

    def open_data(self) -> BinaryIO:
        return open(self.spool.data_path(self.qid), "rb")

    def record(self) -> None:
        """Make the envelope's new state durable (atomic replace).

        After an attempt (a reserve is held, see mark_sending) the record is
        written into the reserved in-flight file, which needs no new space:
        a full queue file system cannot turn a relay's 250 into a resend. A
        failure is tried again once with a fresh temp file (never trusting
        a failed fsync's file) before it is raised.
        """
        fd, self._reserve = self._reserve, -1
        if fd >= 0:
            try:
                self._record_in_place(fd)
                return
            except OSError:
                pass  # the ordinary way below, with a fresh file
            finally:
                os.close(fd)
        try:
            self.spool.write_envelope(self.envelope)
        except RelayqError:
            self.spool.write_envelope(self.envelope)
        self._unmark()

    def _record_in_place(self, fd: int) -> None:
        data = self.envelope.dumps()
        if len(data) > self._reserved:
            raise OSError(errno.EFBIG, "record larger than its reserve")
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        os.rename(self.spool._path(self.qid, ".f"), self.spool._path(self.qid, ".e"))
        _fsync_dir(self.spool.queue)

    # The in-flight file (QID.f): made before the message goes to the
    # smarthost, its directory entry synced, and consumed by the record of the
    # outcome. A runner killed in between leaves it, and the next attempt logs
    # a possible duplicate: the smarthost may have accepted the message already.
    # It also reserves the space of that record (the file is written full
    # before the relay hears anything), so the record never needs new space.

    def mark_sending(self, recipients: int = 1) -> None:
        """Reserve the record of an attempt for `recipients`; TempFailure if the
        queue cannot hold it (nothing is sent then: its outcome could not be kept)."""
        self._drop_reserve()
        size = len(self.envelope.dumps()) + 4096 + recipients * (MAX_REPLY + 64)
        path = self.spool._path(self.qid, ".f")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _io_error(f"reserve the record of {self.qid}", exc) from None
        try:
            block = b"\n" * min(size, 1 << 16)
            done = 0
            while done < size:
                done += os.write(fd, block[: size - done])
            _fsync_dir(self.spool.queue)
        except OSError as exc:
            os.close(fd)
            self._unmark()
            raise _io_error(f"reserve the record of {self.qid}", exc) from None
        self._reserve, self._reserved = fd, size

    def _drop_reserve(self) -> None:
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    def was_cut_off(self) -> bool:
        """An earlier attempt died between sending and recording."""
        return os.path.exists(self.spool._path(self.qid, ".f"))

    def _unmark(self) -> None:
        self._drop_reserve()
        try:
            os.unlink(self.spool._path(self.qid, ".f"))
        except OSError:
            pass

    def finish(self) -> None:
        """Remove a message whose every recipient is final.

        The envelope goes first (and that removal is synced) so that a crash
        can never bring the message back for another delivery.
        """
        try:
            os.unlink(self.spool._path(self.qid, ".e"))
            _fsync_dir(self.spool.queue)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _io_error(f"remove delivered message {self.qid}", exc) from None
        self.finished = True
        self._unmark()
        try:
            os.unlink(self.spool._path(self.qid, ".d"))
        except OSError:
            pass  # debris; sweep() removes it later
        self.release()

    def release(self) -> None:
        self._drop_reserve()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
