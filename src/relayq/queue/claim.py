"""A message locked by one process for delivery, and what it records while it has it.

The lock is the flock on the data file (QID.d) taken by Spool.claim(); the
claim rewrites the envelope after each attempt, reserves the space of that
record before the message leaves (the in-flight file QID.f, see
mark_sending) and removes the message once every recipient is final.
"""

from __future__ import annotations

import errno
import os

from relayq.core.envelope import MAX_REPLY
from relayq.core.errors import RelayqError
from relayq.queue.durable import fsync_dir, io_error

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from typing import BinaryIO

    from relayq.core.envelope import Envelope
    from relayq.queue.spool import Spool


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
        os.rename(self.spool.path(self.qid, ".f"), self.spool.path(self.qid, ".e"))
        fsync_dir(self.spool.queue)

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
        path = self.spool.path(self.qid, ".f")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error(f"reserve the record of {self.qid}", exc) from None
        try:
            block = b"\n" * min(size, 1 << 16)
            done = 0
            while done < size:
                done += os.write(fd, block[: size - done])
            fsync_dir(self.spool.queue)
        except OSError as exc:
            os.close(fd)
            self._unmark()
            raise io_error(f"reserve the record of {self.qid}", exc) from None
        self._reserve, self._reserved = fd, size

    def _drop_reserve(self) -> None:
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    def was_cut_off(self) -> bool:
        """An earlier attempt died between sending and recording."""
        return os.path.exists(self.spool.path(self.qid, ".f"))

    def _unmark(self) -> None:
        self._drop_reserve()
        try:
            os.unlink(self.spool.path(self.qid, ".f"))
        except OSError:
            pass

    def finish(self) -> None:
        """Remove a message whose every recipient is final.

        The envelope goes first (and that removal is synced) so that a crash
        can never bring the message back for another delivery.
        """
        try:
            os.unlink(self.spool.path(self.qid, ".e"))
            fsync_dir(self.spool.queue)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise io_error(f"remove delivered message {self.qid}", exc) from None
        self.finished = True
        self._unmark()
        try:
            os.unlink(self.spool.path(self.qid, ".d"))
        except OSError:
            pass  # debris; sweep() removes it later
        self.release()

    def release(self) -> None:
        self._drop_reserve()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
