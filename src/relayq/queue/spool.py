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
by an ordinary user is that user's private queue and has no maildrop/. Root
never makes a queue of its own that belongs to a service user (daemon_user,
or the relayq system user for /var/spool/relayq): enter(cfg) makes it theirs
(maildrop/ 3733, set-gid to their group) and root works in it as them.

Commit point: the data file is written and fsynced, the envelope is written to
QID.t, fsynced and renamed to QID.e, and the directory is fsynced. A crash
before that leaves no QID.e, so nothing is visible; the stray files are
removed by a later scan. A failed write, fsync or close fails the commit.

Queue IDs (relayq.queue.names) sort by submission time and are unique on the
host: the data file is created with O_EXCL, and a collision picks the next
microsecond. Durability primitives: relayq.queue.durable; a message locked for
delivery: relayq.queue.claim; the mailq view: relayq.queue.peek (read) and
relayq.queue.listing (rendered).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from relayq.core.envelope import Envelope
from relayq.core.errors import DamagedQueueFile, TempFailure
from relayq.queue.durable import fsync_dir, io_error, unlink_if_there
from relayq.queue.names import SLOTS, make_qid
from relayq.system.locks import flock_within

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.core.config import Config
    from relayq.queue.claim import Claim

STALE_SECONDS = 3600  # stray .d/.t files older than this, and unlocked, are debris
KINDS = (".d", ".e", ".t", ".f")  # data, envelope, envelope being written, in flight

