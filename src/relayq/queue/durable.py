"""What makes a change to a queue file durable, and what a failed one means.

The spool and the claim both make a change durable the same way (the file
fsynced, then its directory), and report a failed system call in the words
and exit codes sendmail callers expect: these are their shared primitives.
"""

from __future__ import annotations

import errno
import os
import sys

from relayq.core.errors import QueueError, RelayqError, TempFailure


def unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    if "threading" not in sys.modules:  # one thread (sendmail): no one to share with,
        fsync_path(path)  # and importing threading would cost 4 ms
        return
    group_sync(path).sync()


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
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
            fsync_path(self.path)
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


_SYNCS: dict[str, GroupSync] = {}


def group_sync(path: str) -> GroupSync:
    sync = _SYNCS.get(path)
    if sync is None:
        sync = _SYNCS.setdefault(path, GroupSync(path))
    return sync


def io_error(action: str, exc: OSError, path: str = "") -> RelayqError:
    """The one errno -> failure mapping for queue files (queue/ and maildrop/); `path`:
    the file that could not be read, whose owner may be named with the fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TempFailure(f"cannot {action}: no space left on the queue file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return QueueError(f"cannot {action}: {unreadable(path, exc)}", code=77)
    if exc.errno == errno.EROFS:
        return QueueError(f"cannot {action}: {exc.strerror}", code=73)
    return QueueError(f"cannot {action}: {exc.strerror or exc}")


def read_small(path: str) -> bytes:
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



def unreadable(path: str, exc: OSError) -> str:
    """Why queue file `path` cannot be read: its strerror and, for a file that is not
    the queue's owner's (root's, written before the queue became the service user's),
    whose it is and the chown that gives it back."""
    text = exc.strerror or str(exc)
    if not path or exc.errno not in (errno.EACCES, errno.EPERM):
        return text
    try:
        st = os.stat(path, follow_symlinks=False)
        queue = os.stat(os.path.dirname(path))
    except OSError:
        return text
    if st.st_uid == queue.st_uid:
        return text
    import grp
    import pwd

    try:
        owner = pwd.getpwuid(queue.st_uid).pw_name
    except KeyError:
        owner = str(queue.st_uid)
    try:
        group = grp.getgrgid(queue.st_gid).gr_name
    except KeyError:
        group = str(queue.st_gid)
    base = path[:-2] if path[-2:] in (".d", ".e") else path
    return (f"{text}: it belongs to uid {st.st_uid}, not to {owner}, the queue's owner: "
            f"chown {owner}:{group} {base}.*")
