"""The daemon's local socket: what users who may not touch the queue ask of it.

`<queue>/relayq.sock` (mode 0666, in the 0711 queue directory). A request is
one line; the answer is a status line `CODE TEXT` (a sysexits code, 0 for
success) and, for listings, the listing after it. The daemon learns who asks
from the kernel (SO_PEERCRED), never from the request. Requests:

    take NAME      copy maildrop/NAME, which the asker wrote, into the queue
    mailq ARGS     the asker's messages (everyone's for root and the admin
                   group), ARGS being mailq's flags as a JSON list
    flush          run the whole queue now (at most once per FLUSH_GAP)
"""

from __future__ import annotations

# the C module: socket.py pulls in enum and friends, ~4 ms a user's sendmail would pay
import _socket
import os

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterator

MAX_REQUEST = 1 << 16
READ_TIMEOUT = 10.0  # for the request line
MAX_CLIENTS = 32
MAX_PER_UID = 8  # so one user cannot take every slot
CONNECT_PATIENCE = 5.0  # seconds a client waits for room in a full backlog
SUN_PATH_MAX = 107


class Reply:
    """A status and, maybe, a body to stream after it."""

    def __init__(self, code: int, text: str, body: Iterator[bytes] | None = None) -> None:
        self.code = code
        self.text = text
        self.body = body


def _address(path: str) -> tuple[str, int | None]:
    """A bindable name for `path`: itself, or through /proc/self/fd when too long."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path, None
    dfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dfd}/{os.path.basename(path)}", dfd


# -- asking (any user) -----------------------------------------------------------------


class Connection:
    """One request to the daemon; None from open() when no daemon listens."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    def open(cls, path: str, request: str, timeout: float) -> Connection | None:
        import time

        name, dfd = _address(path)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + CONNECT_PATIENCE
        try:
            sock.settimeout(timeout)
            while True:
                try:
                    sock.connect(name)
                    break
                except BlockingIOError:  # the backlog is full (someone floods it): wait
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            sock.sendall(request.encode("utf-8", "surrogateescape") + b"\n")
        except OSError:
            sock.close()
            return None
        finally:
            if dfd is not None:
                os.close(dfd)
        return cls(sock)

    def status(self) -> tuple[int, str] | None:
        """The status line, or None if the daemon went away before answering."""
        try:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk or len(self.buf) > MAX_REQUEST:
                    return None
                self.buf += chunk
        except OSError:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        code, _, text = line.decode("utf-8", "replace").partition(" ")
        if not code.isdigit():
            return None
        return int(code), text

    def body(self) -> Iterator[bytes]:
        if self.buf:
            yield self.buf
            self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self.sock.close()


def ask(path: str, request: str, timeout: float = 300.0) -> tuple[int, str] | None:
    """One request, its status; None when no daemon answers."""
    conn = Connection.open(path, request, timeout)
    if conn is None:
        return None
    try:
        return conn.status()
    finally:
        conn.close()


# -- answering (the daemon) ------------------------------------------------------------


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    import socket
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    pid, uid, gid = struct.unpack("iII", raw)  # struct ucred: pid_t, uid_t, gid_t
    return pid, uid, gid


class Server:
    """Accepts on the socket in a thread; each request is handled in its own thread."""

    def __init__(self, path: str, handler: Callable[[int, int, str], Reply],
                 warn: Callable[[str], None]) -> None:
        import threading

        self.path = path
        self.handler = handler
        self.warn = warn
        self.lock = threading.Lock()
        self.busy: dict[int, int] = {}  # uid -> requests in progress
        self.threads: list[threading.Thread] = []  # accepting, then one per request
        self.sock = self._bind()

    def _bind(self) -> socket.socket:
        import socket
        import stat

        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # left by a daemon that died; ours holds the pid file
        except FileNotFoundError:
            pass
        name, dfd = _address(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o111)
            try:
                sock.bind(name)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o666)  # any local user may ask; who asks comes from the kernel
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        finally:
            if dfd is not None:
                os.close(dfd)
        return sock

    def start(self) -> None:
        import threading

        self.threads = [threading.Thread(target=self._accept, name="relayq-control",
                                         daemon=True)]
        self.threads[0].start()

    def close(self) -> None:
        import socket

        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of _accept
        except OSError:
            pass
        self.sock.close()

    def join(self, deadline: float) -> None:
        """After close(): wait for the accepting thread and the requests in progress
        until `deadline` (time.monotonic()); a client slow to read is left behind."""
        import time

        with self.lock:
            threads = list(self.threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                _, uid, gid = peer(conn)
            except OSError:
                conn.close()
                continue
            with self.lock:
                mine = self.busy.get(uid, 0)
                full = mine >= MAX_PER_UID or sum(self.busy.values()) >= MAX_CLIENTS
                if not full:
                    self.busy[uid] = mine + 1
            if full:
                conn.settimeout(1.0)
                self._answer(conn, Reply(75, "too many requests; try again"))
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn, uid, gid), daemon=True)
            with self.lock:
                self.threads = [x for x in self.threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket, uid: int, gid: int) -> None:
        try:
            conn.settimeout(READ_TIMEOUT)
            request = self._read_line(conn)
            if request is None:
                return
            try:
                reply = self.handler(uid, gid, request)
            except Exception as exc:  # a bug must not take the daemon down
                self.warn(f"control request from uid {uid} failed: {type(exc).__name__}: {exc}")
                reply = Reply(70, "internal error (see the mail log)")
            conn.settimeout(300.0)
            self._answer(conn, reply)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.busy[uid] -= 1
                if not self.busy[uid]:
                    del self.busy[uid]

    @staticmethod
    def _read_line(conn: socket.socket) -> str | None:
        """The request line, within READ_TIMEOUT in all (a byte now and then is not enough)."""
        import time

        deadline = time.monotonic() + READ_TIMEOUT
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if len(buf) > MAX_REQUEST or left <= 0:
                return None
            conn.settimeout(left)
            chunk = conn.recv(4096)
            if not chunk:
                return None
            buf += chunk
        return buf.partition(b"\n")[0].decode("utf-8", "surrogateescape")

    @staticmethod
    def _answer(conn: socket.socket, reply: Reply) -> None:
        text = " ".join(reply.text.split())  # one line whatever the message held
        try:
            conn.sendall(f"{reply.code} {text}\n".encode("utf-8", "replace"))
            if reply.body is not None:
                for chunk in reply.body:
                    conn.sendall(chunk)
        except OSError:
            pass
