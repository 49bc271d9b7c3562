"""The administrator's hands on single messages: hold, release, delete, requeue.

Each takes the message's lock first (a delivery in progress is given a few
seconds to finish), changes the envelope with the same atomic replace as a
delivery, and writes one log line naming the action and who asked. A held
message stays queued and listed, but no run, flush or wake-up delivers it
until it is released (it is then due at the next run); requeue makes it due
and tries it at once, in this process, as `sendmail -qI` would.
"""

from __future__ import annotations

import os
import pwd

from relayq.core.errors import EX_NOINPUT, EX_OK, EX_TEMPFAIL, RelayqError

TYPE_CHECKING = False

if TYPE_CHECKING:
    from relayq.core.config import Config
    from relayq.core.selector import Selector
    from relayq.queue.claim import Claim
    from relayq.queue.spool import Spool
    from relayq.system.log import Log

ACTIONS = ("hold", "release", "delete", "requeue")
LOCK_WAIT = 5.0  # seconds a delivery in progress has to finish


def who() -> str:
    uid = os.getuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def apply(action: str, claim: Claim, cfg: Config | None = None) -> str:
    """Change one claimed message; returns what was done, for the log.

    With `cfg` a requeue also chooses the message's account again from that
    configuration (`--reroute`: after an account was removed or changed)."""
    env = claim.envelope
    if action == "requeue" and cfg is not None:
        from relayq.core.accounts import DEFAULT
        from relayq.queue.submit import account_for

        was, env.account = env.account, account_for(cfg, env.sender)
        env.next_try = 0.0
        claim.record()
        if was == env.account:
            return f"requeued (due now), account {env.account or DEFAULT} kept"
        return f"requeued (due now), rerouted from {was or DEFAULT} to {env.account or DEFAULT}"
    if action == "hold":
        env.held = True
        claim.record()
        return "held"
    if action == "release":
        env.held = False
        env.next_try = 0.0
        claim.record()
        return "released"
    if action == "requeue":
        env.next_try = 0.0
        claim.record()
        return "requeued (due now)"
    if action == "delete":
        claim.finish()
        return "deleted"
    raise ValueError(action)


def run(cfg: Config, spool: Spool, log: Log, action: str, qids: list[str], *,
        reroute: bool = False, selectors: list[Selector] | None = None) -> int:
    """`relayq hold|release|delete|requeue QID...`: one line per message on stdout.

    `requeue --reroute` chooses each message's account again from `cfg`; with no
    QID it takes every queued message the selectors (-qI, -qR, -qS) select."""
    from relayq.core import selector

    code = EX_OK
    requeued: list[str] = []
    sels = selectors or []
    for qid in qids or (spool.ids() if reroute else []):
        try:
            claim = spool.claim(qid, LOCK_WAIT)
        except RelayqError as exc:
            print(f"{qid}: {exc.message}")
            code = code or exc.code
            continue
        if claim is None:
            if not qids and not os.path.exists(spool.data_path(qid)):
                continue  # gone since listed (delivered): nothing to reroute
            if os.path.exists(spool.data_path(qid)):
                print(f"{qid}: busy (being delivered); try again")
                code = code or EX_TEMPFAIL
            elif action == "delete" and spool.remove_dead(qid):
                log.notice(f"{qid}: dead letter deleted by {who()}")
                print(f"{qid}: deleted (dead letter)")
            else:
                print(f"{qid}: no such message")
                code = code or EX_NOINPUT
            continue
        try:
            env = claim.envelope
            if sels and not selector.matches(sels, qid, env.sender,
                                             [r.address for r in env.pending()]):
                continue
            done = apply(action, claim, cfg if reroute else None)
        finally:
            claim.release()
        log.notice(f"{qid}: {done} by {who()}")
        print(f"{qid}: {done}")
        if action == "requeue":
            requeued.append(qid)
    if requeued:
        from relayq.delivery.runner import Runner
        from relayq.queue.submit import Context

        with Runner(cfg, spool, log, Context(cfg)) as runner:
            left = sum(runner.process(qid, True) for qid in requeued) + runner.reports_left
        if left:
            code = code or EX_TEMPFAIL
    return code
