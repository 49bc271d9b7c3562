"""Queue runs: pick what is due, claim it, deliver it, record every recipient.

Every way out (a `-q` run, the background child of a submission, an
interactive submission, the daemon) goes through Runner.deliver(), so the
rules live in one place: a recipient accepted once is never sent again; a
permanent failure produces one RFC 3464 bounce (never for a bounce); mail
still queued after max_queue_age bounces with the last reason.

Routing: with local_delivery on, recipients in local_domains go to
transport/local first (aliases may add remote recipients to the same
envelope, delivered in the same attempt); everything else goes to the
smarthost. With it off (the null client) every recipient is relayed as
submitted, already qualified with `domain`.

Trade-off: the only window for a duplicate is a crash between the relay's
final 250 and the envelope rewrite that records it (one fsync), as in
sendmail and Postfix.
"""

from __future__ import annotations

import os
import random
import time
from typing import TYPE_CHECKING

from relayq.core import address, dsn, policy, selector
from relayq.core.envelope import (
    BOUNCE,
    DOUBLE,
    FAILED,
    PENDING,
    SENT,
    WARNING,
    Envelope,
    NewerFormat,
    Notice,
    Recipient,
)
from relayq.core.errors import DamagedQueueFile, RelayqError
from relayq.system.log import delay

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import BinaryIO

    from relayq.core.config import Config
    from relayq.core.outcome import Outcome
    from relayq.delivery.local_transport import LocalTransport
    from relayq.delivery.smtp_transport import SmtpTransport
    from relayq.queue.spool import Claim, NewMessage, Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log


RECORD = 32  # bytes per queue id in the pipe a queue run's workers share
BATCH = 128  # records a write: 4096 bytes, within PIPE_BUF, so one atomic write


def _die_with(parent: int) -> None:
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


def _chunks(f: BinaryIO, size: int = 1 << 16) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


