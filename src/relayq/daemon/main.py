"""The long-running relayq: periodic queue runs, wake-ups for new mail, signals.

One process with three kinds of thread, and its helper processes:

- the main thread schedules: a queue run every `interval` (from `-q29m` or
  `queue_interval`), a wake-up when a new message appears in the queue
  (inotify on the queue directory, with an mtime poll every 0.25 s and a
  full listing every 5 s as a backstop; the submitting `sendmail` never
  talks to the daemon, so it can never block on it), and the signals:
  SIGTERM/SIGINT stop, SIGHUP reloads the configuration, SIGUSR1 runs the
  whole queue now (force);
- `concurrency` worker threads take queue ids from one shared queue (a qid is
  never handed to two workers at once; the message's flock guards against
  other processes anyway). Each drives its own delivery agent process
  (relayq.daemon.agent), which keeps its smarthost connection across messages and
  closes it after a few idle seconds: delivery is mostly Python, and in
  threads it would share one GIL with the listener;
- optionally the SMTP listener (relayq.server.listener), an asyncio loop in its own
  thread, which hands every committed message straight to the workers, plus
  one forked listener process per further CPU (relayq.server.prefork) on the same
  sockets, whose messages the inotify wake-up finds.

Periodic and wake-up runs never retry a message early (force=False); only
SIGUSR1 and `relayq flush` do. A message that is due but locked by another
process (the submitter between commit and unlock, a background child, a cron
`sendmail -q`) is looked at again shortly after, backing off to 30 s.

Stopping: SIGTERM lets every worker finish the message in flight and exits.
A delivery still stuck after STOP_GRACE seconds is abandoned: its agent is
killed, the kernel drops its lock, and the message stays queued with its last
recorded state (records are replaced by rename, so no record is ever half
written). The only risk is the usual duplicate window: a relay that had
already answered 250 to the final dot when we gave up.

Started the sendmail way (`sendmail -q29m`, `sendmail -bd -q29m`, `relayq
daemon` from a terminal) it detaches: double fork, setsid, stdio to
/dev/null; the parent waits until the child has its pid file and sockets and
exits 0, or prints the child's one-line error with its exit code. Under
systemd (`--foreground`, or INVOCATION_ID / NOTIFY_SOCKET set) it stays in
the foreground and speaks sd_notify (READY, RELOADING, STOPPING).

The pid file is written atomically (temp file, fsync, link into place) and
the daemon holds an flock on it for its whole life: a locked pid file means
a live daemon (start refused, exit 75); an unlocked one is stale and
replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

from relayq.core import policy
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
    from collections.abc import Callable, Iterator

    from relayq.core.config import Config, Source
    from relayq.daemon.agent import Agent
    from relayq.delivery.runner import Runner
    from relayq.queue.submit import Context
    from relayq.server.listener import Listener
    from relayq.server.prefork import Listeners
    from relayq.system import control
    from relayq.system.log import Log

POLL = 0.25  # how often the queue directory is looked at
RESCAN = 5.0  # a full listing at least this often (mtime granularity backstop)
FLUSH_GAP = 5.0  # users' flush requests start at most one forced run this often
IDLE_CLOSE = 5.0  # a worker closes its smarthost connection after this idle time
STOP_GRACE = 5.0  # how long SIGTERM waits for deliveries in flight
AGENT_FAILURES = 3  # agents dying in a row before a worker delivers in-process
RECHECK_MIN, RECHECK_MAX = 0.005, 30.0  # the submitter lets go within milliseconds
ROOT_PID_FILE = "/run/relayq.pid"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --- small pieces ----------------------------------------------------------------


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


def _monotonic_usec() -> int:
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


def under_systemd() -> bool:
    """systemd sets INVOCATION_ID for every service and NOTIFY_SOCKET for Type=notify."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))


def pid_path(cfg: Config) -> str:
    """The configured pid file, else /run/relayq.pid for root, else one in the queue dir."""
    if cfg.pid_file:
        return cfg.pid_file
    if os.geteuid() == 0:
        return ROOT_PID_FILE
    return os.path.join(cfg.queue_dir, "relayq.pid")


