"""The daemon's process life: detaching, the pid file, systemd, signals, privileges.

Started the sendmail way (`sendmail -q29m`, `sendmail -bd -q29m`, `relayq
daemon` from a terminal) it detaches: double fork, setsid, stdio to
/dev/null; the parent waits until the child has its pid file and sockets and
exits 0, or prints the child's one-line error with its exit code. Under
systemd (`--foreground`, or INVOCATION_ID / NOTIFY_SOCKET set) it stays in
the foreground and speaks sd_notify (READY, RELOADING, STOPPING), and takes
the listening sockets systemd passes (socket activation).

The pid file is written atomically (temp file, fsync, link into place) and
the daemon holds an flock on it for its whole life: a locked pid file means
a live daemon (start refused, exit 75); an unlocked one is stale and
replaced. A daemon may hold one of several files (pid_candidates: the
runtime directory's, root's /run/relayq.pid, the queue's): a start is refused
while any of them is held, and status and flush look at all. Root opens them
without following links or blocking, and writes its own only in a directory
of root's.

Signals only raise flags (Wake) for the main loop: SIGTERM/SIGINT stop,
SIGHUP reloads the configuration, SIGUSR1 runs the whole queue now.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING

from relayq.core.errors import (
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    ConfigError,
    RelayqError,
    TempFailure,
    UsageError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.system.log import Log

ROOT_PID_FILE = "/run/relayq.pid"
RUN_DIR = "/run/relayq"  # RuntimeDirectory=relayq in contrib/systemd/*.service
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_interval(text: str) -> float:
    """A sendmail queue interval: `30s`, `29m`, `1h30m`, `2d`; a bare number is minutes."""
    total, num = 0, ""
    for ch in text.strip():
        if ch.isdigit():
            num += ch
        elif ch.lower() in _UNITS and num:
            total += int(num) * _UNITS[ch.lower()]
            num = ""
        else:
            raise UsageError(f"Invalid queue interval {text!r} (use e.g. 30s, 29m, 1h30m)")
    if num:
        total += int(num) * 60  # sendmail's convtime(): minutes by default for -q
    if total <= 0:
        raise UsageError(f"Invalid queue interval {text!r}: must be at least 1s")
    return float(total)


def sd_notify(state: str) -> bool:
    """Tell systemd about our state (READY=1, RELOADING=1, STOPPING=1); False if not asked."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def monotonic_usec() -> int:
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


def under_systemd() -> bool:
    """systemd sets INVOCATION_ID for every service and NOTIFY_SOCKET for Type=notify."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))


def pid_path(cfg: Config, run_dir: str = RUN_DIR) -> str:
    """The pid file this daemon writes: the configured one; else, while the units'
    RuntimeDirectory exists and is ours, the one in it; else /run/relayq.pid for
    root (never a file in a directory another user owns), else one in the queue dir.
    Whoever looks for a daemon looks at every pid_candidates() file."""
    if cfg.pid_file:
        return cfg.pid_file
    euid = os.geteuid()
    try:
        st = os.stat(run_dir, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == euid:
        return os.path.join(run_dir, "relayq.pid")
    if euid == 0:
        return ROOT_PID_FILE
    return os.path.join(cfg.queue_dir, "relayq.pid")


def pid_candidates(cfg: Config, run_dir: str = RUN_DIR,
                   root_pid: str = ROOT_PID_FILE) -> list[str]:
    """Every pid file a daemon of this queue may hold, the one rule of the daemon's
    start (one daemon per queue: refused while another holds any), `relayq status`
    and `relayq flush`: the configured file alone; for the system queue, whoever
    runs its daemon (root by hand, the service as relayq), the runtime directory's,
    root's and the queue's; for another queue, ours (pid_path) and the queue's."""
    if cfg.pid_file:
        return [cfg.pid_file]
    from relayq.core.config import SYSTEM_QUEUE

    own = os.path.join(cfg.queue_dir, "relayq.pid")
    if os.path.realpath(cfg.queue_dir) == SYSTEM_QUEUE:
        return [os.path.join(run_dir, "relayq.pid"), root_pid, own]
    mine = pid_path(cfg, run_dir)
    return [mine] if mine == own else [mine, own]