class Runner:
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
        self._transport: SmtpTransport | None = None
        self._local: LocalTransport | None = None
        self._held: list[str] | None = None  # outcome log lines waiting for the record
        self.bounces: list[str] = []

    def transport(self) -> SmtpTransport:
        if self._transport is None:
            from relayq.delivery.smtp_transport import SmtpTransport

            self._transport = SmtpTransport(self.cfg, transcript=self.verbose, log=self.log.info)
        return self._transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

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
            why = ("lost the relay's reply to the end of the message" if env.unsure
                   else "ended between sending the message and recording the outcome")
            self.log.warning(f"{env.qid}: possible duplicate: an earlier attempt {why}; "
                             "the smarthost may have it already")
            env.unsure = False
        before = {id(r) for r in env.recipients if r.state == FAILED}
        self._held = []  # the outcome lines wait until the outcome is recorded
        try:
            pending = env.pending()
            if pending:
                self._attempt(claim, pending, now)
                if (env.pending() and policy.expired(env.created, now, self.cfg.max_queue_age)
                        and not all(_code(r.reply) == policy.LOOP_STATUS for r in env.pending())):
                    # only after an attempt failed (as Postfix), and never for a loop:
                    # our own configuration's fault is no reason to return the mail
                    self._expire(claim, now)
        finally:
            self._flush_held()
            self._held = None
        newly = [r for r in env.recipients if r.state == FAILED and id(r) not in before]
        if not claim.finished:
            try:
                self.settle(claim, now)
            except Exception as exc:  # recorded already: only the report waits
                why = exc.message if isinstance(exc, RelayqError) else \
                    f"{type(exc).__name__}: {exc}"
                self.log.error(f"{env.qid}: report not made yet ({why}); the recipients' "
                               "outcomes are recorded, the report is tried at the next run")
                self._later(claim, now)
        return [_code(r.reply) for r in newly]

    def _later(self, claim: Claim, now: float) -> None:
        """A report that failed is tried again on the retry schedule, not at once."""
        env = claim.envelope
        env.next_try = max(env.next_try, now + policy.next_delay(
            max(1, env.attempts), self.cfg.retry_min, self.cfg.retry_max, random.random()))
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
        age = self.cfg.max_queue_age
        span = (f"{age / 86400:g} days" if age >= 86400 and age % 3600 == 0
                else f"{age / 3600:g} hours" if age >= 3600 and age % 60 == 0
                else f"{age:g} seconds")
        for r in env.pending():
            reason = r.reply or env.error or "no delivery attempt succeeded"
            r.state = FAILED
            r.remote = False  # our decision, quoting the last reason
            r.reply = f"4.4.7 Message could not be delivered for {span}: {reason}"
            self._hold_line(
                f"{env.qid}: to=<{r.address}>, delay={delay(now - env.created)}, "
                f"mailer=relay, dsn=4.4.7, stat=Expired: {reason}"
            )
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
        env.attempts += 1
        env.last_try = now
        env.next_try = now + policy.next_delay(
            env.attempts, self.cfg.retry_min, self.cfg.retry_max, random.random()
        )
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
            error = "Deferred: " + (error or deferral)
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
        if self.verbose:
            for r in pending:
                self.verbose(f"{r.address}... Connecting via relay...")
        journal = _Journal(self, claim, pending, now, start, deferral)
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
            result = self.transport().deliver(msg, journal)
        late = journal.commit(result.outcomes, result.relay, result.error, persist=False)
        return result.error or journal.error or journal.deferral, journal.commits > 0 and not late

    def _note(self, env: Envelope, r: Recipient, now: float, start: float, mailer: str,
              status: str, reply: str, dsn_code: str) -> None:
        """The sendmail-style log line (and -v line) for one recipient's outcome."""
        head = (
            f"{env.qid}: to=<{r.address}>, delay={delay(now - env.created)}, "
            f"xdelay={delay(time.time() - start)}, mailer={mailer}, dsn={dsn_code}"
        )
        if status == "sent":
            line = f"{head}, stat=Sent ({_text(reply)})"
            shown = f"Sent ({_text(reply)})"
        elif status == "failed":
            line = f"{head}, stat={reply}"
            shown = reply
        else:
            line = f"{head}, stat=Deferred: {reply}"
            shown = f"Deferred: {reply}"
        self._hold_line(line)
        if self.verbose:
            self.verbose(f"{r.address}... {shown}")

    # -- local recipients -----------------------------------------------------

    def local(self) -> LocalTransport:
        if self._local is None:
            from relayq.delivery.local_transport import LocalTransport

            domains = self.cfg.local_domains or self.ctx.local
            self._local = LocalTransport(self.cfg, self.ctx.domain, domains)
        return self._local

    def _deliver_local(
        self, claim: Claim, mine: list[Recipient], now: float, start: float
    ) -> tuple[list[Recipient], str]:
        """Expand and deliver local recipients; returns (failed, first deferral reply).

        An alias becomes new pending recipients (remote addresses and local
        targets) and is itself marked sent, "expanded to ...". Each local
        write is recorded at once, so a crash repeats at most the one write
        in flight. Failures are applied last, after every successful write
        was recorded: a failure on disk always has its bounce (made by
        deliver() before the final record).
        """
        from relayq.delivery import local_transport as lt

        env = claim.envelope
        transport = self.local()
        failures: list[tuple[Recipient, str]] = []
        added_failed: list[Recipient] = []
        deferral = ""
        known = {r.address for r in env.recipients}
        jobs: list[tuple[Recipient, lt.LocalTarget]] = []
        for r in mine:
            if lt.is_record(r.address):
                continue
            exp = transport.expand(r.address)
            if exp.status == "deliver" and exp.direct is not None:
                jobs.append((r, exp.direct))
            elif exp.status == "deferred":
                r.reply = exp.reply
                deferral = deferral or exp.reply
                self._note(env, r, now, start, "local", "deferred", exp.reply, _code(exp.reply))
            elif exp.status == "failed":
                failures.append((r, exp.reply))
            else:
                orcpt = r.orcpt or lt.orcpt_for(r.address)
                for rec in exp.records:
                    if rec not in known:
                        known.add(rec)
                        env.recipients.append(Recipient(rec, notify=r.notify, orcpt=orcpt))
                for name in exp.unknown:
                    addr = f"{name}@{address.split(r.address)[1] or self.ctx.domain}"
                    if addr not in known:
                        known.add(addr)
                        bad = Recipient(addr, PENDING, r.notify, orcpt)
                        added_failed.append(bad)
                        failures.append((bad, f"550 5.1.1 <{addr}>... User unknown"))
                r.state = SENT
                r.reply = _expanded(exp.records)
                self._note(env, r, now, start, "local", "sent", r.reply, "2.1.5")
        trusted: dict[str, lt.LocalTarget] | None = None
        for r in env.pending():
            if not lt.is_record(r.address):
                continue
            if trusted is None:
                originals = [
                    x.address for x in env.recipients
                    if x.state != FAILED and not lt.is_record(x.address)
                    and transport.local_part(x.address) is not None
                ]
                trusted = transport.trusted_targets(originals)
            target = trusted.get(r.address)
            if target is None:
                failures.append((r, f"550 5.1.1 <{r.address}>... User unknown "
                                    "(no alias of this message names it now)"))
            else:
                jobs.append((r, target))
        if jobs:
            claim.record()  # the expansions, before anything is written
            with claim.open_data() as data:
                for r, target in jobs:
                    to = r.address
                    if lt.is_record(r.address):
                        to = lt.delivered_to(r.address, r.orcpt, target, self.ctx.domain)
                    out = transport.deliver(target, data, sender=env.sender, recipient=to,
                                            now=now)
                    self._note(env, r, now, start, "local", out.status, out.reply, out.dsn_code)
                    if out.status == "sent":
                        r.state = SENT
                        r.reply = out.reply
                        claim.record()
                    elif out.status == "failed":
                        failures.append((r, out.reply))
                    else:
                        r.reply = out.reply
                        deferral = deferral or out.reply
        env.recipients.extend(added_failed)
        failed = []
        for r, reply in failures:
            r.state = FAILED
            r.reply = reply
            failed.append(r)
            self._note(env, r, now, start, "local", "failed", reply, _code(reply))
        return failed, deferral

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
        """
        env = claim.envelope
        if env.notice is not None:
            self._make(claim, env.notice, now)
        owed = env.owed()
        if owed:
            self._owe(claim, owed, now)
        if (self.cfg.delay_warning and not env.warned and env.pending()
                and dsn.should_bounce(env) and now - env.created >= self.cfg.delay_warning):
            delayed = [i for i, r in enumerate(env.recipients)
                       if r.state == PENDING and dsn.wanted(r, "delayed")]
            if delayed:
                self._report(claim, WARNING, delayed, now)
            else:
                env.warned = True
                self._record(claim)
        if not claim.finished and not env.unsettled():
            if env.dead:
                self.spool.bury(claim, env.dead)
                self.log.error(f"{env.qid}: dead letter: {env.dead}; kept in "
                               f"{self.spool.quarantine_dir} (mailq lists it)")
            else:
                claim.finish()

    def _owe(self, claim: Claim, owed: list[int], now: float) -> None:
        """Decide who is told about the failures at `owed`, then tell them."""
        env = claim.envelope
        if dsn.should_bounce(env):
            wanted = [i for i in owed if dsn.wanted(env.recipients[i], "failed")]
            if wanted:
                self._report(claim, BOUNCE, wanted, now)
            if len(wanted) < len(owed):  # NOTIFY said no: the sender's choice, logged
                self.log.info(f"{env.qid}: no DSN wanted (NOTIFY) for "
                              f"{len(owed) - len(wanted)} failed recipient(s)")
                env.reported.update(i for i in owed if i not in wanted)
                self._record(claim)
        elif env.double_bounce:  # a notice to the postmaster that failed: nobody is left
            env.reported.update(owed)
            env.dead = (f"undeliverable notice to the postmaster "
                        f"<{env.recipients[owed[0]].address}>: {env.recipients[owed[0]].reply}")
        else:  # a bounce or the null sender's mail failed: the postmaster is told
            self._report(claim, DOUBLE, owed, now)

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
            self._write_report(claim, notice, now, msg or self.spool.create(notice.qid))
        if notice.kind == WARNING:
            env.warned = True
        else:
            env.reported.update(notice.indices)
        env.notice = None
        self._record(claim)
        self.bounces.append(notice.qid)

    def _write_report(self, claim: Claim, notice: Notice, now: float, msg: NewMessage) -> None:
        """Queue the RFC 3464 report `notice` describes, under its recorded queue id."""
        env = claim.envelope
        chosen = [env.recipients[i] for i in notice.indices if i < len(env.recipients)]
        failed = chosen if notice.kind != WARNING else []
        delayed = chosen if notice.kind == WARNING else []
        double = notice.kind == DOUBLE
        to = env.sender
        about = env
        if double:  # to the postmaster, about a message that cannot be returned
            to = address.qualify(self.cfg.postmaster or "postmaster", self.ctx.domain)
            about = Envelope(env.qid, to, env.recipients, env.created)
            about.size, about.msgid, about.user = env.size, env.msgid, env.user
            about.last_try, about.error = env.last_try, env.error
        eight_bit = False
        try:
            with claim.open_data() as data:
                for chunk in dsn.build(
                    env=about,
                    failed=failed,
                    delayed=delayed,
                    reporting_mta=self.ctx.fqdn,
                    postmaster_domain=self.ctx.domain,
                    original=_chunks(data),
                    original_size=env.size,
                    now=now,
                    tz_offset=-time.timezone,
                    boundary=dsn.boundary(msg.qid, now),
                    remote_mta=env.relay,
                    # refused for its size: the same relay would refuse it inside a report
                    max_full=0 if any(_code(r.reply) in ("5.3.4", "5.2.3") for r in chosen)
                    else 1_000_000,
                ):
                    eight_bit = eight_bit or not chunk.isascii()
                    msg.write(chunk)
            report = Envelope(msg.qid, "", [Recipient(to)], now)
            report.is_dsn = True
            report.double_bounce = double
            report.about = env.qid
            report.size = msg.size
            report.body = "8BITMIME" if eight_bit else "7BIT"  # 7-bit unless an address is UTF-8
            report.smtputf8 = address.needs_smtputf8(to)
            report.user = "MAILER-DAEMON"
            msg.commit(report)
        except BaseException:
            msg.abort()
            raise
        msg.release()
        if double:
            what = f"undeliverable {'bounce' if env.is_dsn else 'mail from <>'}, " \
                   f"copy to the postmaster <{to}>"
        elif failed:
            what = f"DSN: {_text(failed[0].reply)}"
        else:
            what = f"delay warning: {_text(delayed[0].reply or env.error)}"
        self.log.info(f"{msg.qid}: {env.qid}: {what}")
        self.log.info(
            f"{msg.qid}: from=<>, size={report.size}, class=0, nrcpts=1, relay=MAILER-DAEMON"
        )

    # -- a queue run ----------------------------------------------------------

    def run(
        self,
        *,
        force: bool,
        selectors: list[selector.Selector] | None = None,
        workers: int = 1,
    ) -> int:
        """Deliver what is due (everything when force); returns how many messages remain.

        With workers > 1 the queue is shared by that many processes, each with
        its own connection to the smarthost. -v keeps one worker so the dialogue
        reads in order.
        """
        sels = selectors or []
        self.take_drops()
        if workers > 1 and not self.verbose:
            return self._run_parallel(force, sels, workers)
        names = self.spool.names()
        try:
            self.spool.sweep(names=names)
        except OSError as exc:
            self.log.warning(f"queue sweep failed: {exc}")
        ids = self.spool.ids(names)
        del names
        left = 0
        for n, qid in enumerate(ids, 1):
            if self.verbose:
                self.verbose(f"Running {self.spool.queue}/{qid} (sequence {n} of {len(ids)})")
            left += self.process(qid, force, sels)
        return left + self.deliver_bounces()

    def take_drops(self) -> None:
        """Users' mail waiting in maildrop/ (no daemon took it) joins the queue first."""
        if not os.path.isdir(self.spool.maildrop) or not self.spool.writable():
            return
        from relayq.queue.maildrop import Taker

        try:
            Taker(self.cfg, self.spool, self.log, self.ctx).take_all()
        except OSError as exc:
            self.log.error(f"maildrop: {exc}")

    def _run_parallel(self, force: bool, sels: list[selector.Selector], workers: int) -> int:
        """Share the queue among forked workers (processes, not threads: the work
        per message is mostly Python, and threads would queue on the GIL).

        The directory is read as a stream and each queue id is written to one
        pipe all the workers read, in fixed-size records (a read of one record
        from a pipe is never split, so each id goes to exactly one worker, and
        a worker busy with a slow message takes no more until it is done). The
        first delivery does not wait for the whole directory (at 100,000
        messages a listing and sort cost 0.2 s), nothing the size of the queue
        is held in memory, and a worker is forked only when there is work for
        it. The order is the directory's: every due message is tried in the run.
        """
        r, w = os.pipe()
        children: dict[int, int] = {}  # pid -> read end of its result pipe
        counts: dict[str, int] = {}
        batch: list[bytes] = []
        try:
            for qid in self.spool.stream_ids(counts):
                if len(qid) >= RECORD:
                    continue  # not one of our ids
                if len(children) < workers:
                    self._fork_worker(r, w, children, force, sels)
                batch.append(qid.encode().ljust(RECORD - 1) + b"\n")
                if len(batch) >= BATCH or len(children) < workers:
                    os.write(w, b"".join(batch))  # at most PIPE_BUF: never interleaved
                    batch = []
            if batch:
                os.write(w, b"".join(batch))
        except BrokenPipeError:
            self.log.error("queue run: every worker died; the rest waits for the next run")
        finally:
            os.close(w)
            os.close(r)
        if self.spool.debris_suspected(counts):
            try:
                self.spool.sweep()  # debris of a crashed writer somewhere: look closer
            except (OSError, RelayqError) as exc:
                self.log.warning(f"queue sweep failed: {exc}")
        left = 0
        for pid, res in children.items():
            with os.fdopen(res, "rb") as f:
                out = f.read()
            os.waitpid(pid, 0)
            left += int(out) if out.isdigit() else 1  # a worker that died: assume mail left
        return left

    def _fork_worker(self, ids: int, feed: int, children: dict[int, int], force: bool,
                     sels: list[selector.Selector]) -> None:
        res_r, res_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            _die_with(parent)
            os.close(feed)  # else the pipe never reaches end of file
            os.close(res_r)
            for other in children.values():
                os.close(other)
            code, left = 0, 0
            try:
                runner = Runner(self.cfg, self.spool, self.log, self.ctx)
                try:
                    while record := os.read(ids, RECORD):
                        left += runner.process(record.decode("ascii", "replace").strip(),
                                               force, sels)
                    left += runner.deliver_bounces()
                finally:
                    runner.close()
            except BaseException as exc:
                self.log.error(f"queue run worker failed: {type(exc).__name__}: {exc}")
                code, left = 1, left + 1
            try:
                os.write(res_w, str(left).encode())
            finally:
                os._exit(code)
        os.close(res_w)
        children[pid] = res_r

    def deliver_bounces(self) -> int:
        """Send the bounces this runner created, over the same connection."""
        left = 0
        while self.bounces:
            left += self.process(self.bounces.pop(0), True, [])
        return left

    def process(self, qid: str, force: bool, selectors: list[selector.Selector]) -> int:
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
            try:
                self.deliver(claim)
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