class PidFile:
    """A pid file that is also a lock: held (flock) by the live daemon for its whole life."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    @staticmethod
    def running(path: str) -> int | None:
        """The pid of the live daemon holding `path`, or None (absent or stale)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 64).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            return None
        finally:
            os.close(fd)

    def _refuse(self, pid: int) -> TempFailure:
        who = f"pid {pid}" if pid > 0 else "pid unknown"
        return TempFailure(f"a relayq daemon is already running ({who}, pid file {self.path})")

    def acquire(self) -> None:
        """Write our pid atomically and lock it; TempFailure (75) if a daemon holds it."""
        pid = self.running(self.path)
        if pid is not None:
            raise self._refuse(pid)
        folder = os.path.dirname(self.path) or "."
        tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
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

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass  # after dropping privileges /run may not be ours: the lock says stale
        os.close(self.fd)
        self.fd = -1


def poke(cfg: Config) -> int | None:
    """SIGUSR1 to the running daemon (for `relayq flush`); its pid, or None if none runs."""
    pid = PidFile.running(pid_path(cfg))
    if pid is None or pid <= 0:
        return None
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return None
    return pid


def _service_owner(cfg: Config) -> tuple[int, int] | None:
    """(uid, gid) of daemon_user when root will become it: the queue is made its."""
    if not cfg.daemon_user or os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(cfg.daemon_user)
    except KeyError:
        raise ConfigError(f"daemon_user: no such user {cfg.daemon_user!r}") from None
    return pw.pw_uid, pw.pw_gid


def _serves_users(cfg: Config) -> bool:
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