def find_daemon(candidates: list[str]) -> tuple[int, str] | None:
    """(pid, pid file) of a live daemon holding one of `candidates` (-1: pid unreadable)."""
    for path in candidates:
        pid = PidFile.running(path)
        if pid is not None:
            return pid, path
    return None


def _vouched(pid: int, owner: int) -> bool:
    """May the pid in a file of `owner`'s be believed (and signalled, by flush)? Root's
    file, or ours; else only a process of that owner's: the service user must not make
    root's `relayq flush` send SIGUSR1 (default: terminate) to any process it names."""
    if owner in (0, os.geteuid()):
        return True
    try:
        return os.stat(f"/proc/{pid}").st_uid == owner
    except OSError:
        return False


class PidFile:
    """A pid file that is also a lock: held (flock) by the live daemon for its whole life."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    @staticmethod
    def running(path: str) -> int | None:
        """The pid of the live daemon holding `path`, or None (absent, stale, or not a
        regular file: the directory may be another user's, who can plant a FIFO or a
        link there, so nothing is followed and nothing blocks)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() and _vouched(int(text), st.st_uid) else -1
            return None
        finally:
            os.close(fd)

    def _refuse(self, pid: int, path: str = "") -> TempFailure:
        who = f"pid {pid}" if pid > 0 else "pid unknown"
        return TempFailure(f"a relayq daemon is already running ({who}, pid file "
                           f"{path or self.path})")

    def acquire(self, others: list[str] | None = None) -> None:
        """Write our pid atomically and lock it; TempFailure (75) if a daemon holds it,
        or any of `others` (pid_candidates: the same queue's other pid files), looked
        at before and after ours is taken (two starting at once: neither runs)."""
        self._check([self.path, *(others or [])])
        folder = os.path.dirname(self.path) or "."
        tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            self._own_folder(folder)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # ours by name (our pid), left by a process long gone
            # never through a link: the folder may belong to the service user
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RelayqError(f"cannot write pid file {self.path}: {exc.strerror}",
                              EX_OSERR) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic, and never over a live daemon's file
                    break
                except FileExistsError:
                    other = self.running(self.path)
                    if other is not None:
                        raise self._refuse(other) from None
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # stale: nobody holds it
            else:
                raise TempFailure(f"cannot take pid file {self.path}: it keeps changing")
        except BaseException as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise RelayqError(f"cannot write pid file {self.path}: {exc.strerror}",
                                  EX_OSERR) from None
            raise
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        self.fd = fd
        try:
            self._check([p for p in others or [] if p != self.path])
        except BaseException:
            self.release()
            raise

    def _check(self, paths: list[str]) -> None:
        found = find_daemon(paths)
        if found is not None:
            raise self._refuse(*found)

    @staticmethod
    def _own_folder(folder: str) -> None:
        """Root writes its pid file only in a directory of root's: in another user's,
        a link or a FIFO of theirs could make it write elsewhere or hang."""
        if os.geteuid() != 0:
            return
        st = os.stat(folder, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise ConfigError(f"pid file in {folder}, which is not root's directory: root "
                              "writes its pid file only in its own (leave pid_file unset "
                              f"for {ROOT_PID_FILE})")

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass  # after dropping privileges /run may not be ours: the lock says stale
        os.close(self.fd)
        self.fd = -1


def poke(cfg: Config, candidates: list[str] | None = None) -> int | None:
    """SIGUSR1 to the running daemon (for `relayq flush`); its pid, or None if none runs.
    `candidates`: pid_candidates() as decided before root entered the queue."""
    found = find_daemon(pid_candidates(cfg) if candidates is None else candidates)
    if found is None or found[0] <= 0:
        return None
    pid = found[0]
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return None
    return pid


def service_owner(cfg: Config) -> tuple[int, int] | None:
    """(uid, gid) of daemon_user when root will become it: the queue is made its."""
    if not cfg.daemon_user or os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(cfg.daemon_user)
    except KeyError:
        raise ConfigError(f"daemon_user: no such user {cfg.daemon_user!r}") from None
    return pw.pw_uid, pw.pw_gid


def serves_users(cfg: Config) -> bool:
    """Is this the host's daemon, whose queue takes every user's mail (maildrop/)?
    Root's, daemon_user's, or one reading the system configuration; a user's
    private daemon is not."""
    from relayq.core.config import SYSTEM_CONFIG

    if os.geteuid() == 0 or cfg.path == SYSTEM_CONFIG:
        return True
    import pwd

    try:
        return bool(cfg.daemon_user) and pwd.getpwuid(os.geteuid()).pw_name == cfg.daemon_user
    except KeyError:
        return False


def become(user: str, log: Log) -> None:
    """As root with `daemon_user` set: become that user for good (relayq.system.privilege)
    after binding port 25; the daemon and each delivery agent call it."""
    if not user or os.geteuid() != 0:
        return
    import pwd

    from relayq.system import privilege

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"daemon_user: no such user {user!r}") from None
    try:
        privilege.drop_to(pw.pw_uid, pw.pw_gid, name=pw.pw_name)
    except OSError as exc:
        raise RelayqError(f"cannot become {user}: {exc.strerror}", EX_OSERR) from None
    os.environ["HOME"] = pw.pw_dir
    log.info(f"running as {user} (uid {pw.pw_uid})")


