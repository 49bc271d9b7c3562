"""After the commit: the delivery a submitter's mode asks for (policy.after_commit).

sendmail and `sendmail -bs` call this once their messages are durable; the
daemon, which delivers everything itself, asks policy.after_commit() only
whether to dispatch at once. The caller has already been promised delivery:
nothing here may turn into a failure it hears.
"""

from __future__ import annotations

import os

from relayq.core import policy
from relayq.core.errors import RelayqError

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.core.envelope import Recipient
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log


class Attempt:
    """What an interactive delivery found, for the submitter's exit status: the
    DSN codes of new failures, and the recipients that failed."""

    __slots__ = ("codes", "failed")

    def __init__(self) -> None:
        self.codes: list[str] = []
        self.failed: list[Recipient] = []


def deliver_committed(cfg: Config, log: Log, ctx: Context, spool: Spool, qids: list[str],
                      mode: str, held: dict[str, int] | None = None,
                      verbose: Callable[[str], None] | None = None) -> Attempt:
    """Start the delivery `mode` asks for of messages just committed. `held`: qid ->
    the submitter's locked data file, carried into the delivery so that no queue
    run races the first attempt (closed, so unlocked, when the mode leaves it)."""
    held = dict(held or {})
    action = policy.after_commit(mode)
    if action == policy.LEAVE:
        for fd in held.values():
            os.close(fd)
        return Attempt()
    if action == policy.CHILD:
        from relayq.delivery.background import deliver_detached

        deliver_detached(cfg, spool, log, ctx, qids, held)
        return Attempt()
    return _now(cfg, log, ctx, spool, qids, held, verbose)


def _now(cfg: Config, log: Log, ctx: Context, spool: Spool, qids: list[str],
         held: dict[str, int], verbose: Callable[[str], None] | None) -> Attempt:
    from relayq.core.outcome import FAILED
    from relayq.delivery.runner import Runner

    attempt = Attempt()
    with Runner(cfg, spool, log, ctx, verbose=verbose) as runner:
        runner.patient = False  # the submitter waits: a sending limit defers at once
        for qid in qids:
            fd = held.pop(qid, -1)
            try:
                claim = spool.adopt(qid, fd) if fd >= 0 else None
            except RelayqError as exc:  # committed all the same: the next run sends it
                os.close(fd)
                log.error(f"{qid}: {exc.message}; queued for the next run")
                continue
            try:
                runner.process(qid, claim=claim)
            except Exception as exc:  # the message is committed: the caller must hear 0
                log.error(f"{qid}: delivery attempt failed: {type(exc).__name__}: {exc}; "
                          "queued for the next run")
                continue
            attempt.codes += runner.failed_codes
            if claim is not None:
                attempt.failed += [r for r in claim.envelope.recipients if r.state == FAILED]
    for fd in held.values():  # a lock for a message not named in qids
        os.close(fd)
    return attempt
