"""The record a delivery keeps around each SMTP transaction (record first, then go on).

The transport (SmtpTransport.deliver) tells a Journal about each transaction;
the runner makes one per attempt at the relay, with its own ways to log a
note and to record the envelope.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayq.delivery import decisions

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from relayq.core.envelope import Recipient
    from relayq.core.outcome import Outcome
    from relayq.delivery.decisions import Note
    from relayq.queue.claim import Claim


class Journal:
    """What the transport reports to, around each transaction (see SmtpTransport.deliver).

    begin() reserves the record of the transaction's outcome before the relay
    hears anything (refusing, and so not sending, when the queue cannot hold
    it); commit() applies the relay's answers to the envelope and records
    them at once, so that neither a later transaction nor anything after the
    message (a bounce that cannot be written, a crash) can resend them.
    """

    def __init__(self, claim: Claim, pending: list[Recipient], note: Callable[[Note], None],
                 record: Callable[[], None], deferral: str) -> None:
        self.claim = claim
        self.pending = pending
        self.note = note  # log (held until recorded) one recipient's outcome
        self.record = record  # make the envelope durable (Runner._record)
        self.deferral = deferral  # the first deferral reply of the attempt
        self.applied: dict[int, Outcome] = {}
        self.commits = 0  # records made
        self.error = ""  # why some recipients wait, as the transport put it
        self.not_before = 0.0  # a sending limit's time for the next try (0: the schedule's)

    def hold_until(self, when: float) -> None:
        """A sending limit (relayq.delivery.limits) keeps recipients back until `when`:
        their next try is then, not the retry schedule's."""
        self.not_before = max(self.not_before, when)

    def begin(self, indices: list[int]) -> None:
        self.claim.mark_sending(len(indices))

    def commit(self, outcomes: Sequence[Outcome | None], relay: str, error: str = "",
               persist: bool = True, tried: str = "") -> bool:
        """Apply what is new (decisions.apply); record it when `persist`. True if
        anything was new. `tried`: the host tried last when none answered (`relay`
        empty), named in the log lines' relay= as sendmail names it on a deferral."""
        env = self.claim.envelope
        shown = relay or tried
        mailer = f"relay, relay={shown}" if shown else "relay"
        notes, deferral = decisions.apply(env, self.pending, outcomes, self.applied, mailer)
        for note in notes:
            self.note(note)
        self.deferral = self.deferral or deferral
        if relay:
            env.relay = relay.split(" [", 1)[0]
        self.error = error or self.error
        changed = bool(notes)
        if self.not_before and env.pending():
            env.next_try = self.not_before
        if changed and persist and not self.claim.finished:
            if env.pending():
                env.error = decisions.deferred(self.error or self.deferral)
            self.record()
            self.commits += 1
        return changed
