"""A queue run's parts besides delivery: the maildrop intake first, then the fork pool.

Processes, not threads: the work per message is mostly Python, and threads
would queue on the GIL. Each worker is a forked child with its own Runner
(and so its own connection to the smarthost); it dies with the run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from relayq.core.errors import RelayqError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from relayq.core import selector
    from relayq.core.config import Config
    from relayq.delivery.runner import Runner
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log

RECORD = 32  # bytes per queue id in the pipe a queue run's workers share
BATCH = 128  # records a write: 4096 bytes, within PIPE_BUF, so one atomic write
PROGRESS_EVERY = 0.2  # seconds between progress calls while the workers work


def take_drops(cfg: Config, spool: Spool, log: Log, ctx: Context) -> None:
    """Users' mail waiting in maildrop/ (no daemon took it) joins the queue first."""
    if not os.path.isdir(spool.maildrop) or not spool.writable():
        return
    from relayq.delivery.intake import Taker

    try:
        Taker(cfg, spool, log, ctx).take_all()
    except OSError as exc:
        log.error(f"maildrop: {exc}")


def die_with(parent: int) -> None:
    """A queue run's worker ends with its run: a `sendmail -q` killed by cron's
    timeout must not leave deliveries behind it (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def run_parallel(spool: Spool, log: Log, make: Callable[[], Runner], force: bool,
                 sels: list[selector.Selector], workers: int, *,
                 progress: Callable[[], None] | None = None) -> int:
    """Share the queue among forked workers; returns how many messages remain.

    The directory is read as a stream and each queue id is written to one
    pipe all the workers read, in fixed-size records (a read of one record
    from a pipe is never split, so each id goes to exactly one worker, and
    a worker busy with a slow message takes no more until it is done). The
    first delivery does not wait for the whole directory (at 100,000
    messages a listing and sort cost 0.2 s), nothing the size of the queue
    is held in memory, and a worker is forked only when there is work for
    it. The order is the directory's: every due message is tried in the run.
    `progress` is called now and then while the workers work (they count in
    the runner's shared Tally, relayq.delivery.tally).
    """
    r, w = os.pipe()
    children: dict[int, int] = {}  # pid -> read end of its result pipe
    counts: dict[str, int] = {}
    batch: list[bytes] = []
    try:
        for qid in spool.stream_ids(counts):
            if len(qid) >= RECORD:
                continue  # not one of our ids
            if len(children) < workers:
                _fork_worker(log, make, r, w, children, force, sels)
            batch.append(qid.encode().ljust(RECORD - 1) + b"\n")
            if len(batch) >= BATCH or len(children) < workers:
                os.write(w, b"".join(batch))  # at most PIPE_BUF: never interleaved
                batch = []
                if progress is not None:
                    progress()
        if batch:
            os.write(w, b"".join(batch))
    except BrokenPipeError:
        log.error("queue run: every worker died; the rest waits for the next run")
    finally:
        os.close(w)
        os.close(r)
    if spool.debris_suspected(counts):
        try:
            spool.sweep()  # debris of a crashed writer somewhere: look closer
        except (OSError, RelayqError) as exc:
            log.warning(f"queue sweep failed: {exc}")
    return _results(children, progress)


def _results(children: dict[int, int], progress: Callable[[], None] | None) -> int:
    """Wait for every worker's count of messages left (one write, then end of file),
    calling `progress` at least every PROGRESS_EVERY seconds meanwhile."""
    import select

    outs = {res: b"" for res in children.values()}
    waiting = set(outs)
    while waiting:
        ready, _, _ = select.select(list(waiting), [], [], PROGRESS_EVERY)
        for res in ready:
            chunk = os.read(res, 64)
            if chunk:
                outs[res] += chunk
            else:
                waiting.discard(res)
        if progress is not None:
            progress()
    left = 0
    for pid, res in children.items():
        os.close(res)
        os.waitpid(pid, 0)
        out = outs[res]
        left += int(out) if out.isdigit() else 1  # a worker that died: assume mail left
    return left


def _records(ids: int) -> Iterator[str]:
    while record := os.read(ids, RECORD):
        yield record.decode("ascii", "replace").strip()


def _fork_worker(log: Log, make: Callable[[], Runner], ids: int, feed: int,
                 children: dict[int, int], force: bool, sels: list[selector.Selector]) -> None:
    res_r, res_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        die_with(parent)
        os.close(feed)  # else the pipe never reaches end of file
        os.close(res_r)
        for other in children.values():
            os.close(other)
        code, left = 0, 0
        try:
            with make() as runner:
                if runner.tally is not None:
                    runner.tally.use_slot(len(children))  # each slot has one writer
                left = runner.run_ids(_records(ids), force, sels)
        except BaseException as exc:
            log.error(f"queue run worker failed: {type(exc).__name__}: {exc}")
            code, left = 1, left + 1
        try:
            os.write(res_w, str(left).encode())
        finally:
            os._exit(code)
    os.close(res_w)
    children[pid] = res_r
