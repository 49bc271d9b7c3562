"""Queue runs: pick what is due, claim it, deliver it, record every recipient.

Every way out (a `-q` run, the background child of a submission, an
interactive submission, the daemon) goes through Runner.process(), so the
rules live in one place: a recipient accepted once is never sent again; a
permanent failure produces one RFC 3464 bounce (never for a bounce); mail
still queued after max_queue_age bounces with the last reason. The rules
themselves are pure code in relayq.delivery.decisions; this module is the
I/O around them: claim, deliver, apply the decision, record, make reports.

    with Runner(cfg, spool, log, ctx) as r:
        r.process(qid)        # one message, then the reports it made

Routing: with local_delivery on, recipients in local_domains go to
transport/local first (aliases may add remote recipients to the same
envelope, delivered in the same attempt); everything else goes to the
smarthost of the account it was queued for (core/accounts: one transport, and
so one connection, per account; a removed account's mail waits). With it
off (the null client) every recipient is relayed as submitted, already
qualified with `domain`.

Trade-off: the only window for a duplicate is a crash between the relay's final
250 and the envelope rewrite that records it (one fsync), as in sendmail and Postfix.
"""

from __future__ import annotations

import os
import random
import time
from typing import TYPE_CHECKING

from relayq.core import policy, selector
from relayq.core.envelope import NOTICE_KINDS, Envelope, NewerFormat, Notice, Recipient
from relayq.core.errors import DamagedQueueFile, RelayqError
from relayq.core.outcome import FAILED
from relayq.delivery import decisions, logline, reports, tally
from relayq.delivery.decisions import DEAD, UNWANTED, Note
from relayq.delivery.journal import Journal
from relayq.delivery.local_step import LocalStep

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from types import TracebackType

    from relayq.core.config import Config
    from relayq.delivery.local_transport import LocalTransport
    from relayq.delivery.smtp_transport import SmtpTransport
    from relayq.delivery.tally import Tally
    from relayq.queue.claim import Claim
    from relayq.queue.spool import NewMessage, Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log