class Spool:
    """A queue directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.queue = os.path.join(root, "queue")
        self.quarantine_dir = os.path.join(root, "quarantine")
        self.maildrop = os.path.join(root, "maildrop")
        self.socket_path = os.path.join(root, "relayq.sock")
        self._next_slot = 0.0  # a queue id's time slot after the last one this process made

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
                fsync_dir(os.path.dirname(path))  # the new directory itself must survive
            except OSError as exc:
                raise io_error(f"create queue directory {path}", exc) from None
        if public is None:
            public = os.geteuid() == 0
        if public and not os.path.lexists(self.maildrop):
            self._publish()
        if owner is not None:
            self._give(owner)

    def _give(self, owner: tuple[int, int]) -> None:
        """Hand the directories to the service user, through descriptors opened without
        following links inside the queue: once it owns the queue, any entry in it may be
        its trap. The top directory is the administrator's path (followed, as enter())."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            top = os.open(self.root, flags & ~os.O_NOFOLLOW)
            try:
                if not stat.S_ISDIR(os.fstat(top).st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
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
            raise io_error(f"give the queue to uid {owner[0]}", exc) from None

    def enter(self, cfg: Config | None = None) -> None:
        """Root in a queue that belongs to another user (daemon_user) becomes that user
        for the rest of the process: that user can plant links and files in the queue,
        and root must never follow or write them (SECURITY.md).

        The top directory is the administrator's path (followed); queue/ inside it
        is looked at without following a link. Anything unexpected is refused.
        With `cfg`, a missing queue is made first for its owner (privilege.queue_owner).
        """
        if os.geteuid() != 0:
            return
        if cfg is not None and not os.path.isdir(self.queue):
            from relayq.system.privilege import queue_owner

            owner = queue_owner(self.root, cfg.daemon_user)
            if owner is not None:
                self.ensure(owner, public=True)
        for path, follow in ((self.root, True), (self.queue, False)):
            try:
                st = os.stat(path, follow_symlinks=follow)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise io_error(f"look at the queue directory {path}", exc) from None
            if st.st_uid != 0:
                from relayq.system.privilege import become_owner

                become_owner(st.st_uid, st.st_gid)
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
            fsync_dir(self.root)
        except FileExistsError:
            pass
        except OSError as exc:
            raise io_error(f"create the drop directory {self.maildrop}", exc) from None

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

    def path(self, qid: str, ext: str) -> str:
        return os.path.join(self.queue, qid + ext)

    # -- writing a new message ------------------------------------------------

    def create(self, qid: str | None = None) -> NewMessage:
        """Allocate a queue id (or take `qid`) and open its data file, locked, for writing.

        A given `qid` is a report's id recorded in the message it is about
        (Envelope.notice): a data file of that name without an envelope is
        what a crash left of the same report, and is written again.
        """
        now = max(time.time(), self._next_slot)
        pid = os.getpid()
        for _ in range(1000):
            name = qid or make_qid(now, pid)
            try:
                fd = os.open(
                    self.path(name, ".d"),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o600,
                )
            except FileExistsError:
                if qid is not None:
                    fd = self._reopen(qid)
                else:
                    now += 1 / SLOTS  # the next slot (several messages in one slot)
                    continue
            except FileNotFoundError:
                self.ensure()
                continue
            except OSError as exc:
                raise io_error("create a queue file", exc) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            if qid is None:  # the next id of this process starts in the next slot
                self._next_slot = now + 1 / SLOTS
            return NewMessage(self, name, fd)
        raise TempFailure("cannot allocate a queue id")

    def _reopen(self, qid: str) -> int:
        """The debris of a report whose making was cut off, truncated for writing again."""
        if os.path.exists(self.path(qid, ".e")):
            raise TempFailure(f"{qid}: queue id already committed")
        try:
            fd = os.open(self.path(qid, ".d"), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise io_error("create a queue file", exc) from None
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
            raise io_error("create a queue file", exc) from None
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
        tmp = self.path(env.qid, ".t")
        final = self.path(env.qid, ".e")
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
            fsync_dir(self.queue)
        except OSError as exc:
            for path in (tmp, final) if first else (tmp,):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise io_error(f"write envelope {env.qid}", exc) from None

    # -- reading --------------------------------------------------------------

    def names(self) -> list[str]:
        """The queue directory's entries (one listing, shared by sweep() and ids())."""
        try:
            return os.listdir(self.queue)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise io_error("read the queue directory", exc) from None

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
            raise io_error("read the queue directory", exc) from None

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
            with open(self.path(qid, ".e"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise io_error(f"read envelope {qid}", exc, self.path(qid, ".e")) from None
        env = Envelope.loads(raw, qid)
        if not os.path.exists(self.path(qid, ".d")):
            raise DamagedQueueFile(f"{qid}: envelope without data file")
        return env

    def data_path(self, qid: str) -> str:
        return self.path(qid, ".d")

    def is_locked(self, qid: str) -> bool:
        """True while a runner (or the submitting process) holds the message."""
        try:
            fd = os.open(self.path(qid, ".d"), os.O_RDONLY | os.O_CLOEXEC)
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
            fd = os.open(self.path(qid, ".d"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if os.path.exists(self.path(qid, ".e")):
                raise DamagedQueueFile(f"{qid}: envelope without data file") from None
            return None
        except OSError as exc:  # not damage: root's file in a queue now another user's?
            raise io_error("read the data file", exc, self.path(qid, ".d")) from None
        if not flock_within(fd, wait, 0.0005):
            os.close(fd)
            return None
        try:
            env = self.read_envelope(qid)
        except FileNotFoundError:
            os.close(fd)  # delivered and removed by the previous holder
            return None
        except BaseException:
            os.close(fd)
            raise
        from relayq.queue.claim import Claim  # not on the submission path

        return Claim(self, env, fd)

    def adopt(self, qid: str, fd: int) -> Claim:
        """Turn a lock already held (the submitter's, across fork) into a claim."""
        from relayq.queue.claim import Claim

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
            src = self.path(qid, ext)
            dst = os.path.join(self.quarantine_dir, f"{qid}{ext}.{suffix}")
            tmp = dst + ".t"
            try:
                unlink_if_there(tmp)
                os.link(src, tmp)
                os.rename(tmp, dst)
                moved.append(src)
            except FileNotFoundError:
                pass
        fsync_dir(self.quarantine_dir)
        for src in reversed(moved):  # the envelope first, as finish() does
            unlink_if_there(src)
        fsync_dir(self.queue)

    def dead_letters(self) -> Iterator[tuple[str, Envelope, int]]:
        """(qid, envelope, data size) of each dead letter kept in quarantine/ (see bury)."""
        from relayq.queue.peek import dead_letters

        return dead_letters(self)

    def remove_dead(self, qid: str) -> bool:
        """The operator's command for a dead letter (`relayq delete QID`): True if it was one."""
        if not any(q == qid for q, _, _ in self.dead_letters()):
            return False
        for name in os.listdir(self.quarantine_dir):
            if name.startswith((f"{qid}.e.", f"{qid}.d.")):
                os.unlink(os.path.join(self.quarantine_dir, name))
        fsync_dir(self.quarantine_dir)
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
            fd = os.open(self.path(qid, ".d"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.path.exists(self.path(qid, ".e")):
            os.close(fd)
            return None
        return fd

    def listing(
        self, ids: list[str] | None = None
    ) -> Iterator[tuple[str, Envelope | None, str, int, bool]]:
        """Each message with its state, for mailq (see relayq.queue.peek)."""
        from relayq.queue.peek import listing

        return listing(self, ids)


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
            raise io_error("write the message to the queue", exc) from None
        self.size += len(data)

    def commit(self, env: Envelope) -> None:
        """The commit point. The data file stays locked (self.fd) until release()."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.abort()
            raise io_error("sync the message to disk", exc) from None
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
            os.unlink(self.spool.path(self.qid, ".d"))
        except OSError:
            pass
        self.release()

    def __enter__(self) -> NewMessage:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.abort()
