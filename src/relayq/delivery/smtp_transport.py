"""The SMTP transport: deliver queued messages to the configured smarthost(s).

It owns the policy between a message and a relay: which hosts and addresses
to try (smtp_connect: MX lookups with dnspython), the TLS and AUTH rules,
connection reuse across messages of one queue run, and the transactions of a
message (smtp_transaction), which turn every reply into a per-recipient
outcome. It knows nothing of the spool: the runner hands in an
OutgoingMessage and records the MessageResult.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from relayq.core import policy
from relayq.core.errors import RelayqError
from relayq.core.oauth2 import looks_like_token
from relayq.core.outcome import DEFERRED, Outcome
from relayq.delivery import limits as lim
from relayq.delivery import oauth2
from relayq.delivery import smtp_transaction as tx
from relayq.delivery.smtp_connect import MailLoop, Target, loop_reason, read_secret, targets
from relayq.delivery.smtp_transaction import OutgoingMessage
from relayq.smtp.client import (
    AuthFailed,
    ConnectFailed,
    SmtpClient,
    SmtpError,
    TlsFailed,
    auth_allowed,
    tls_context,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from relayq.core.config import Config, Smarthost
    from relayq.delivery.oauth2 import TokenSource

# the names callers and tests import from here
__all__ = ["Journal", "MailLoop", "MessageResult", "OutgoingMessage", "SmtpTransport",
           "loop_reason"]


class Journal(Protocol):
    """Told about each transaction (the runner records through it; see deliver)."""

    def begin(self, indices: list[int]) -> None:
        """Before a transaction for these recipients; raising RelayqError sends nothing."""

    def commit(self, outcomes: Sequence[Outcome | None], relay: str, error: str) -> object:
        """After a transaction: the outcomes so far (and why some wait, as
        MessageResult.error), to be made durable before going on."""

    def hold_until(self, when: float) -> None:
        """A sending limit keeps recipients back until `when`: their next try then,
        not the retry schedule's (recorded with the next commit)."""


@dataclass
class MessageResult:
    outcomes: list[Outcome]
    error: str = ""  # why (some of) the message was deferred; "" if nothing was
    relay: str = ""  # "mail.example.org [192.0.2.1]" of the server that answered
    tried: str = ""  # the host tried last when none answered (the log's relay=)
    # every target whose connection or setup failed on the way, (relay, error): a dead
    # primary is visible in the statistics even when a backup took the message
    failed: list[tuple[str, str]] = field(default_factory=list)


