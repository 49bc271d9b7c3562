"""Background delivery: a child process that delivers what was just committed.

Kept apart from relayq.delivery.runner so that `sendmail` in its default (background)
mode imports none of the delivery code before it exits: the child imports it
after the fork, when the caller already has its answer.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from relayq.core.config import Config
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log


def deliver_detached(
    cfg: Config,
    spool: Spool,
    log: Log,
    ctx: Context,
    qids: list[str],
    held: dict[str, int] | None = None,
) -> None:
    """Deliver in a child process nobody waits for (sendmail's background mode).

    The caller exits right after, so one fork is enough: the child is
    re-parented to init and never lingers as the caller's zombie. A lock the
    caller already holds (`held`: qid -> the submitter's locked data file) is
    inherited across fork, so no queue run can race the first attempt.
    """
    held = held or {}
    try:
        pid = os.fork()
    except OSError as exc:
        log.warning(f"cannot fork for background delivery ({exc.strerror}); queued")
        pid = 1
    if pid:
        for fd in held.values():
            os.close(fd)  # the child's copies keep the locks
        return
    code = 0  # pragma: no cover - the rest runs in the child
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        from relayq.delivery.runner import Runner  # only now: the caller must not pay for it

        with Runner(cfg, spool, log, ctx) as runner:
            runner.patient = False  # a limit or a taken slot leaves the mail to queue runs
            for qid in qids:
                claim = spool.adopt(qid, held.pop(qid)) if qid in held else None
                runner.process(qid, claim=claim)
    except BaseException as exc:
        try:
            log.error(f"background delivery of {' '.join(qids)} failed: "
                      f"{type(exc).__name__}: {exc}")
        except BaseException:
            pass
        code = 1
    os._exit(code)
