"""maildrop/: how users who may not write the queue hand mail over (the writer's side).

A caller that is neither root nor the queue's owner (`Spool.writable()`)
writes its request to `maildrop/tHEX` (mode 0640): the sendmail arguments
that matter, then the message as read. It asks the daemon over its socket
(relayq.system.control) to take that file; the daemon checks that the asker owns
it (SO_PEERCRED), copies it into the queue through enqueue() and removes it.
When no daemon answers, the caller renames the file to `dHEX` and syncs the
file system: the message is then durable and waits there until the daemon
starts or root runs the queue, which take every `d` file.

The file format (MAGIC, the request fields, their limits, encode/decode and
read_head) is defined here, once, for both sides; the taker, which trusts
nothing in the file, is relayq.delivery.intake.
"""

from __future__ import annotations

import fcntl
import os

from relayq.core.errors import DataError, QueueError, RelayqError
from relayq.queue.durable import io_error

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterable

    from relayq.core.config import Config
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Request

MAGIC = b"relayq-drop 1\n"
MAX_HEAD = 1 << 20  # the request part: fields and recipients
MAX_VALUE = 4096  # sendmail refuses longer arguments too
MAX_RCPTS = 10000
DEFAULT_LIMIT = 100 << 20  # message size when max_message_size is 0 (no limit for root)
KEEP_PATIENCE = 60.0  # seconds the writer waits for a taker holding its file
SINGLE = frozenset({"sender", "name", "notify", "ret", "envid", "body", "hops", "mode"})
FLAGS = frozenset({"extract", "idots", "bs"})
HEX = frozenset("0123456789abcdef")
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


def waiting(directory: str) -> int | None:
    """How many dHEX files wait in maildrop/ (mail accepted, not yet queued: a taker
    may have been unable to read them); 0 without the directory, None when this user
    may not list it (anyone but its owner: mode 3733)."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if e.name[0] == "d" and valid_name(e.name))
    except FileNotFoundError:
        return 0
    except OSError:
        return None


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


def read_head(fd: int) -> tuple[bytes, bytes]:
    """(the request part without MAGIC, the message bytes read past it), from a drop
    file's descriptor; Malformed for what our writer never writes."""
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
            raise io_error("keep the message in the drop directory", exc) from None
        try:
            os.fsync(self.fd)
            _syncfs(self.fd)  # the rename too: we may not open maildrop/ to fsync it
        except OSError as exc:
            raise io_error("sync the drop directory", exc) from None
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
        raise io_error("create a file in the drop directory", exc) from None
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
            raise io_error("write to the drop directory", exc) from None
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
