"""The runner's log lines, sendmail's style: what a note or a report looks like in the log.

Pure formatting (the decisions return notes as data, relayq.delivery.decisions);
the runner holds the lines until the outcome they describe is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayq.core.outcome import FAILED, SENT
from relayq.system.log import delay

if TYPE_CHECKING:
    from relayq.core.envelope import Envelope, Recipient
    from relayq.delivery.decisions import Note


def note(env: Envelope, n: Note, now: float, elapsed: float) -> tuple[str, str]:
    """The log line for one recipient's outcome, and what -v shows for it."""
    head = (
        f"{env.qid}: to=<{n.recipient.address}>, delay={delay(now - env.created)}, "
        f"xdelay={delay(elapsed)}, mailer={n.mailer}, dsn={n.dsn_code}"
    )
    if n.status == SENT:
        shown = f"Sent ({text(n.reply)})"
    elif n.status == FAILED:
        shown = n.reply
    else:
        shown = f"Deferred: {n.reply}"
    return f"{head}, stat={shown}", f"{n.recipient.address}... {shown}"


def expired(env: Envelope, r: Recipient, reason: str, now: float) -> str:
    return (f"{env.qid}: to=<{r.address}>, delay={delay(now - env.created)}, "
            f"mailer=relay, dsn=4.4.7, stat=Expired: {reason}")


def possible_duplicate(env: Envelope) -> str:
    why = ("lost the relay's reply to the end of the message" if env.unsure
           else "ended between sending the message and recording the outcome")
    return (f"{env.qid}: possible duplicate: an earlier attempt {why}; "
            "the smarthost may have it already")


def report_made(qid: str, env: Envelope, double: bool, to: str, failed: list[Recipient],
                delayed: list[Recipient]) -> str:
    """The line naming a report just queued, and what it is about."""
    if double:
        what = f"undeliverable {'bounce' if env.is_dsn else 'mail from <>'}, " \
               f"copy to the postmaster <{to}>"
    elif failed:
        what = f"DSN: {text(failed[0].reply)}"
    else:
        what = f"delay warning: {text(delayed[0].reply or env.error)}"
    return f"{qid}: {env.qid}: {what}"


def report_queued(qid: str, size: int) -> str:
    return f"{qid}: from=<>, size={size}, class=0, nrcpts=1, relay=MAILER-DAEMON"


def text(reply: str) -> str:
    """The reply without its numeric codes, as sendmail's stat=Sent (...) shows it."""
    parts = reply.split(" ", 2)
    if len(parts) == 3 and parts[0].isdigit() and parts[1][:1].isdigit() and "." in parts[1]:
        return parts[2]
    if len(parts) >= 2 and parts[0].isdigit():
        return reply.split(" ", 1)[1]
    return reply
