"""Delivery agents: the daemon's deliveries, each worker in a process of its own.

Delivering a message is mostly Python (SMTP dialogue, envelope records), and
the daemon's threads would queue on one GIL with the SMTP listener's event
loop: with deliveries in the same process the listener accepted 289 msg/s
instead of 465. So each worker thread of the daemon drives one agent process
and waits for it without holding the GIL.

An agent is a fresh interpreter (fork+exec, never a bare fork of the
threaded daemon, whose locks another thread may hold), with the daemon's
import path. It reads its configuration from the pipe (a secret never
appears in argv or the environment): the settings the daemon's one loader
(configfile.Source.load, secret check included) read at start or on SIGHUP. The
agent never reads the file itself: it would see an edit before the daemon's
SIGHUP does. Then one request per line, `QID FORCE`, and answers each with
the number of messages it left queued. It keeps its Runner, and so its
smarthost connection, across requests and lets the connection go when idle.
Signals are the daemon's business: the agent ignores them, finishes the
message in hand and exits when its input closes
(the daemon stopped, died or was reloaded). A daemon that gives up on a
stuck agent kills it: the kernel drops the message's lock and the message
stays queued with its last recorded state.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relayq.core.config import Config
    from relayq.system.log import Log

IDLE_CLOSE = 5.0  # let the smarthost connection go after this idle time
FRESH_LOCK_WAIT = 0.005  # a new message's writer holds its lock until the directory fsync
_BOOT = "import sys; sys.path[:] = {path!r}; from relayq.daemon.agent import main; main()"


class AgentGone(Exception):
    """The agent died or could not start; the caller falls back or retries."""


class Agent:
    """The daemon's end of one agent process."""

    def __init__(self, cfg: Config, log: Log) -> None:
        from relayq.core.config import SCHEMA

        setup = marshal.dumps({  # the effective settings, defaults and queue_dir included
            "values": {**{key: getattr(cfg, key) for key in SCHEMA},  # and the accounts
                       "account": cfg.values.get("account", {})}, "path": cfg.path,
            "tag": log.tag, "echo": log.echo,
        })
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT.format(path=sys.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        self._in.write(b"%d\n" % len(setup) + setup)
        self._in.flush()

    def deliver(self, qid: str, force: bool) -> int:
        """Have the agent process one message; 1 if it is still queued after."""
        try:
            self._in.write(f"{qid} {int(force)}\n".encode())
            self._in.flush()
            answer = self._out.readline()
        except (OSError, ValueError) as exc:
            raise AgentGone(str(exc)) from None
        if not answer.strip().isdigit():
            raise AgentGone(f"exit status {self.proc.poll()}")
        return int(answer)

    def fds(self) -> list[int]:
        """Our ends of its pipes (a forked process must close them, or the agent
        would not see end of file when the daemon goes)."""
        return [self._in.fileno(), self._out.fileno()]

    def close(self) -> None:
        """Ask the agent to finish: it exits once the message in hand is done."""
        try:
            self._in.close()
        except OSError:
            pass

    def kill(self) -> None:
        """Give up on the agent: the kernel drops its lock, the message stays queued."""
        try:
            self.proc.kill()
        except OSError:
            pass

    def reap(self, timeout: float) -> bool:
        """Wait for the agent to exit; False if it is still running."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._out.close()
        return True


# --- the agent process ----------------------------------------------------------------


class _Lines:
    """Lines from fd 0 with a read timeout (select on an unbuffered fd)."""

    def __init__(self) -> None:
        self.buf = b""

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = os.read(0, max(65536, n - len(self.buf)))
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def line(self, timeout: float | None) -> bytes | None:
        """One line; None on timeout; EOFError when the daemon closed the pipe."""
        while b"\n" not in self.buf:
            if timeout is not None and not select.select([0], [], [], timeout)[0]:
                return None
            chunk = os.read(0, 4096)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def main() -> None:  # pragma: no cover - runs in the agent process (tested end to end)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    from relayq.core.config import Config
    from relayq.daemon.life import become
    from relayq.delivery.runner import Runner
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log

    lines = _Lines()
    try:
        header = lines.line(None) or b"0"
        setup = marshal.loads(lines.exact(int(header)))
        cfg = Config(setup["values"], setup["path"])
        log = Log(setup["tag"], use_syslog=cfg.syslog, path=cfg.log_file, echo=setup["echo"])
        become(cfg.daemon_user, log)
    except (EOFError, ValueError, KeyError):
        os._exit(1)
    spool = Spool(cfg.queue_dir)
    ctx = Context(cfg)
    runner: Runner | None = None
    code = 0
    try:
        while True:
            line = lines.line(IDLE_CLOSE if runner is not None else None)
            if line is None:  # idle: let the smarthost go
                if runner is not None:
                    runner.close()
                    runner = None
                continue
            qid, _, force = line.decode("ascii", "replace").partition(" ")
            left = 1
            try:
                if runner is None:
                    runner = Runner(cfg, spool, log, ctx)
                    runner.claim_wait = FRESH_LOCK_WAIT
                left = runner.process(qid, force == "1")
            except Exception as exc:  # a bug must not kill the agent
                log.error(f"{qid}: delivery failed: {type(exc).__name__}: {exc}; "
                          "left in the queue")
            os.write(1, b"%d\n" % left)
    except (EOFError, BrokenPipeError):
        pass
    except BaseException as exc:
        log.error(f"delivery agent failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        if runner is not None:
            runner.close()
    os._exit(code)