class _Journal:
    """What the transport reports to, around each transaction (see SmtpTransport.deliver).

    begin() reserves the record of the transaction's outcome before the relay
    hears anything (refusing, and so not sending, when the queue cannot hold
    it); commit() applies the relay's answers to the envelope and records
    them at once, so that neither a later transaction nor anything after the
    message (a bounce that cannot be written, a crash) can resend them.
    """

    def __init__(self, runner: Runner, claim: Claim, pending: list[Recipient], now: float,
                 start: float, deferral: str) -> None:
        self.runner = runner
        self.claim = claim
        self.pending = pending
        self.now = now
        self.start = start
        self.deferral = deferral
        self.applied: dict[int, Outcome] = {}
        self.commits = 0  # records made
        self.error = ""  # why some recipients wait, as the transport put it

    def begin(self, indices: list[int]) -> None:
        self.claim.mark_sending(len(indices))

    def commit(self, outcomes: Sequence[Outcome | None], relay: str, error: str = "",
               persist: bool = True) -> bool:
        """Apply what is new; record it when `persist`. True if anything was new."""
        runner, env = self.runner, self.claim.envelope
        changed = False
        for i, out in enumerate(outcomes):
            if out is None or self.applied.get(i) is out:
                continue
            self.applied[i] = out
            changed = True
            r = self.pending[i]
            shown = f", relay={relay}" if relay else ""
            runner._note(env, r, self.now, self.start, f"relay{shown}", out.status, out.reply,
                         out.dsn_code)
            r.reply = out.reply
            r.remote = out.remote
            env.unsure = env.unsure or out.unsure
            if out.status == "sent":
                r.state = SENT
            elif out.status == "failed":
                r.state = FAILED
            else:
                self.deferral = self.deferral or out.reply
        if relay:
            env.relay = relay.split(" [", 1)[0]
        self.error = error or self.error
        if changed and persist and not self.claim.finished:
            if env.pending():
                env.error = "Deferred: " + (self.error or self.deferral)
            runner._record(self.claim)
            self.commits += 1
        return changed


def _code(reply: str) -> str:
    return dsn.status_code(reply)


def _expanded(records: list[str]) -> str:
    """The reply recorded for an expanded alias (shown by mailq and in the log)."""
    text = ", ".join(records)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"250 2.1.5 expanded to {text}"


def _text(reply: str) -> str:
    """The reply without its numeric codes, as sendmail's stat=Sent (...) shows it."""
    parts = reply.split(" ", 2)
    if len(parts) == 3 and parts[0].isdigit() and parts[1][:1].isdigit() and "." in parts[1]:
        return parts[2]
    if len(parts) >= 2 and parts[0].isdigit():
        return reply.split(" ", 1)[1]
    return reply