def drop_privileges(user: str, log: Log) -> None:
    """As root with `daemon_user` set: become that user after binding port 25."""
    if not user or os.geteuid() != 0:
        return
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"daemon_user: no such user {user!r}") from None
    try:
        os.initgroups(pw.pw_name, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except OSError as exc:
        raise RelayqError(f"cannot become {user}: {exc.strerror}", EX_OSERR) from None
    if os.getuid() != pw.pw_uid or os.geteuid() != pw.pw_uid:
        raise RelayqError(f"cannot become {user}", EX_OSERR)
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


# --- the daemon ------------------------------------------------------------------


class Options:
    """How the daemon was asked to run (from `sendmail -q.. -bd` or `relayq daemon`)."""

    def __init__(self, *, interval: float | None = None, listen: bool = False,
                 foreground: bool = False, tag: str = "relayq",
                 loader: Callable[[], Config] | None = None) -> None:
        self.interval = interval  # None: the config's queue_interval
        self.listen = listen
        self.foreground = foreground
        self.tag = tag
        self.loader = loader  # re-reads the same file on SIGHUP


class Daemon:
    def __init__(self, cfg: Config, log: Log, opts: Options) -> None:
        from relayq.queue.spool import Spool
        from relayq.queue.submit import Context

        self.cfg = cfg
        self.log = log
        self.opts = opts
        self.ctx: Context = Context(cfg)
        self.spool = Spool(cfg.queue_dir)
        self.generation = 0  # bumped by a reload: workers rebuild their Runner
        self.listener: Listener | None = None
        self.listeners: Listeners | None = None  # more listener processes
        self.private_fds: list[int] = []  # not for forked listeners (the pid file lock)
        self._work: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: dict[str, bool] = {}  # queued for a worker -> force
        self._active: set[str] = set()  # being delivered now
        self._force_again: set[str] = set()  # forced while being delivered: once more
        self._recheck: dict[str, tuple[float, float]] = {}  # qid -> (when, delay)
        self._known: set[str] = set()
        self._dir_mtime = -1
        self._last_scan = 0.0
        self._event = threading.Event()
        self._flags: set[str] = set()
        self._stopping = False
        self._workers: list[threading.Thread] = []
        self._agents: list[Agent | None] = []
        self._closing: list[Agent] = []  # agents told to finish, reaped by stop()
        self.runs = 0
        self.control: control.Server | None = None
        self._drop_mtime = -1
        self._drop_wanted: threading.Event | None = None
        self._drop_run: bool | None = None  # a queue run asked (its force flag)
        self._last_flush = 0.0
        self._listing: set[int] = set()  # uids whose queue listing is being made
        self._last_drop_look = 0.0

    @property
    def interval(self) -> float:
        return self.opts.interval or self.cfg.queue_interval or 1800.0

    @property
    def wakeups(self) -> bool:
        """New mail goes out at once, except in laptop (deferred) mode."""
        return self.cfg.delivery_mode != "d"

    # -- signals (main thread) -----------------------------------------------------

    def _signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._flags.add("hup")
        elif signum == signal.SIGUSR1:
            self._flags.add("usr1")
        else:
            self._flags.add("term")
        self._event.set()

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    # -- handing out work (any thread) ---------------------------------------------

    def dispatch(self, qid: str, force: bool) -> None:
        """Queue one message for a worker unless one already has it."""
        with self._lock:
            if self._stopping:
                return
            if qid in self._active:  # a forced run must not be lost to a normal one in flight
                if force:
                    self._force_again.add(qid)
                return
            if qid in self._pending:
                self._pending[qid] = self._pending[qid] or force
                return
            self._pending[qid] = force
        self._work.put(qid)

    def committed(self, qid: str) -> None:
        """Called by the listener after a commit: deliver it now (unless deferred mode)."""
        if self.wakeups:
            self.dispatch(qid, False)

    def queue_run(self, force: bool) -> None:
        """Hand every queued message to the workers (the ones not yet due are skipped)."""
        self.runs += 1
        self.take_drops(run=force)  # in its thread; what it takes joins this run
        counts: dict[str, int] = {}
        known: set[str] = set()
        try:
            for qid in self.spool.stream_ids(counts):  # the workers start on the first
                known.add(qid)
                self.dispatch(qid, force)
        except RelayqError as exc:
            self.log.error(f"queue run: {exc.message}")
        self._known = known
        self._last_scan = time.monotonic()
        if self.spool.debris_suspected(counts):
            try:
                self.spool.sweep()
            except (OSError, RelayqError) as exc:
                self.log.warning(f"queue sweep failed: {exc}")

    # -- users' mail (maildrop/) and requests (relayq.system.control) ---------------------------

    def take_drops(self, run: bool | None = None) -> None:
        """Have users' maildrop/ files copied into the queue when its mtime moved (or
        for a queue run: `run` is its force flag), in a thread of its own: a user
        planting many files delays neither the scheduler nor anybody else."""
        try:
            mtime = os.stat(self.spool.maildrop).st_mtime_ns
        except OSError:
            return
        now = time.monotonic()
        if run is None and mtime == self._drop_mtime and now - self._last_drop_look < RESCAN:
            return  # (a full look now and then: coarse timestamps can hide a change)
        self._drop_mtime = mtime
        self._last_drop_look = now
        with self._lock:
            if run is not None:
                self._drop_run = bool(self._drop_run) or run
            if self._drop_wanted is None:
                self._drop_wanted = threading.Event()
                threading.Thread(target=self._drop_loop, name="relayq-maildrop",
                                 daemon=True).start()
        self._drop_wanted.set()

    def _drop_loop(self) -> None:
        assert self._drop_wanted is not None
        while True:
            self._drop_wanted.wait()
            self._drop_wanted.clear()
            if self._stopping:
                return
            with self._lock:
                run, self._drop_run = self._drop_run, None
            self._take_all_drops(run)

    def _take_all_drops(self, run: bool | None) -> None:
        from relayq.queue.maildrop import Taker

        try:
            taken = Taker(self.cfg, self.spool, self.log, self.ctx).take_all()
        except OSError as exc:
            self.log.error(f"maildrop: {exc}")
            return
        for qid, mode in taken:
            if run is not None:  # taken for a queue run: sent by it, as it sends the rest
                self.dispatch(qid, run)
            elif mode not in ("q", "d"):
                self.committed(qid)

    def start_control(self) -> None:
        """The local socket, for a queue users hand mail to (one with maildrop/)."""
        from relayq.system import control

        if not os.path.isdir(self.spool.maildrop):
            return
        try:
            self.control = control.Server(self.spool.socket_path, self.answer, self.log.warning)
        except OSError as exc:
            self.log.warning(f"no local socket {self.spool.socket_path} ({exc.strerror}): "
                             "users' mail waits in maildrop/ for the next look")
            return
        self.control.start()

    def answer(self, uid: int, gid: int, request: str) -> control.Reply:
        """One request on the local socket (relayq.system.control), from uid/gid (kernel's word)."""
        from relayq.system.control import Reply

        verb, _, arg = request.partition(" ")
        try:
            if verb == "take":
                from relayq.queue.maildrop import Taker

                qid, mode = Taker(self.cfg, self.spool, self.log, self.ctx).take(arg, uid)
                if mode not in ("q", "d"):
                    self.committed(qid)
                return Reply(0, qid)
            if verb == "mailq":
                from relayq.cli.mailq import listing_for

                with self._lock:  # each listing reads the whole queue: one per user,
                    busy = uid in self._listing or len(self._listing) >= 2  # two in all
                    if not busy:
                        self._listing.add(uid)
                if busy:
                    return Reply(75, "busy listing the queue; try again")
                try:
                    body = listing_for(self.cfg, self.spool, uid, gid, arg)
                finally:
                    with self._lock:
                        self._listing.discard(uid)
                return Reply(0, "listing", body)
            if verb == "flush":
                now = time.monotonic()
                if now - self._last_flush >= FLUSH_GAP:
                    self._last_flush = now
                    self.log.info(f"queue run requested by uid {uid}")
                    self._flags.add("usr1")
                    self._event.set()
                return Reply(0, "queue run started")
        except RelayqError as exc:
            return Reply(exc.code, exc.message)
        except OSError as exc:  # our trouble, not the request's: the client keeps its file
            return Reply(75, f"cannot do it now: {exc.strerror or exc}")
        return Reply(64, f"unknown request {verb[:20]!r}")

    def _scan_for_new(self) -> None:
        """Wake-up: dispatch messages that appeared since the last look."""
        now = time.monotonic()
        try:
            mtime = os.stat(self.spool.queue).st_mtime_ns
        except OSError:
            return
        if mtime == self._dir_mtime and now - self._last_scan < RESCAN:
            return
        self._dir_mtime = mtime
        self._last_scan = now
        try:
            ids = self.spool.ids()
        except RelayqError:
            return
        new = [q for q in ids if q not in self._known]
        self._known = set(ids)
        for qid in new:
            self.dispatch(qid, False)

    def _next_wait(self) -> float:
        """Sleep until the next poll or the next recheck of a locked message."""
        with self._lock:
            soonest = min((when for when, _ in self._recheck.values()), default=None)
        if soonest is None:
            return POLL
        return max(0.0, min(POLL, soonest - time.monotonic()))

    def _due_rechecks(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [q for q, (when, _) in self._recheck.items() if when <= now]
        for qid in due:
            self.dispatch(qid, False)

    def _after(self, qid: str, left: int, force: bool) -> None:
        """A message left queued although due was locked elsewhere: look again soon."""
        env = None
        if left and not force:
            try:
                env = self.spool.read_envelope(qid)
            except (OSError, RelayqError):
                env = None
        with self._lock:
            if (env is None or env.held or not env.unsettled()
                    or not policy.due(env.next_try, time.time(), self.cfg.retry_max)):
                self._recheck.pop(qid, None)
                return
            _, delay = self._recheck.get(qid, (0.0, RECHECK_MIN / 2))
            delay = min(delay * 2, RECHECK_MAX)
            self._recheck[qid] = (time.monotonic() + delay, delay)
        self._event.set()  # the main loop sleeps until the soonest recheck

    # -- workers -----------------------------------------------------------------------

    def _new_runner(self) -> Runner:
        from relayq.delivery.runner import Runner

        return Runner(self.cfg, self.spool, self.log, self.ctx)

    def _spawn(self) -> Agent | None:
        from relayq.daemon.agent import Agent

        try:
            return Agent(self.cfg, self.log)
        except OSError as exc:
            self.log.warning(f"cannot start a delivery agent ({exc}); delivering in-process")
            return None

    def _worker(self, n: int) -> None:
        """Take queue ids and have this worker's agent deliver them (see relayq.daemon.agent).

        Without an agent (none could be started, or they keep dying) the
        worker delivers in this process with its own Runner, as before agents.
        """
        from relayq.daemon.agent import AgentGone

        runner: Runner | None = None
        generation = -1
        failures = 0
        try:
            while True:
                try:
                    qid = self._work.get(timeout=IDLE_CLOSE)
                except queue.Empty:
                    if runner is not None:  # idle: let the smarthost go
                        runner.close()
                        runner = None
                    continue
                if qid is None:
                    return
                with self._lock:
                    force = self._pending.pop(qid, False)
                    if self._stopping:
                        continue
                    self._active.add(qid)
                left = 1
                try:
                    if generation != self.generation:  # started, or the config was reloaded
                        if runner is not None:
                            runner.close()
                            runner = None
                        if generation >= 0 or self._agents[n] is None:
                            self._retire(n)
                            self._agents[n] = self._spawn()
                        generation, failures = self.generation, 0
                    agent = self._agents[n] if failures < AGENT_FAILURES else None
                    if agent is not None:
                        try:
                            left = agent.deliver(qid, force)
                            failures = 0
                        except AgentGone as exc:
                            failures += 1
                            self.log.error(f"{qid}: delivery agent {agent.proc.pid} died "
                                           f"({exc}); left in the queue")
                            self._retire(n)
                            if self._stopping:
                                continue
                            if failures < AGENT_FAILURES:
                                self._agents[n] = self._spawn()
                            else:
                                self.log.error("delivery agents keep dying; this worker "
                                               "delivers in-process until a reload")
                    else:
                        if runner is None:
                            runner = self._new_runner()
                        left = runner.process(qid, force)
                except Exception as exc:  # a bug must not kill the worker
                    self.log.error(f"{qid}: delivery failed: {type(exc).__name__}: {exc}; "
                                   "left in the queue")
                finally:
                    with self._lock:
                        self._active.discard(qid)
                        again = qid in self._force_again
                        self._force_again.discard(qid)
                if again and left:
                    self.dispatch(qid, True)
                else:
                    self._after(qid, left, force)
        finally:
            if runner is not None:
                runner.close()
            self._retire(n, wait=False)

    def _retire(self, n: int, *, wait: bool = True) -> None:
        """Close worker n's agent; it exits after its message in hand."""
        agent, self._agents[n] = self._agents[n], None
        if agent is None:
            return
        agent.close()
        if wait and not agent.reap(STOP_GRACE):
            agent.kill()
            agent.reap(STOP_GRACE)
        if not wait:
            self._closing.append(agent)

    def watch_queue(self) -> None:
        """Dispatch new messages the moment their envelope is renamed into place.

        inotify(7) through libc (ctypes): a commit's final step is the rename of
        QID.t to QID.e, which is one IN_MOVED_TO event. The mtime poll in the
        main loop stays as the fallback (no inotify, a full event queue).
        """
        if not self.wakeups:
            return
        try:
            self.spool.ensure()
            watcher = _Inotify(self.spool.queue)
        except (OSError, RelayqError) as exc:
            self.log.info(f"no inotify ({exc}); new mail is found by polling")
            return

        def loop() -> None:
            for name in watcher.names():
                if not name.endswith(".e") or not self.wakeups:
                    continue
                qid = name[:-2]
                with self._lock:
                    new = qid not in self._known
                    self._known.add(qid)
                if new:  # a rewrite of a known message's envelope is not news
                    self.dispatch(qid, False)

        threading.Thread(target=loop, name="relayq-inotify", daemon=True).start()

    def start_agents(self) -> None:
        """One delivery agent per worker, started ahead so the first message need not
        wait; called before dropping privileges (each agent drops them itself)."""
        self._agents = [self._spawn() for _ in range(max(1, self.cfg.concurrency))]

    def kill_agents(self) -> None:
        for agent in self._agents:
            if agent is not None:
                agent.kill()
                agent.reap(1.0)

    def start_workers(self) -> None:
        if not self._agents:
            self._agents = [None] * max(1, self.cfg.concurrency)
        for n in range(len(self._agents)):
            t = threading.Thread(target=self._worker, args=(n,), name=f"relayq-worker-{n}",
                                 daemon=True)
            t.start()
            self._workers.append(t)

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the configuration again; a bad one is refused and the old kept."""
        from relayq.queue.spool import Spool
        from relayq.queue.submit import Context
        from relayq.system.log import Log

        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}")
        try:
            if self.opts.loader is None:
                raise ConfigError("no configuration file to reload")
            cfg = self.opts.loader()
            # a smarthost that is our listener (the one bound, if any): refused
            cfg.check_no_loop(self.listener.addresses() if self.listener else None)
            ctx = Context(cfg)
        except RelayqError as exc:
            self.log.error(f"reload refused, keeping the running configuration: {exc.message}")
            sd_notify("READY=1\nSTATUS=reload refused: bad configuration")
            return
        if self.listener is not None and cfg.listen != self.cfg.listen:
            self.log.warning("listen addresses changed: restart the daemon to apply them")
        echo = self.log.echo
        self.log = Log(self.opts.tag, use_syslog=cfg.syslog, path=cfg.log_file, echo=echo)
        self.cfg, self.ctx = cfg, ctx
        self.spool = Spool(cfg.queue_dir)
        self._known = set()
        self._dir_mtime = -1
        self.generation += 1
        if self.listener is not None:
            self.listener.reload(cfg, ctx, self.log)
        if self.listeners is not None:
            self.listeners.reload()  # each reads the file itself
        self.log.info(f"configuration reloaded from {cfg.path}")
        sd_notify("READY=1\nSTATUS=configuration reloaded")

    # -- main loop ---------------------------------------------------------------------

    def fork_listeners(self) -> None:
        """More listener processes (relayq.server.prefork), while this process has one thread."""
        if self.listener is None:
            return
        from relayq.server import prefork

        count = prefork.wanted(self.cfg) - 1
        if count <= 0:
            return
        if threading.active_count() > 1:
            self.log.warning("not forking listener processes: threads already running")
            return
        private = list(self.private_fds)
        for agent in self._agents:
            if agent is not None:
                private += agent.fds()
        self.listeners = prefork.Listeners(self.listener, self.log)
        self.listeners.fork(count, self.opts.loader, private)

    def serve(self) -> int:
        """Run until SIGTERM; the caller has installed signals and bound sockets."""
        self.fork_listeners()
        self.start_workers()
        self.watch_queue()
        if self.listener is not None:
            self.listener.start()
        what = f"queue runs every {_show(self.interval)}"
        if self.listener is not None:
            what += ", SMTP on " + ", ".join(self.listener.addresses())
        self.log.info(f"starting daemon (pid {os.getpid()}): {what}")
        sd_notify(f"READY=1\nSTATUS={what}\nMAINPID={os.getpid()}")
        next_run = time.monotonic()
        try:
            while True:
                self._event.wait(self._next_wait())
                self._event.clear()
                flags, self._flags = self._flags, set()
                if "term" in flags:
                    break
                if "hup" in flags:
                    self.reload()
                if "usr1" in flags:
                    self.log.info("SIGUSR1: running the whole queue now")
                    self.queue_run(force=True)
                    next_run = time.monotonic() + self.interval
                if time.monotonic() >= next_run:
                    self.queue_run(force=False)
                    next_run = time.monotonic() + self.interval
                    if self.control is None:  # after the start-up run has taken maildrop/
                        self.start_control()
                self.take_drops()
                if self.wakeups:
                    self._scan_for_new()
                self._due_rechecks()
                if self.listeners is not None:
                    self.listeners.check()
        finally:
            self.stop()
        return EX_OK

    def stop(self) -> None:
        """Finish the messages in flight (up to STOP_GRACE), then return; the rest waits."""
        sd_notify("STOPPING=1")
        with self._lock:
            self._stopping = True
            self._pending.clear()
        self.log.info("stopping daemon")
        if self.control is not None:
            self.control.close()
        if self.listener is not None:
            self.listener.stop()
        if self.listeners is not None:
            self.listeners.stop(15.0)
        while True:
            try:
                self._work.get_nowait()
            except queue.Empty:
                break
        for _ in self._workers:
            self._work.put(None)
        deadline = time.monotonic() + STOP_GRACE
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = sorted(self._active)
        for agent in self._closing + [a for a in self._agents if a is not None]:
            agent.close()
            if not agent.reap(max(0.0, deadline - time.monotonic())):
                agent.kill()  # its lock goes with it; the message stays queued
                agent.reap(1.0)
        if stuck:
            self.log.warning(f"abandoning {len(stuck)} delivery in flight ({', '.join(stuck)}); "
                             "it stays queued")


def _show(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


# --- starting -------------------------------------------------------------------------


def _setup(cfg: Config, log: Log, opts: Options) -> tuple[Daemon, PidFile]:
    """Everything that can fail before we are ready: pid file, sockets, privileges."""
    from relayq.queue.spool import Spool

    sockets: list[socket.socket] = []
    passed = systemd_sockets()
    if opts.listen or passed:
        from relayq.server import listener

        if passed:
            listener.check_sockets(cfg, passed)
            sockets = passed
        else:
            sockets = listener.bind(cfg)
    pid = PidFile(pid_path(cfg))
    daemon: Daemon | None = None
    try:
        pid.acquire()
        # import the delivery code now: after dropping privileges the install
        # might not be readable, and the first delivery should not wait for it
        import grp  # noqa: F401
        import json  # noqa: F401
        import pwd  # noqa: F401


        spool = Spool(cfg.queue_dir)
        owner = _service_owner(cfg)
        if owner is not None:
            spool.ensure(owner)
        else:
            spool.enter()  # root in another user's queue works as that user
        daemon = Daemon(cfg, log, opts)
        daemon.private_fds.append(pid.fd)
        daemon.start_agents()  # as root they drop privileges themselves
        drop_privileges(cfg.daemon_user, log)
        spool.ensure(public=_serves_users(cfg))
    except BaseException:
        pid.release()
        for s in sockets:
            s.close()
        if daemon is not None:
            daemon.kill_agents()
        raise
    if sockets:
        from relayq.server.listener import Listener

        daemon.listener = Listener(cfg, log, daemon.ctx, sockets, on_commit=daemon.committed)
    return daemon, pid


def run(cfg: Config, log: Log, opts: Options) -> int:
    """Start the daemon: in the foreground, or detached the sendmail way."""
    cfg.check_no_loop()  # a smarthost that is our listener: 78 on the terminal
    if opts.listen:
        from relayq.server import listener

        listener.check_config(cfg)  # exit 78 on the terminal, before forking
    if opts.foreground or under_systemd():
        log.echo = not cfg.syslog and not cfg.log_file
        daemon, pid = _setup(cfg, log, opts)
        daemon.install_signals()
        try:
            return daemon.serve()
        finally:
            pid.release()
    return _detach(cfg, log, opts)


def _detach(cfg: Config, log: Log, opts: Options) -> int:
    """Double fork; the parent reports the child's setup result (0, or the error and code)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
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
        daemon, pidfile = _setup(cfg, log, opts)
        daemon.install_signals()
    except RelayqError as exc:
        _report(w, exc.code, exc.message)
        os._exit(exc.code)
    except BaseException as exc:
        _report(w, EX_SOFTWARE, f"cannot start: {type(exc).__name__}: {exc}")
        os._exit(EX_SOFTWARE)
    _report(w, EX_OK, "started")
    code = EX_SOFTWARE
    try:
        code = daemon.serve()
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            log.error(f"daemon failed: {type(exc).__name__}: {exc}")
    finally:
        pidfile.release()
    os._exit(code)


def _report(fd: int, code: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{code} {message}\n".encode())
        os.close(fd)


def start(*, source: Source, tag: str, interval: str | None, listen: bool,
          foreground: bool) -> int:
    """The entry point of `sendmail -q29m / -bd` and `relayq daemon`.

    `source` is config.select()'s answer (who may use which file, decided by the
    caller before anything else); its load() is the one loader of every process,
    here at start and on SIGHUP (the path and default queue stay those of the start,
    even after dropping to daemon_user).
    """
    from relayq.system.log import Log

    loader = source.load
    cfg = loader()
    seconds = parse_interval(interval) if interval and interval != "p" else None
    log = Log(tag, use_syslog=cfg.syslog, path=cfg.log_file)
    opts = Options(interval=seconds, listen=listen, foreground=foreground, tag=tag,
                   loader=loader)
    try:
        return run(cfg, log, opts)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise TempFailure(f"cannot start the daemon: {exc.strerror}") from None
        raise



class _Inotify:
    """The names renamed into one directory (IN_MOVED_TO), read from inotify(7)."""

    IN_MOVED_TO = 0x80
    IN_CLOEXEC = 0o2000000

    def __init__(self, path: str) -> None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(self.IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(fd, os.fsencode(path), self.IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {path} failed")
        self.fd = fd

    def names(self) -> Iterator[str]:
        import struct

        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except InterruptedError:
                continue
            except OSError:
                return
            pos = 0
            while pos + 16 <= len(buf):
                _, _, _, size = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + size].split(b"\0", 1)[0]
                pos += 16 + size
                yield os.fsdecode(name)