class SmtpTransport:
    """Delivers messages over one cached connection per queue run.

    If no smarthost could be reached, the failure is remembered and every
    later deliver() defers at once with the same reason (sendmail's host
    status, Postfix's dead-host cache), so a queue of 1000 messages does not
    make 1000 connection attempts to a dead relay. The memory lasts DOWN_FOR
    seconds: a daemon's long-lived transport tries the relay again after it.

    The account's limits (relayq.delivery.limits) hold for every transaction:
    what would pass messages_per_minute or recipients_per_day is deferred, with
    its next try when the limit frees, and a connection needs one of
    max_connections slots. A `patient` transport (a queue run's) waits for a
    limit that frees within limits.WAIT seconds, and up to limits.SLOT_WAIT for
    a slot; a submission's never waits.
    """

    DOWN_FOR = 60.0

    def __init__(
        self,
        config: Config,
        *,
        transcript: Callable[[str], None] | None = None,
        log: Callable[[str], None] | None = None,
        patient: bool = False,
    ) -> None:
        self.config = config
        self.patient = patient
        self.limits = lim.Limits(config, log=self._say)
        self._slot: lim.Slot | None = None  # held while a connection is wanted
        self.transcript = transcript
        self.log = log
        self._client: SmtpClient | None = None
        self._down: SmtpError | None = None
        self._down_until = 0.0
        self._tried = ""  # "host [ip]" tried last, for the log of a failed connection
        self._failed: list[tuple[str, str]] = []  # this deliver()'s failed targets
        self._qid = ""  # the message being delivered: its id starts each log line
        self._secret: str | None = None
        self._secret_error: AuthFailed | None = None
        self._secret_at = 0.0  # monotonic time the secret (or its error) was read
        self._tokens: TokenSource | None = None  # oauth2_provider's access tokens
        self._deadline: float | None = None  # the session setup's, for a token request
        self._ehlo_name = ""
        self._tls: ssl.SSLContext | None = None
        self._grant: lim.Grant | None = None  # the transaction in flight's reservation
        self.connections = 0  # connections opened (for tests and statistics)
        self.chosen = ""  # the AUTH mechanism chosen last (relayq test shows it)

    # --- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """QUIT the cached connection, if any."""
        if self._client is not None:
            self._client.quit()
            self._client = None
        self._release()

    def _release(self) -> None:
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def __enter__(self) -> SmtpTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _say(self, line: str) -> None:
        """A log line, about the message being delivered (its queue id first, as
        sendmail writes every line about a message)."""
        if self.log is not None:
            self.log(f"{self._qid}: {line}" if self._qid else line)

    # --- delivery -------------------------------------------------------------

    def deliver(self, msg: OutgoingMessage, journal: Journal | None = None) -> MessageResult:
        """Try every recipient of `msg`; one Outcome per recipient, in order.

        With `journal`, each transaction is announced (begin) and its outcomes
        handed over (commit) before the next one starts: a message split over
        several transactions (max_recipients, or a relay's 452/552 "too many
        recipients") never has an accepted transaction depend on a later one.
        An exception from commit() ends the delivery at once.
        """
        n = len(msg.recipients)
        if n == 0:
            return MessageResult([])
        self._qid = msg.qid
        self._failed = []
        try:
            result = self._deliver(msg, journal, n)
            result.failed = self._failed
            return result
        finally:
            self._qid, self._failed = "", []

    def _deliver(self, msg: OutgoingMessage, journal: Journal | None, n: int) -> MessageResult:
        if self._down is not None and time.monotonic() >= self._down_until:
            self._down = None  # aged out: try the relay again
        if self._down is not None:
            return self._all_deferred(msg, self._down, "")
        kept = self._admission(msg, journal, n)
        if kept is not None:
            return kept
        reused = self._client is not None
        client = self._ready_client()
        if client is None:
            assert self._down is not None
            return self._all_deferred(msg, self._down, "")
        outcomes: list[Outcome | None] = [None] * n
        error = ""
        try:
            early = tx.precheck(client, msg)
            if early is not None:
                return MessageResult([early(a) for a, _, _ in msg.recipients], "", client.relay)
            step = self.config.max_recipients or n
            todo = list(range(n))
            while todo:
                batch, todo = todo[:step], todo[step:]
                grant = self._reserve(len(batch))
                if grant.count < len(batch):  # the rest when the limit frees
                    error = self._hold(msg, batch[grant.count:] + todo, grant, outcomes, journal)
                    batch, todo = batch[:grant.count], []
                    if not batch:
                        break
                if journal is not None:
                    try:
                        journal.begin(batch)
                    except RelayqError as exc:
                        self.limits.settle(grant, 0)
                        error = f"4.3.0 not sent: {exc.message}"
                        for i in [*batch, *todo]:
                            outcomes[i] = Outcome(msg.recipients[i][0], DEFERRED, error, "4.3.0")
                        break
                reset = client.dirty
                if reset and not client.caps.pipelining:
                    client.rset()
                    reset = False
                self._grant = grant
                err, accepted, again = tx.transaction(self.config, client, msg, batch, outcomes,
                                                       reset)
                self._grant = None
                if again and accepted:  # too many recipients: the rest in the next one
                    step = min(step, accepted)
                    todo = again + todo
                else:
                    error = error or err
                if journal is not None:  # the relay's answer first: nothing runs before
                    journal.commit(outcomes, client.relay, error)  # it is durable
                self.limits.settle(grant, accepted)  # never raises (at worst over-counts)
        except SmtpError as exc:
            client.close()
            self._client = None
            if self._grant is not None and not any(o is not None and o.unsure for o in outcomes):
                self.limits.settle(self._grant, 0)  # nothing taken; past the dot it counts
            self._grant = None
            if reused and all(o is None for o in outcomes) and not isinstance(exc, MailLoop):
                # a cached connection the relay closed while idle (its FIN not seen
                # yet): nothing of this message was answered, so nothing was taken;
                # once more on a fresh connection, as Postfix's connection cache does
                self._say(f"cached connection to {client.relay} lost ({exc}); reconnecting")
                return self._deliver(msg, journal, n)
            self._release()
            error = str(exc)
            for i, (addr, _, _) in enumerate(msg.recipients):
                if outcomes[i] is None:
                    outcomes[i] = Outcome(addr, DEFERRED, str(exc), exc.dsn_code)
        final = [o for o in outcomes if o is not None]
        assert len(final) == n
        if not error:
            error = next((o.reply for o in final if o.status == DEFERRED), "")
        return MessageResult(final, error, client.relay)

    # --- limits -----------------------------------------------------------------

    def _admission(self, msg: OutgoingMessage, journal: Journal | None, n: int
                   ) -> MessageResult | None:
        """Before connecting: a result deferring the whole message when a sending limit
        or a lack of connection slots keeps it back, else None (go on)."""
        cfg = self.config
        first = min(n, cfg.max_recipients or n)
        while True:
            grant = self.limits.check(first)
            if grant.count or not self._wait(grant):
                break
        if not grant.count:
            outcomes: list[Outcome | None] = [None] * n
            error = self._hold(msg, list(range(n)), grant, outcomes, journal)
            return MessageResult([o for o in outcomes if o is not None], error)
        if self._client is None and self._slot is None:
            self._slot = lim.take_slot(cfg, lim.SLOT_WAIT if self.patient else 0.0)
            if self._slot is None:
                reply = lim.no_slot(cfg)
                self._say(reply)
                if journal is not None:
                    journal.hold_until(time.time() + lim.SLOT_RETRY)
                outs = [Outcome(a, DEFERRED, reply, "4.7.0") for a, _, _ in msg.recipients]
                return MessageResult(outs, reply)
        return None

    def _reserve(self, n: int) -> lim.Grant:
        """Count a transaction of `n` recipients in the account's limits, waiting
        (patient only) for one that frees soon."""
        while True:
            grant = self.limits.reserve(n)
            if grant.count or not self._wait(grant):
                return grant

    def _wait(self, grant: lim.Grant) -> bool:
        """Sleep until a limit frees if this transport may wait that long; True if it did."""
        delay = grant.free_at - time.time()
        if not self.patient or delay > lim.WAIT:
            return False
        self._say(f"{grant.which} = {grant.limit} of account {self.config.account} reached; "
                  f"waiting {max(delay, 0):.0f} s")
        time.sleep(max(delay, 0.0) + 0.01)
        return True

    def _hold(self, msg: OutgoingMessage, idx: list[int], grant: lim.Grant,
              outcomes: list[Outcome | None], journal: Journal | None) -> str:
        """Defer recipients `idx` until the limit frees (never a failure: the reply is
        one of policy.OUR_WAITS); the reply, which the log also gets."""
        now = time.time()
        reply = lim.refusal(grant, self.config.account, now)
        for i in idx:
            outcomes[i] = Outcome(msg.recipients[i][0], DEFERRED, reply, "4.7.0")
        self._say(f"{len(idx)} of {len(msg.recipients)} recipient(s) deferred: {reply}")
        if journal is not None:  # within the retry schedule's reach (policy.due)
            journal.hold_until(min(grant.free_at, now + self.config.retry_max))
        return reply

    def _all_deferred(self, msg: OutgoingMessage, exc: SmtpError, relay: str) -> MessageResult:
        outs = [Outcome(a, DEFERRED, str(exc), exc.dsn_code) for a, _, _ in msg.recipients]
        return MessageResult(outs, str(exc), relay, self._tried)

    # --- connections ------------------------------------------------------------

    def _ready_client(self) -> SmtpClient | None:
        """The cached connection if it is still alive and quiet, else a new one."""
        if self._client is not None:
            self._client.clear_deadline()  # the last message's; the next sets its own
            try:  # alive and quiet? Its RSET then rides with the next MAIL
                self._client.ensure_quiet("RSET")
                self._client.dirty = True
                return self._client
            except SmtpError as exc:
                self._say(f"cached connection to {self._client.relay} unusable: {exc}")
                self._client.close()
                self._client = None
        try:
            self._client = self._connect()
        except SmtpError as exc:
            self._down, self._down_until = exc, time.monotonic() + self.DOWN_FOR
            self._release()
            return None
        return self._client

    def _connect(self) -> SmtpClient:
        cfg = self.config
        last: SmtpError | None = None
        self._tried = ""
        for sh in cfg.smarthosts():
            try:
                found = targets(cfg, sh.host, sh.port, sh.mx, self._say)
            except SmtpError as exc:
                self._say(str(exc))
                self._tried = sh.host
                self._failed.append((sh.host, str(exc)))
                last = exc
                continue
            for t in found:
                client = self.client_for(sh, t)
                try:
                    self.connections += 1
                    client.set_deadline(cfg.session_deadline, "connection setup")
                    self.open_session(client, t)
                    client.clear_deadline()
                    return client
                except SmtpError as exc:
                    if client.sock is not None:
                        client.quit()
                    client.close()
                    self._tried = client.relay
                    self._failed.append((client.relay, str(exc)))
                    if isinstance(exc, ConnectFailed):  # sendmail's words (LogLevel 12)
                        self._say(f"makeconnection ({client.relay}:{t.port}) failed: {exc}")
                    else:
                        self._say(f"{client.relay}:{t.port}: {exc}")
                    last = exc
        if last is None:
            last = ConnectFailed("no smarthost configured")
        raise last

    def client_for(self, sh: Smarthost, t: Target) -> SmtpClient:
        """A client for one address of a smarthost (delivery and `relayq test`)."""
        # the certificate must name the configured host, never the MX
        # target an unauthenticated DNS answer chose (Postfix's "secure")
        cfg = self.config
        return SmtpClient(t.name, t.port, timeout=cfg.timeout,
                          connect_timeout=cfg.connect_timeout,
                          transcript=self.transcript, log=self._say, tls_name=sh.host)

    def open_session(self, client: SmtpClient, t: Target) -> None:
        """Connect, greet, secure and authenticate, following the TLS and AUTH policy."""
        cfg = self.config
        mode = cfg.tls
        self.chosen = ""
        greeting = client.connect(t.family, t.sockaddr,
                                  self.client_tls() if mode == "implicit" else None)
        reply = client.ehlo(self.ehlo_name())
        loop = loop_reason(client.peer_ip, t.port, cfg.listen, self.ehlo_name(), greeting, reply)
        if loop:  # before STARTTLS and AUTH: never our password to ourselves
            raise MailLoop(f"{policy.LOOP_REASON} ({loop})")
        if mode in ("required", "opportunistic"):
            if client.caps.starttls:
                client.starttls(self.client_tls())
                client.ehlo(self.ehlo_name())
            elif mode == "required":
                raise TlsFailed(f"TLS is required but {client.where} does not offer STARTTLS")
        if cfg.user:
            if not auth_allowed(client.tls, client.peer_ip):
                raise AuthFailed(
                    f"refusing to send AUTH to {client.where} in clear text"
                    " (set tls = \"required\" or \"implicit\")")
            self._deadline = client.deadline
            secret = self.secret()
            mech = self.mechanism(client, secret)
            try:
                client.auth(mech, cfg.user, secret)
            except AuthFailed as exc:
                # an expired token (535): read the secret again and try once more,
                # unless it is unchanged (a second refusal of the same secret is no news)
                if exc.code != 535 or not self._refresh_secret(secret):
                    raise
                self._say(f"AUTH {mech} refused by {client.relay}; trying once more with "
                          "a freshly read secret")
                client.auth(mech, cfg.user, self.secret())

    def mechanism(self, client: SmtpClient, secret: str) -> str:
        """auth_mechanism, else the best offered for the secret: XOAUTH2 (both big
        providers document it), then OAUTHBEARER, for a token; PLAIN, then LOGIN,
        for a password. A token never goes as a password when OAuth2 is configured;
        a password_command's output that only looks like one may, if the relay
        offers nothing else (as before it was told apart). A password or
        password_file is a password, however long: never sent as a token."""
        offered = client.caps.auth
        cfg = self.config
        want = cfg.auth_mechanism
        if want:
            if offered and want not in offered:
                raise AuthFailed(f"{client.where} does not offer AUTH {want} "
                                 f"(offers {' '.join(offered)})")
            self.chosen = want
            return want
        if not offered:
            raise AuthFailed(f"AUTH is configured but {client.where} does not offer AUTH")
        oauth = bool(cfg.oauth2_provider)
        token = oauth or (bool(cfg.password_command) and not (cfg.password or cfg.password_file)
                          and looks_like_token(secret))
        order: tuple[str, ...] = ("XOAUTH2", "OAUTHBEARER") if token else ()
        if not oauth:
            order += ("PLAIN", "LOGIN")
        for mech in order:
            if mech in offered:
                self.chosen = mech
                return mech
        if oauth:
            raise AuthFailed(f"{client.where} offers no OAuth2 mechanism, XOAUTH2 or "
                             f"OAUTHBEARER ({' '.join(offered)})")
        raise AuthFailed(f"{client.where} offers no usable AUTH mechanism "
                         f"({' '.join(offered)})")

    def client_tls(self) -> ssl.SSLContext:
        if self._tls is None:
            cfg = self.config
            self._tls = tls_context(ca_file=cfg.ca_file, verify=cfg.tls_verify,
                                    client_cert=cfg.client_cert, client_key=cfg.client_key)
        return self._tls

    def ehlo_name(self) -> str:
        """ehlo_name, else this host's FQDN (as sendmail's $j), else the mail domain.

        The FQDN comes from /etc/hosts first; DNS (getfqdn) only as a last resort,
        since it can stall.
        """
        if not self._ehlo_name:
            from relayq.system import hostname

            self._ehlo_name = hostname.smtp_name(self.config.ehlo_name, self.config.domain)
        return self._ehlo_name

    def secret(self) -> str:
        """password, password_file or password_command, kept while it is fresh.

        A password_command (an OAuth2 access token lives about an hour) runs
        again for a connection opened more than password_command_max_age after
        it last ran; a failure is remembered for DOWN_FOR seconds at most.
        """
        cfg = self.config
        if cfg.oauth2_provider:
            return self._token()
        age = time.monotonic() - self._secret_at
        if cfg.password_command and self._secret is not None \
                and age >= cfg.password_command_max_age:
            self._secret = None
        if self._secret_error is not None and age >= self.DOWN_FOR:
            self._secret_error = None
        if self._secret is not None:
            return self._secret
        if self._secret_error is not None:
            raise self._secret_error
        self._secret_at = time.monotonic()
        try:
            self._secret = read_secret(cfg)
        except AuthFailed as exc:
            self._secret_error = exc
            raise
        return self._secret

    def _refresh_secret(self, refused: str) -> bool:
        """After a 535: read a file or command secret again; True if it changed."""
        cfg = self.config
        if cfg.oauth2_provider:  # a refused access token: one from the endpoint (ReauthNeeded
            # and AuthFailed propagate, remembered as secret()'s: the 535 says nothing more)
            try:
                return self.tokens().access_token(True, timeout=self._time_left()) != refused
            except AuthFailed as exc:
                self._secret_error, self._secret_at = exc, time.monotonic()
                raise
        if not (cfg.password_file or cfg.password_command):
            return False
        self._secret = self._secret_error = None
        try:
            return self.secret() != refused
        except AuthFailed:
            return False  # the 535 stands; the next connection reports this error

    def tokens(self) -> TokenSource:
        """The account's OAuth2 token source, one per transport; a dead grant's notice
        goes to the postmaster once (delivery.oauth2)."""
        if self._tokens is None:
            def notify(cfg: Config, mark: dict[str, object]) -> None:
                oauth2.tell_postmaster(cfg, mark, self.log)  # its own queue id

            self._tokens = oauth2.TokenSource(self.config, notify=notify, log=self._say)
        return self._tokens

    def _token(self) -> str:
        """The access token; a failure to get one (endpoint down, a dead grant) is
        remembered for DOWN_FOR seconds, so the next address or smarthost, and the next
        messages, defer at once instead of each waiting on the endpoint again."""
        if self._secret_error is not None and \
                time.monotonic() - self._secret_at < self.DOWN_FOR:
            raise self._secret_error
        self._secret_error = None
        try:
            return self.tokens().access_token(timeout=self._time_left())
        except AuthFailed as exc:
            self._secret_error, self._secret_at = exc, time.monotonic()
            raise

    def _time_left(self) -> float | None:
        """What the session deadline leaves a token request (None: no deadline running)."""
        deadline = self._deadline
        return None if deadline is None else max(deadline - time.monotonic(), 0.1)
