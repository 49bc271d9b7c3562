"""`relayq flush` and `relayq run`: a queue run from the command line, and what it did.

flush ends with one line on standard output, `flush: 3 sent, 1 deferred,
1 bounced, 1 left` (messages; the reports the run made are in "bounced",
and one still queued is in "left"), and on a terminal shows progress on
standard error for a queue of PROGRESS_MIN messages or more, redrawn in
place at most every REDRAW seconds and erased before the summary. `-q`
prints neither; `run` prints nothing, as before. The exit status is the
run's: 0 when the queue is empty afterwards, 75 while mail is left (waiting
drop files count).
"""

from __future__ import annotations

import os
import sys
import time

from relayq.core.errors import EX_OK, EX_TEMPFAIL

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import TextIO

    from relayq.core.config import Config
    from relayq.delivery.tally import Tally
    from relayq.queue.spool import Spool
    from relayq.system.log import Log

PROGRESS_MIN = 20  # messages: a smaller queue is done before a progress line helps
REDRAW = 0.1  # seconds between progress redraws


class Progress:
    """The progress line, drawn on a terminal and erased when the run is over."""

    def __init__(self, tally: Tally, total: int, out: TextIO) -> None:
        self.tally = tally
        self.total = total
        self.out = out
        self.drawn = False
        self.last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if self.drawn and now - self.last < REDRAW:
            return
        t = self.tally.total()
        seen = min(t["seen"], self.total) if self.total else t["seen"]
        self.out.write(f"\rflush: {seen}/{self.total} messages: {t['sent']} sent, "
                       f"{t['deferred']} deferred, {t['bounced']} bounced\033[K")
        self.out.flush()
        self.drawn, self.last = True, now

    def erase(self) -> None:
        if self.drawn:
            self.out.write("\r\033[K")
            self.out.flush()


def queue_run(cfg: Config, spool: Spool, log: Log, *, command: str, quiet: bool,
              verbose: bool, pids: list[str]) -> int:
    """Run the queue (flush: everything, run: what is due); flush says what it did."""
    from relayq.delivery import limits
    from relayq.delivery.runner import Runner
    from relayq.delivery.tally import Tally
    from relayq.queue.submit import Context

    flush = command == "flush"
    show = (lambda line: print(line, flush=True)) if verbose else None
    tally = Tally(slots=max(1, cfg.concurrency))
    progress = _progress(spool, tally) if flush and not quiet and not verbose else None
    with Runner(cfg, spool, log, Context(cfg), verbose=show) as runner:
        runner.tally = tally
        runner.progress = progress
        try:
            left = runner.run(force=flush, workers=limits.workers(cfg, cfg.concurrency))
        finally:
            if progress is not None:
                progress.erase()
    if left and flush:
        # what is left may be held by a running daemon: have it retry everything too
        from relayq.daemon.life import poke

        pid = poke(cfg, pids)
        if pid is not None:
            log.info(f"flush: {left} message(s) left; told the daemon (pid {pid}) to run "
                     "the queue")
    if flush and not quiet:
        t = tally.total()
        print(f"flush: {t['sent']} sent, {t['deferred']} deferred, {t['bounced']} bounced, "
              f"{left} left")
    return EX_TEMPFAIL if left else EX_OK


def _progress(spool: Spool, tally: Tally) -> Progress | None:
    """A Progress on standard error when it is a terminal and the queue is large."""
    if not sys.stderr.isatty():
        return None
    try:
        total = sum(1 for name in os.listdir(spool.queue) if name.endswith(".e"))
    except OSError:
        return None
    return Progress(tally, total, sys.stderr) if total >= PROGRESS_MIN else None


def ask_daemon(spool: Spool, quiet: bool) -> int:
    """A user who may not run the queue: the daemon runs it (sendmail's ask_flush)."""
    from relayq.cli.sendmail import ask_flush

    code = ask_flush(spool)
    if not quiet:
        print("flush: the relayq daemon runs the queue (mailq shows what is left)")
    return code