def systemd_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_FDS from fd 3)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    out = []
    for fd in range(3, 3 + count):
        os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out


class Wake:
    """What the main loop is woken for: flags raised by signals and other threads."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.flags: set[str] = set()

    def raise_flag(self, flag: str) -> None:
        """"term", "hup" or "usr1" (a whole queue run); "" only wakes the loop."""
        if flag:
            self.flags.add(flag)
        self.event.set()

    def wait(self, timeout: float) -> set[str]:
        """Sleep up to `timeout` or until woken; the flags raised meanwhile."""
        self.event.wait(timeout)
        self.event.clear()
        flags, self.flags = self.flags, set()
        return flags

    def _signal(self, signum: int, frame: object) -> None:
        names: dict[int, str] = {signal.SIGHUP: "hup", signal.SIGUSR1: "usr1"}
        self.raise_flag(names.get(signum, "term"))

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def detach(start: Callable[[], tuple[Callable[[], int], Callable[[], None]]], log: Log) -> int:
    """Double fork; the parent reports the child's start result (0, or the error and code).

    `start` runs in the child: everything that can fail before the daemon is
    ready; it answers (serve, release): the main loop and what to undo after.
    """
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        return _started(r, pid)
    os.close(r)
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        if null > 2:
            os.close(null)
        serve, release = start()
    except RelayqError as exc:
        _report(w, exc.code, exc.message)
        os._exit(exc.code)
    except BaseException as exc:
        _report(w, EX_SOFTWARE, f"cannot start: {type(exc).__name__}: {exc}")
        os._exit(EX_SOFTWARE)
    _report(w, EX_OK, "started")
    code = EX_SOFTWARE
    try:
        code = serve()
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            log.error(f"daemon failed: {type(exc).__name__}: {exc}")
    finally:
        release()
    os._exit(code)


def _started(r: int, pid: int) -> int:
    """The parent's side: the child's one-line answer, as our exit or error."""
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    status, _, message = text.partition(" ")
    if not status.isdigit():
        raise RelayqError("the daemon died while starting (see the mail log)", EX_SOFTWARE)
    if int(status) != EX_OK:
        raise RelayqError(message, int(status))
    return EX_OK


def _report(fd: int, code: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{code} {message}\n".encode())
        os.close(fd)
