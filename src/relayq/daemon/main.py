"""The long-running relayq: periodic queue runs, wake-ups for new mail, signals.

One process with a few kinds of thread, and its helper processes:

- the main thread schedules (Daemon.serve): a queue run every `interval`
  (from `-q29m` or `queue_interval`), a wake-up when a new message appears in
  the queue (relayq.daemon.watcher: inotify, with an mtime poll every POLL
  seconds as a backstop; the submitting `sendmail` never talks to the daemon,
  so it can never block on it), and the signals (relayq.daemon.life):
  SIGTERM/SIGINT stop, SIGHUP reloads the configuration, SIGUSR1 runs the
  whole queue now (force);
- `concurrency` worker threads (relayq.daemon.workers) take queue ids from one
  work queue, each driving its own delivery agent process (relayq.daemon.agent);
  which message goes next, and what a forced run or a recheck does to it, is
  the dispatcher's (relayq.daemon.dispatcher): never one message to two workers;
- the watcher's threads (inotify, users' maildrop/), the local socket
  (relayq.daemon.control), the metrics file's writer (relayq.daemon.exporter,
  when metrics_file is set), the OAuth2 idle refresh (relayq.delivery.oauth2.
  IdleRefresh: an unused grant kept alive), and optionally the SMTP listener
  (relayq.server.listener), an asyncio loop in its own thread, which hands every
  committed message straight to the workers, plus one forked listener process
  per further CPU (relayq.server.prefork) on the same sockets, whose messages the
  inotify wake-up finds.

Periodic and wake-up runs never retry a message early (force=False); only
SIGUSR1 and `relayq flush` do.

Stopping: SIGTERM lets every worker finish the message in flight and exits.
A delivery still stuck after STOP_GRACE seconds is abandoned: its agent is
killed, the kernel drops its lock, and the message stays queued with its last
recorded state (records are replaced by rename, so no record is ever half
written). The only risk is the usual duplicate window: a relay that had
already answered 250 to the final dot when we gave up.

The configuration is read by the one loader (configfile.Source.load, secret check
included), at start and on SIGHUP; the agents are handed the settings it
read.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import TYPE_CHECKING

from relayq.core import policy
from relayq.core.errors import EX_OK, ConfigError, RelayqError, TempFailure
from relayq.daemon.dispatcher import Dispatcher
from relayq.daemon.life import (
    PidFile,
    Wake,
    become,
    detach,
    monotonic_usec,
    parse_interval,
    pid_candidates,
    pid_path,
    poke,
    sd_notify,
    serves_users,
    service_owner,
    systemd_sockets,
    under_systemd,
)
from relayq.daemon.workers import STOP_GRACE, Pool

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.queue.submit import Context
    from relayq.server.listener import Listener
    from relayq.server.prefork import Listeners
    from relayq.system.configfile import Source
    from relayq.system.log import Log

POLL = 0.25  # how often the queue directory is looked at

# what cli/main.py, cli/sendmail.py and the tests take from here
__all__ = ["Daemon", "Options", "PidFile", "parse_interval", "pid_path", "poke", "start"]

class Options:
    """How the daemon was asked to run (from `sendmail -q.. -bd` or `relayq daemon`)."""

    def __init__(self, *, interval: float | None = None, listen: bool = False,
                 foreground: bool = False, tag: str = "relayq",
                 loader: Callable[[], Config] | None = None) -> None:
        self.interval = interval  # None: the config's queue_interval
        self.listen = listen
        self.foreground = foreground
        self.tag = tag
        self.loader = loader  # Source.load: re-reads the same file on SIGHUP


class Daemon:
    """The parts, assembled: scheduler loop, reload and stop (see the module doc)."""

    def __init__(self, cfg: Config, log: Log, opts: Options) -> None:
        from relayq.daemon.control import Requests
        from relayq.daemon.exporter import Exporter
        from relayq.daemon.watcher import Watcher
        from relayq.delivery.intake import Notices
        from relayq.delivery.oauth2 import IdleRefresh
        from relayq.queue.spool import Spool
        from relayq.queue.submit import Context

        self.cfg = cfg
        self.log = log
        self.opts = opts
        self.ctx: Context = Context(cfg)
        self.spool = Spool(cfg.queue_dir)
        self.drop_notices = Notices()  # maildrop/: what this process said already
        self.generation = 0  # bumped by a reload: workers rebuild their Runner
        self.listener: Listener | None = None
        self.listeners: Listeners | None = None  # more listener processes
        self.private_fds: list[int] = []  # not for forked listeners (the pid file lock)
        self.dispatcher = Dispatcher()
        self.wake = Wake()
        self.pool = Pool(self)
        self.watcher = Watcher(self)
        self.requests = Requests(self)
        self.exporter = Exporter(self)  # metrics_file (relayq metrics' text) on an interval
        self.tokens = IdleRefresh(log.info)  # OAuth2 grants kept alive while idle
        self.runs = 0

    @property
    def interval(self) -> float:
        return self.opts.interval or self.cfg.queue_interval or 1800.0

    @property
    def wakeups(self) -> bool:
        """New mail goes out at once, except in laptop (deferred) mode."""
        return self.cfg.delivery_mode != policy.Mode.DEFERRED

    def install_signals(self) -> None:
        self.wake.install_signals()

    # -- handing out work (any thread) ---------------------------------------------

    def dispatch(self, qid: str, force: bool) -> None:
        """Queue one message for a worker unless one already has it."""
        if self.dispatcher.dispatch(qid, force):
            self.pool.put(qid)

    def committed(self, qid: str) -> None:
        """Called by the listener after a commit: deliver it now (unless deferred mode)."""
        if self.wakeups:
            self.dispatch(qid, False)

    def queue_run(self, force: bool) -> None:
        """Hand every queued message to the workers (the ones not yet due are skipped)."""
        self.runs += 1
        self.watcher.take_drops(run=force)  # in its thread; what it takes joins this run
        counts: dict[str, int] = {}
        known: set[str] = set()
        try:
            for qid in self.spool.stream_ids(counts):  # the workers start on the first
                known.add(qid)
                self.dispatch(qid, force)
        except RelayqError as exc:
            self.log.error(f"queue run: {exc.message}")
        self.watcher.listed(known)
        if self.spool.debris_suspected(counts):
            try:
                self.spool.sweep()
            except (OSError, RelayqError) as exc:
                self.log.warning(f"queue sweep failed: {exc}")

    def _due_rechecks(self) -> None:
        for qid in self.dispatcher.due_rechecks():
            self.pool.put(qid)

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the configuration again; a bad one is refused and the old kept."""
        from relayq.queue.spool import Spool
        from relayq.queue.submit import Context
        from relayq.system.log import Log

        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
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
        self.watcher.forget()
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
        private = list(self.private_fds) + self.pool.agent_fds()
        self.listeners = prefork.Listeners(self.listener, self.log)
        self.listeners.fork(count, self.opts.loader, private)

    def serve(self) -> int:
        """Run until SIGTERM; the caller has installed signals and bound sockets."""
        self.fork_listeners()
        self.pool.start()
        self.exporter.start()
        self.watcher.watch_queue()
        if self.listener is not None:
            self.listener.start()
        what = f"queue runs every {_show(self.interval)}"
        if self.listener is not None:
            what += ", SMTP on " + ", ".join(self.listener.addresses())
        self.log.info(f"starting daemon (pid {os.getpid()}): {what}")
        sd_notify(f"READY=1\nSTATUS={what}\nMAINPID={os.getpid()}")
        reason = "error"
        try:
            self._loop()
            reason = "signal"  # the loop ends on SIGTERM/SIGINT
        finally:
            self.stop(reason)
        return EX_OK

    def _loop(self) -> None:
        next_run = time.monotonic()
        while True:
            flags = self.wake.wait(self.dispatcher.next_wait(POLL))
            if "term" in flags:
                return
            if "hup" in flags:
                self.reload()
            if "usr1" in flags:
                self.log.info("SIGUSR1: running the whole queue now")
                self.queue_run(force=True)
                next_run = time.monotonic() + self.interval
            if time.monotonic() >= next_run:
                self.queue_run(force=False)
                next_run = time.monotonic() + self.interval
                if self.requests.server is None:  # after the start-up run took maildrop/
                    self.requests.start()
            self.watcher.take_drops()
            if self.wakeups:
                self.watcher.scan()
            self._due_rechecks()
            self.tokens.tick(self.cfg)
            if self.listeners is not None:
                self.listeners.check()

    def stop(self, reason: str = "signal") -> None:
        """Finish the messages in flight (up to STOP_GRACE), then return; the rest waits."""
        sd_notify("STOPPING=1")
        self.dispatcher.stop()
        self.watcher.stop()
        self.log.info(f"stopping daemon, reason={reason}")  # sendmail's words (logwatch's)
        self.requests.close()
        self.exporter.stop()
        if self.listener is not None:
            self.listener.stop()
        if self.listeners is not None:
            self.listeners.stop(15.0)
        deadline = time.monotonic() + STOP_GRACE
        self.pool.stop_workers(deadline)
        stuck = self.dispatcher.in_flight()
        self.pool.stop_agents(deadline)
        self.watcher.join(deadline)
        self.requests.join(deadline)
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
        pid.acquire(pid_candidates(cfg))  # one daemon per queue, wherever its pid file
        # import the delivery code now: after dropping privileges the install
        # might not be readable, and the first delivery should not wait for it
        import grp  # noqa: F401
        import json  # noqa: F401
        import pwd  # noqa: F401

        spool = Spool(cfg.queue_dir)
        owner = service_owner(cfg)
        if owner is not None:
            spool.ensure(owner)
        else:
            spool.enter(cfg)  # root in another user's queue works as that user
        daemon = Daemon(cfg, log, opts)
        daemon.private_fds.append(pid.fd)
        daemon.pool.start_agents()  # as root they drop privileges themselves
        become(cfg.daemon_user, log)
        spool.ensure(public=serves_users(cfg))
    except BaseException:
        pid.release()
        for s in sockets:
            s.close()
        if daemon is not None:
            daemon.pool.kill_agents()
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

    def start() -> tuple[Callable[[], int], Callable[[], None]]:
        daemon, pid = _setup(cfg, log, opts)
        daemon.install_signals()
        return daemon.serve, pid.release

    if opts.foreground or under_systemd():
        log.echo = not cfg.syslog and not cfg.log_file
        serve, release = start()
        try:
            return serve()
        finally:
            release()
    return detach(start, log)


def start(*, source: Source, tag: str, interval: str | None, listen: bool,
          foreground: bool) -> int:
    """The entry point of `sendmail -q29m / -bd` and `relayq daemon`.

    `source` is configfile.select()'s answer (who may use which file, decided by the
    caller before anything else); its load() is the one loader of every process,
    here at start and on SIGHUP (the path and default queue stay those of the start,
    even after dropping to daemon_user).
    """
    from relayq.system.log import Log

    source.daemon = True  # an unreadable file is an error here, never the defaults
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