class Runner(LocalStep):
    """Delivers queued messages and makes their reports, over one smarthost connection
    per account (reports: the default's).

    Use it in a `with` block (the connections are closed on exit), or close()
    it (the daemon keeps them open between messages and closes them when idle).
    """

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        log: Log,
        ctx: Context,
        *,
        verbose: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.log = log
        self.ctx = ctx
        self.claim_wait = 0.0  # see Spool.claim (the daemon's agents wait a little)
        self.verbose = verbose
        self.patient = True  # a queue run may wait briefly on a sending limit; a submitter not
        self._transports: dict[str, SmtpTransport] = {}  # by account (core/accounts)
        self._local: LocalTransport | None = None
        self._held: list[str] | None = None  # outcome log lines waiting for the record
        self.bounces: list[str] = []  # reports made, not yet delivered
        self.reports_left = 0  # reports process() delivered that are still queued
        self.failed_codes: list[str] = []  # DSN codes of the last message's new failures
        self.tally: Tally | None = None  # a queue run's counts (relayq flush), and
        self.progress: Callable[[], None] | None = None  # called after each message
        self._outcome = ""  # the attempt's word (tally.outcome) for the message last tried
        self._relay_name = ""  # the relay the last attempt reached or tried ("": local)
        self._failed: list[tuple[str, str]] = []  # smarthosts that failed on its way

    @property
    def rules(self) -> decisions.Rules:
        return decisions.Rules.of(self.cfg)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def transport(self, account: str = "") -> SmtpTransport:
        """The transport of an account ("": the default), made on first use and kept:
        its connection serves that account's mail only, never another's."""
        from relayq.core.accounts import DEFAULT

        name = account or DEFAULT
        for other, idle in self._transports.items():
            if other != name and idle.config.max_connections > 0:
                idle.close()  # its idle connection would keep one of few slots from
                # the other workers of its account (reconnected when its mail comes)
        transport = self._transports.get(name)
        if transport is None:
            from relayq.delivery.smtp_transport import SmtpTransport

            transport = SmtpTransport(self.cfg.accounts()[name], transcript=self.verbose,
                                      log=self.log.info, patient=self.patient)
            self._transports[name] = transport
        return transport

    def close(self) -> None:
        transports, self._transports = self._transports, {}
        for transport in transports.values():
            transport.close()

    # -- the ways in ----------------------------------------------------------

    def process(self, qid: str, force: bool = False,
                selectors: list[selector.Selector] | None = None, *,
                claim: Claim | None = None) -> int:
        """Deliver one message if it is due, then the reports it made (over the same
        connection); 1 if the message is still queued after, else 0.

        `claim`: the caller holds the message's lock (a fresh submission): it is
        delivered at once, due or not, released after, and what goes wrong
        propagates (the message is committed: the caller says what it must).
        Reports still queued after their attempt are counted in reports_left.
        """
        self.failed_codes = []
        if claim is None:
            left = self._one(qid, force, selectors or [])
        else:
            try:
                self.failed_codes = self.deliver(claim)
            finally:
                claim.release()
            left = 0 if claim.finished else 1
        self.reports_left += self.deliver_bounces()
        return left

    def run_ids(self, ids: Iterable[str], force: bool, sels: list[selector.Selector]) -> int:
        """A queue run's share: these messages in turn, then the reports they made;
        how many of them all remain queued."""
        left = 0
        for qid in ids:
            left += self._counted(qid, force, sels)
        return left + self.deliver_bounces()

    def _counted(self, qid: str, force: bool, sels: list[selector.Selector]) -> int:
        """_one, counted in the tally (reports are not: run_ids delivers them apart)."""
        self._outcome = ""
        left = self._one(qid, force, sels)
        if self.tally is not None:
            self.tally.add("seen")
            if self._outcome:
                self.tally.add("bounced" if self._outcome == "expired" else self._outcome)
        if self.progress is not None:
            self.progress()
        return left

    def run(
        self,
        *,
        force: bool,
        selectors: list[selector.Selector] | None = None,
        workers: int = 1,
    ) -> int:
        """Deliver what is due (everything when force); returns how many messages remain,
        drop files the run could not take (maildrop/) included: accepted mail too.

        With workers > 1 the queue is shared by that many processes (see
        relayq.delivery.pool), each with its own connection to the smarthost.
        -v keeps one worker so the dialogue reads in order.
        """
        from relayq.delivery import pool
        from relayq.queue.maildrop import waiting

        sels = selectors or []
        pool.take_drops(self.cfg, self.spool, self.log, self.ctx)
        if workers > 1 and not self.verbose:
            left = pool.run_parallel(self.spool, self.log, self._sibling, force, sels, workers,
                                     progress=self.progress)
        else:
            names = self.spool.names()
            try:
                self.spool.sweep(names=names)
            except OSError as exc:
                self.log.warning(f"queue sweep failed: {exc}")
            ids = self.spool.ids(names)
            del names
            left = self.run_ids(self._announced(ids), force, sels)
        return left + (waiting(self.spool.maildrop) or 0)

    def _sibling(self) -> Runner:
        sibling = Runner(self.cfg, self.spool, self.log, self.ctx)
        sibling.tally = self.tally  # shared memory: the worker counts in its own slot
        return sibling

    def _announced(self, ids: list[str]) -> Iterator[str]:
        for n, qid in enumerate(ids, 1):
            if self.verbose:
                self.verbose(f"Running {self.spool.queue}/{qid} (sequence {n} of {len(ids)})")
            yield qid

    def deliver_bounces(self) -> int:
        """Send the reports this runner made, over the same connection; how many remain."""
        left = 0
        while self.bounces:
            left += self._one(self.bounces.pop(0), True, [])
        return left

    def _one(self, qid: str, force: bool, selectors: list[selector.Selector]) -> int:
        """Claim and deliver one message if it is due; 1 if it is still queued after."""
        try:
            claim = self.spool.claim(qid, self.claim_wait)
        except NewerFormat as exc:
            self.log.warning(f"{exc.message}; left alone")
            return 1
        except DamagedQueueFile as exc:
            self.spool.quarantine(qid)
            self.log.error(f"{exc.message}; moved to {self.spool.quarantine_dir}")
            return 0
        except RelayqError as exc:  # cannot read it now (permissions, I/O): not damage
            self.log.error(f"{qid}: {exc.message}; left in the queue")
            return 1
        if claim is None:
            return 1 if os.path.exists(self.spool.data_path(qid)) else 0
        try:
            env = claim.envelope
            if selectors and not selector.matches(
                selectors, qid, env.sender, [r.address for r in env.pending()]
            ):
                return 1
            if env.held or (not force and not policy.due(env.next_try, time.time(),
                                                        self.cfg.retry_max)):
                return 1  # held: not even a forced run delivers it
            if env.about and self._report_unsettled(env):
                return 1
            self._outcome = "deferred"  # unless it gets further
            try:
                self.deliver(claim)  # sets _outcome
            except RelayqError as exc:
                self.log.error(f"{qid}: {exc.message}; left in the queue")
                return 1
            except Exception as exc:  # a bug must not stop the rest of the queue
                self.log.error(f"{qid}: delivery failed: {type(exc).__name__}: {exc}; "
                               "left in the queue")
                return 1
            return 0 if claim.finished else 1
        finally:
            claim.release()

    def _report_unsettled(self, env: Envelope) -> bool:
        """A report waits while the message it is about still records it as being
        made: its maker was cut off after committing it (see settle), and will
        find it at that message's next run instead of making another."""
        try:
            about = self.spool.read_envelope(env.about)
        except (OSError, RelayqError):
            return False  # gone (delivered, deleted) or unreadable: nothing to wait for
        return about.notice is not None and about.notice.qid == env.qid

    # -- one message ----------------------------------------------------------

    def deliver(self, claim: Claim) -> list[str]:
        """Try every pending recipient once; returns the DSN codes of new failures.

        The rule that keeps a relay's answers from being lost or repeated:
        each transaction's answers are recorded (in space reserved before
        the relay heard anything) before anything else happens; reports
        (bounces, warnings, postmaster notices) are then derived from the
        recorded state by settle(), which may fail, and be tried again
        later, without a recipient ever being sent twice.
        """
        env = claim.envelope
        now = time.time()
        if claim.was_cut_off() or env.unsure:
            self.log.warning(logline.possible_duplicate(env))
            env.unsure = False
        before = {id(r): r.state for r in env.recipients}
        self._held = []  # the outcome lines wait until the outcome is recorded
        expired = False
        try:
            pending = env.pending()
            if pending:
                self._attempt(claim, pending, now)
                expired = decisions.should_expire(env, now, self.rules)
                if expired:
                    self._expire(claim, now)
        finally:
            self._flush_held()
            self._held = None
        if pending:  # the one place an attempt's outcome is named, and counted on disk
            self._outcome = tally.counted(self.spool.root, self.log, env, before,
                                          self._relay_name, expired, self._failed)
        newly = [r for r in env.recipients if r.state == FAILED and before.get(id(r)) != FAILED]
        if not claim.finished:
            try:
                self.settle(claim, now)
            except Exception as exc:  # recorded already: only the report waits
                why = exc.message if isinstance(exc, RelayqError) else \
                    f"{type(exc).__name__}: {exc}"
                self.log.error(f"{env.qid}: report not made yet ({why}); the recipients' "
                               "outcomes are recorded, the report is tried at the next run")
                self._later(claim, now)
        if not pending:  # only its report was owed (a settle cut off): gone once made
            self._outcome = "sent" if claim.finished else "deferred"
        return [decisions.code(r.reply) for r in newly]

    def _later(self, claim: Claim, now: float) -> None:
        """A report that failed is tried again on the retry schedule, not at once."""
        decisions.later(claim.envelope, now, self.rules, random.random())
        try:
            claim.record()
        except RelayqError:
            pass  # the queue is full: the daemon's rechecks space the tries out

    def _record(self, claim: Claim) -> None:
        """Make the envelope durable, then log the outcome lines it records."""
        env = claim.envelope
        if env.unsettled() or env.dead:
            claim.record()
        else:
            claim.finish()
        self._flush_held()

    def _flush_held(self) -> None:
        held, self._held = self._held, [] if self._held is not None else None
        for line in held or []:
            self.log.info(line)

    def _expire(self, claim: Claim, now: float) -> None:
        env = claim.envelope
        for r, reason in decisions.expire(env, self.rules):
            self._hold_line(logline.expired(env, r, reason, now))
        self._record(claim)

    def _hold_line(self, line: str) -> None:
        if self._held is not None:
            self._held.append(line)  # logged once the outcome is on disk
        else:
            self.log.info(line)

    def _attempt(self, claim: Claim, pending: list[Recipient], now: float) -> None:
        """One attempt: local recipients first (they may add remote ones), then the relay."""
        env = claim.envelope
        start = time.time()
        deferral = ""
        remote = pending
        self._relay_name, self._failed = "", []
        decisions.start_attempt(env, now, self.rules, random.random())
        if self.cfg.local_delivery:
            local = self.local()
            mine = [r for r in pending if local.is_local(r.address)]
            if mine:
                failed, deferral = self._deliver_local(claim, mine, now, start)
                for r in failed:
                    r.remote = False
            remote = [r for r in env.pending() if not local.is_local(r.address)]
        error = ""
        recorded = False
        if remote:
            error, recorded = self._relay(claim, remote, now, start, deferral)
        if claim.finished:
            return
        if env.pending():
            error = decisions.deferred(error or deferral)
            recorded = recorded and env.error == error
            env.error = error
        if not recorded:
            self._record(claim)

    def _relay(self, claim: Claim, pending: list[Recipient], now: float, start: float,
               deferral: str) -> tuple[str, bool]:
        """Send to the smarthost, recording after each transaction.

        Returns why it deferred, and whether the last record holds every outcome.
        """
        from relayq.delivery.smtp_transport import OutgoingMessage

        env = claim.envelope
        journal = Journal(claim, pending, lambda note: self._note(env, note, now, start),
                          lambda: self._record(claim), deferral)
        if env.account and env.account not in self.cfg.accounts():
            return self._no_account(env, pending, journal)
        if self.verbose:
            for r in pending:
                self.verbose(f"{r.address}... Connecting via relay...")
        with claim.open_data() as data:
            msg = OutgoingMessage(
                qid=env.qid,
                sender=env.sender,
                recipients=[(r.address, r.notify, r.orcpt) for r in pending],
                data=data,
                size=os.fstat(data.fileno()).st_size,
                body=env.body,
                smtputf8=env.smtputf8,
                envid=env.envid,
                ret=env.ret,
            )
            transport = self.transport(env.account)
            result = transport.deliver(msg, journal)
        self._relay_name = result.relay or result.tried or \
            next(iter(transport.config.smarthost), "")
        self._failed = result.failed  # each smarthost tried on the way: its last error
        late = journal.commit(result.outcomes, result.relay, result.error, persist=False,
                              tried=result.tried)
        return result.error or journal.error or journal.deferral, journal.commits > 0 and not late

    def _no_account(self, env: Envelope, pending: list[Recipient], journal: Journal,
                    ) -> tuple[str, bool]:
        """Mail queued for an account since removed waits (policy.NO_ACCOUNT_REASON: never
        returned for it, never sent through another account's relay) until
        `relayq requeue --reroute` chooses its account again."""
        from relayq.core.outcome import DEFERRED, Outcome

        reply = (f"451 4.3.5 {policy.NO_ACCOUNT_REASON}: {env.account}; "
                 "run relayq requeue --reroute")
        journal.commit([Outcome(r.address, DEFERRED, reply, "4.3.5") for r in pending],
                       "", persist=False)
        self._relay_name = f"(account {env.account})"  # counted there, not as "local"
        return reply, False

    def _note(self, env: Envelope, note: Note, now: float, start: float) -> None:
        """The sendmail-style log line (and -v line) for one recipient's outcome."""
        line, shown = logline.note(env, note, now, time.time() - start)
        self._hold_line(line)
        if self.verbose:
            self.verbose(shown)

    # -- reports --------------------------------------------------------------

    def settle(self, claim: Claim, now: float) -> None:
        """Make the reports the recorded state owes, each exactly once; then finish.

        A report is made in three recorded steps: its queue id is reserved and
        written into this message's envelope (`notice`), the report is
        committed (naming this message in its `about`), and the recipients it
        covers are marked reported. A crash after the commit finds the report
        by its id instead of making another, and the report is not delivered
        while the notice still names it (see process). A failure here leaves
        the message queued with its reports owed; its recipients are final.
        What is owed is decided by decisions.reports.
        """
        env = claim.envelope
        if env.notice is not None:
            self._make(claim, env.notice, now)
        for step in decisions.reports(env, now, self.rules):
            if step.kind in NOTICE_KINDS:
                self._report(claim, step.kind, step.indices, now)
                continue
            decisions.mark(env, step)
            if step.kind == UNWANTED:  # NOTIFY said no: the sender's choice, logged
                self.log.info(f"{env.qid}: no DSN wanted (NOTIFY) for "
                              f"{len(step.indices)} failed recipient(s)")
            if step.kind != DEAD:  # a dead letter is recorded by its burial
                self._record(claim)
        if not claim.finished and not env.unsettled():
            if env.dead:
                self.spool.bury(claim, env.dead)
                self.log.error(f"{env.qid}: dead letter: {env.dead}; kept in "
                               f"{self.spool.quarantine_dir} (mailq lists it)")
            else:
                claim.finish()

    def _report(self, claim: Claim, kind: str, indices: list[int], now: float) -> None:
        """Step one: the report's queue id, recorded here before the report exists."""
        msg = self.spool.create()
        try:
            claim.envelope.notice = Notice(msg.qid, kind, indices)
            self._record(claim)
        except BaseException:
            claim.envelope.notice = None
            msg.abort()
            raise
        self._make(claim, claim.envelope.notice, now, msg)

    def _make(self, claim: Claim, notice: Notice, now: float,
              msg: NewMessage | None = None) -> None:
        """Steps two and three: commit the report unless it is queued, mark it made."""
        env = claim.envelope
        if not any(i < len(env.recipients) for i in notice.indices):  # a damaged notice
            if msg is not None:
                msg.abort()
            env.notice = None
            self._record(claim)
            return
        if msg is not None or not self.spool.report_queued(notice.qid, env.qid):
            reports.write(self.cfg, self.ctx, self.log, claim, notice, now,
                          msg or self.spool.create(notice.qid))
        decisions.made(env, notice.kind, notice.indices)
        env.notice = None
        self._record(claim)
        self.bounces.append(notice.qid)
