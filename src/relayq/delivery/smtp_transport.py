"""The SMTP transport: deliver queued messages to the configured smarthost(s).

It owns the policy between a message and a relay: which hosts and addresses
to try (MX lookups with dnspython), the TLS and AUTH rules, connection reuse
across messages of one queue run, and turning every reply into a per-recipient
outcome. It knows nothing of the spool: the runner hands in an
OutgoingMessage and records the MessageResult.
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from relayq.core import policy, wire
from relayq.core.errors import RelayqError
from relayq.smtp import protocol as proto
from relayq.smtp.client import (
    AuthFailed,
    ConnectFailed,
    ConnectionLost,
    ProtocolViolation,
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

    import dns.resolver

    from relayq.core.config import Config
    from relayq.smtp.protocol import Reply

SENT = "sent"
FAILED = "failed"
DEFERRED = "deferred"

SECRET_COMMAND_TIMEOUT = 30.0
DNS_TIMEOUT = 5.0


@dataclass
class Outcome:
    """What happened to one recipient in one attempt."""

    address: str
    status: str  # SENT | FAILED | DEFERRED
    reply: str  # the server's words, or ours for local decisions
    dsn_code: str
    remote: bool = False  # the reply is the server's words (a DSN's Diagnostic-Code: smtp)
    unsure: bool = False  # no reply after the final dot: the relay may have it already


class Journal(Protocol):
    """Told about each transaction (the runner records through it; see deliver)."""

    def begin(self, indices: list[int]) -> None:
        """Before a transaction for these recipients; raising RelayqError sends nothing."""

    def commit(self, outcomes: Sequence[Outcome | None], relay: str, error: str) -> object:
        """After a transaction: the outcomes so far (and why some wait, as
        MessageResult.error), to be made durable before going on."""


@dataclass
class MessageResult:
    outcomes: list[Outcome]
    error: str = ""  # why (some of) the message was deferred; "" if nothing was
    relay: str = ""  # "mail.example.org [192.0.2.1]" of the server that answered


@dataclass
class OutgoingMessage:
    qid: str
    sender: str  # "" = null sender <>
    recipients: list[tuple[str, str, str]]  # (address, notify, orcpt)
    data: BinaryIO  # LF line ends, positioned at 0
    size: int = 0
    body: str = ""  # "" | "7BIT" | "8BITMIME"
    smtputf8: bool = False
    envid: str = ""
    ret: str = ""  # "" | "FULL" | "HDRS"
    wire: wire.Plan | None = None  # how it goes to the current relay (set by _precheck)


@dataclass
class Target:
    """One address to try: the host name (for messages and TLS) and where to connect."""

    name: str
    port: int
    family: int
    sockaddr: tuple[object, ...]


class SmtpTransport:
    """Delivers messages over one cached connection per queue run.

    If no smarthost could be reached, the failure is remembered and every
    later deliver() defers at once with the same reason (sendmail's host
    status, Postfix's dead-host cache), so a queue of 1000 messages does not
    make 1000 connection attempts to a dead relay. The memory lasts DOWN_FOR
    seconds: a daemon's long-lived transport tries the relay again after it.
    """

    DOWN_FOR = 60.0

    def __init__(
        self,
        config: Config,
        *,
        transcript: Callable[[str], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.transcript = transcript
        self.log = log
        self._client: SmtpClient | None = None
        self._down: SmtpError | None = None
        self._down_until = 0.0
        self._secret: str | None = None
        self._secret_error: AuthFailed | None = None
        self._secret_at = 0.0  # monotonic time the secret (or its error) was read
        self._ehlo_name = ""
        self._tls: ssl.SSLContext | None = None
        self.connections = 0  # connections opened (for tests and statistics)

    # --- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """QUIT the cached connection, if any."""
        if self._client is not None:
            self._client.quit()
            self._client = None

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
        if self.log is not None:
            self.log(line)

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
        if self._down is not None and time.monotonic() >= self._down_until:
            self._down = None  # aged out: try the relay again
        if self._down is not None:
            return self._all_deferred(msg, self._down, "")
        reused = self._client is not None
        client = self._ready_client()
        if client is None:
            assert self._down is not None
            return self._all_deferred(msg, self._down, "")
        outcomes: list[Outcome | None] = [None] * n
        error = ""
        try:
            early = self._precheck(client, msg)
            if early is not None:
                return MessageResult([early(a) for a, _, _ in msg.recipients], "", client.relay)
            step = self.config.max_recipients or n
            todo = list(range(n))
            while todo:
                batch, todo = todo[:step], todo[step:]
                if journal is not None:
                    try:
                        journal.begin(batch)
                    except RelayqError as exc:
                        error = f"4.3.0 not sent: {exc.message}"
                        for i in [*batch, *todo]:
                            outcomes[i] = Outcome(msg.recipients[i][0], DEFERRED, error, "4.3.0")
                        break
                reset = client.dirty
                if reset and not client.caps.pipelining:
                    client.rset()
                    reset = False
                err, accepted, again = self._transaction(client, msg, batch, outcomes, reset)
                if again and accepted:  # too many recipients: the rest in the next one
                    step = min(step, accepted)
                    todo = again + todo
                else:
                    error = error or err
                if journal is not None:
                    journal.commit(outcomes, client.relay, error)
        except SmtpError as exc:
            client.close()
            self._client = None
            if reused and all(o is None for o in outcomes) and not isinstance(exc, MailLoop):
                # a cached connection the relay closed while idle (its FIN not seen
                # yet): nothing of this message was answered, so nothing was taken;
                # once more on a fresh connection, as Postfix's connection cache does
                self._say(f"cached connection to {client.relay} lost ({exc}); reconnecting")
                return self.deliver(msg, journal)
            error = str(exc)
            for i, (addr, _, _) in enumerate(msg.recipients):
                if outcomes[i] is None:
                    outcomes[i] = Outcome(addr, DEFERRED, str(exc), exc.dsn_code)
        final = [o for o in outcomes if o is not None]
        assert len(final) == n
        if not error:
            error = next((o.reply for o in final if o.status == DEFERRED), "")
        return MessageResult(final, error, client.relay)

    @staticmethod
    def _all_deferred(msg: OutgoingMessage, exc: SmtpError, relay: str) -> MessageResult:
        outs = [Outcome(a, DEFERRED, str(exc), exc.dsn_code) for a, _, _ in msg.recipients]
        return MessageResult(outs, str(exc), relay)

    def _precheck(
        self, client: SmtpClient, msg: OutgoingMessage
    ) -> Callable[[str], Outcome] | None:
        """Refuse, without sending, what this relay cannot carry, even converted.

        8-bit data for a relay without 8BITMIME and lines over 998 octets are
        converted on the way out (relayq.core.wire). Without SMTPUTF8 (RFC 6531
        3.2) a message goes only if its envelope is ASCII and its UTF-8
        header text has an exact RFC 2047 form (Subject, display names).
        """
        caps = client.caps
        reply = ""
        msg.wire = None
        envelope_ascii = msg.sender.isascii() and all(
            a.isascii() and o.isascii() for a, _, o in msg.recipients)
        if msg.smtputf8 and not caps.smtputf8 and not envelope_ascii:
            reply = f"553 5.6.7 relay {client.relay} does not support SMTPUTF8"
        else:
            msg.wire = wire.plan(msg.data, eightbit=caps.eightbitmime,
                                 utf8_headers=caps.smtputf8 or not msg.smtputf8, size=msg.size)
            if msg.wire.refusal_code == "5.6.7" and msg.wire.refusal:
                reply = (f"553 5.6.7 relay {client.relay} does not support SMTPUTF8 and "
                         f"{msg.wire.refusal}")
            elif msg.wire.refusal:
                reply = (f"554 5.6.3 relay {client.relay} does not support 8BITMIME and the "
                         f"message cannot be converted: {msg.wire.refusal}")
            elif caps.size and msg.wire.size > caps.size:
                reply = f"552 5.3.4 Message is too large; {caps.size} bytes max at {client.relay}"
        if not reply:
            return None
        code = reply.split(" ")[1]
        return lambda addr: Outcome(addr, FAILED, reply, code)

    def _transaction(
        self,
        client: SmtpClient,
        msg: OutgoingMessage,
        idx: list[int],
        outcomes: list[Outcome | None],
        reset: bool = False,
    ) -> tuple[str, int, list[int]]:
        """One MAIL/RCPT.../DATA transaction for recipients `idx`.

        Returns (a deferral reason, how many recipients the relay accepted and
        took the message for, the recipients it refused as too many: 452 or
        552 at RCPT, RFC 5321 4.5.3.1.10, to be tried in another transaction).
        `reset`: the connection carried an earlier transaction; its RSET goes in
        the same pipelined write as MAIL (one round trip per message, not two).
        """
        caps = client.caps
        cfg = self.config  # message_deadline 0: none; else it grows with the size
        client.set_deadline(cfg.message_deadline and cfg.message_deadline
                            + msg.size / cfg.min_data_rate, "message transaction")
        try:
            mail_line = proto.mail(msg.sender, proto.mail_params(
                caps, size=msg.wire.size if msg.wire else msg.size, body=msg.body,
                smtputf8=msg.smtputf8,
                ret=msg.ret, envid=msg.envid))
        except proto.CommandError as exc:
            for i in idx:
                outcomes[i] = Outcome(msg.recipients[i][0], FAILED,
                                      f"553 5.1.7 bad sender or parameter: {exc}", "5.1.7")
            return "", 0, []
        rcpts: list[tuple[int, bytes]] = []
        for i in idx:
            addr, notify, orcpt = msg.recipients[i]
            try:
                rcpts.append((i, proto.rcpt(addr, proto.rcpt_params(caps, notify=notify,
                                                                     orcpt=orcpt))))
            except proto.CommandError as exc:
                outcomes[i] = Outcome(addr, FAILED, f"553 5.1.3 bad recipient: {exc}", "5.1.3")
        if not rcpts:
            if reset:
                client.rset()
            return "", 0, []
        client.dirty = True
        data_reply: Reply | None
        if caps.pipelining:
            group = [(mail_line, "MAIL FROM")] + [(line, "RCPT TO") for _, line in rcpts]
            if reset:
                group.insert(0, (proto.RSET, "RSET"))
            replies = client.pipeline([*group, (proto.DATA, "DATA")])
            if reset:
                rset_reply, *replies = replies
                if not rset_reply.positive:
                    client.close()
                    raise ConnectionLost(f"{client.where} refused RSET: {rset_reply}")
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = client.command(mail_line, "MAIL FROM")
            rcpt_replies = []
            data_reply = None
            if mail_reply.positive:
                rcpt_replies = [client.command(line, "RCPT TO") for _, line in rcpts]
        _expect_final(client, mail_reply, "MAIL FROM")
        if not mail_reply.positive:
            self._discard_data(client, data_reply)
            status = FAILED if mail_reply.permanent else DEFERRED
            for i, _ in rcpts:
                outcomes[i] = Outcome(msg.recipients[i][0], status, str(mail_reply),
                                      mail_reply.dsn_code, remote=True)
            return (f"{mail_reply} (in reply to MAIL FROM)" if status == DEFERRED else ""), 0, []
        accepted: list[int] = []
        too_many: list[int] = []
        for (i, _), reply in zip(rcpts, rcpt_replies, strict=True):
            _expect_final(client, reply, "RCPT TO")
            _expect_in_step(client, reply, "RCPT TO")
            if reply.positive:
                accepted.append(i)
            else:
                # 552 at RCPT is "too many recipients" (RFC 5321 4.5.3.1.10), like 452
                status = FAILED if reply.permanent and reply.code != 552 else DEFERRED
                if reply.code in (452, 552):
                    too_many.append(i)
                outcomes[i] = Outcome(msg.recipients[i][0], status, str(reply), reply.dsn_code,
                                      remote=True)
        if not accepted:
            self._discard_data(client, data_reply)
            client.rset()
            return "", 0, []
        if data_reply is None:
            data_reply = client.command(proto.DATA, "DATA")
        _expect_in_step(client, data_reply, "DATA")
        if data_reply.code != 354:
            if not (data_reply.transient or data_reply.permanent):
                client.close()
                raise ProtocolViolation(
                    f"unexpected reply to DATA from {client.where}: {data_reply}")
            return self._settle(msg, accepted, data_reply, outcomes, "DATA"), 0, []
        msg.data.seek(0)
        try:
            final = client.send_data(wire.wire_reader(msg.data, msg.wire) if msg.wire
                                     else msg.data)
        except SmtpError as exc:
            if client.after_dot:  # the relay may have taken it
                for i in accepted:
                    outcomes[i] = Outcome(msg.recipients[i][0], DEFERRED, str(exc),
                                          exc.dsn_code, unsure=True)
            raise
        _expect_final(client, final, "end of data")
        taken = len(accepted) if final.positive else 0
        return self._settle(msg, accepted, final, outcomes, "end of data"), taken, too_many

    @staticmethod
    def _settle(msg: OutgoingMessage, accepted: list[int], reply: Reply,
                outcomes: list[Outcome | None], what: str) -> str:
        status = SENT if reply.positive else FAILED if reply.permanent else DEFERRED
        for i in accepted:
            outcomes[i] = Outcome(msg.recipients[i][0], status, str(reply), reply.dsn_code,
                                  remote=True)
        return f"{reply} (in reply to {what})" if status == DEFERRED else ""

    @staticmethod
    def _discard_data(client: SmtpClient, data_reply: Reply | None) -> None:
        """A pipelined DATA was accepted although nothing may follow: send an empty body."""
        if data_reply is not None and data_reply.code == 354:
            client.send(b".\r\n", "end of data")
            client.read_reply("end of data")

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
            return None
        return self._client

    def _connect(self) -> SmtpClient:
        cfg = self.config
        last: SmtpError | None = None
        for sh in cfg.smarthosts():
            try:
                targets = self._targets(sh.host, sh.port, sh.mx)
            except SmtpError as exc:
                self._say(str(exc))
                last = exc
                continue
            for t in targets:
                # the certificate must name the configured host, never the MX
                # target an unauthenticated DNS answer chose (Postfix's "secure")
                client = SmtpClient(t.name, t.port, timeout=cfg.timeout,
                                    connect_timeout=cfg.connect_timeout,
                                    transcript=self.transcript, log=self.log,
                                    tls_name=sh.host)
                try:
                    self.connections += 1
                    client.set_deadline(cfg.session_deadline, "connection setup")
                    self._open(client, t)
                    client.clear_deadline()
                    return client
                except SmtpError as exc:
                    if client.sock is not None:
                        client.quit()
                    client.close()
                    self._say(f"{client.relay}:{t.port}: {exc}")
                    last = exc
        if last is None:
            last = ConnectFailed("no smarthost configured")
        raise last

    def _open(self, client: SmtpClient, t: Target) -> None:
        """Connect, greet, secure and authenticate, following the TLS and AUTH policy."""
        cfg = self.config
        mode = cfg.tls
        greeting = client.connect(t.family, t.sockaddr,
                                  self._tls_context() if mode == "implicit" else None)
        reply = client.ehlo(self.ehlo_name())
        loop = loop_reason(client.peer_ip, t.port, cfg.listen, self.ehlo_name(), greeting, reply)
        if loop:  # before STARTTLS and AUTH: never our password to ourselves
            raise MailLoop(f"{policy.LOOP_REASON} ({loop})")
        if mode in ("required", "opportunistic"):
            if client.caps.starttls:
                client.starttls(self._tls_context())
                client.ehlo(self.ehlo_name())
            elif mode == "required":
                raise TlsFailed(f"TLS is required but {client.where} does not offer STARTTLS")
        if cfg.user:
            if not auth_allowed(client.tls, client.peer_ip):
                raise AuthFailed(
                    f"refusing to send AUTH to {client.where} in clear text"
                    " (set tls = \"required\" or \"implicit\")")
            mech = self._mechanism(client)
            secret = self._get_secret()
            try:
                client.auth(mech, cfg.user, secret)
            except AuthFailed as exc:
                # an expired token (535): read the secret again and try once more,
                # unless it is unchanged (a second refusal of the same secret is no news)
                if exc.code != 535 or not self._refresh_secret(secret):
                    raise
                self._say(f"AUTH {mech} refused by {client.relay}; trying once more with "
                          "a freshly read secret")
                client.auth(mech, cfg.user, self._get_secret())

    def _mechanism(self, client: SmtpClient) -> str:
        offered = client.caps.auth
        want = self.config.auth_mechanism
        if want:
            if offered and want not in offered:
                raise AuthFailed(f"{client.where} does not offer AUTH {want} "
                                 f"(offers {' '.join(offered)})")
            return want
        for mech in ("PLAIN", "LOGIN"):
            if mech in offered:
                return mech
        if not offered:
            raise AuthFailed(f"AUTH is configured but {client.where} does not offer AUTH")
        raise AuthFailed(f"{client.where} offers no usable AUTH mechanism "
                         f"({' '.join(offered)})")

    def _tls_context(self) -> ssl.SSLContext:
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

    def _get_secret(self) -> str:
        """password, password_file or password_command, kept while it is fresh.

        A password_command (an OAuth2 access token lives about an hour) runs
        again for a connection opened more than password_command_max_age after
        it last ran; a failure is remembered for DOWN_FOR seconds at most.
        """
        cfg = self.config
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
        if not (cfg.password_file or cfg.password_command):
            return False
        self._secret = self._secret_error = None
        try:
            return self._get_secret() != refused
        except AuthFailed:
            return False  # the 535 stands; the next connection reports this error

    # --- resolving ----------------------------------------------------------------

    def _targets(self, host: str, port: int, mx: bool) -> list[Target]:
        """Addresses to try for one smarthost, in order."""
        names = [host]
        use_dns = bool(self.config.dns_servers)
        if mx and not _is_ip(host) and "." in host.strip("."):
            names = mx_hosts(host, self._resolver()) or [host]
        out: list[Target] = []
        last: SmtpError | None = None
        for name in names:
            try:
                if use_dns and not _is_ip(name):
                    out.extend(self._dns_addresses(name, port))
                else:
                    out.extend(_getaddrinfo(name, port))
            except SmtpError as exc:
                self._say(str(exc))
                last = exc
        if not out:
            raise last or ConnectFailed(f"no address for {host}")
        return out

    def _resolver(self) -> dns.resolver.Resolver | None:
        return make_resolver(self.config.dns_servers, min(DNS_TIMEOUT, self.config.connect_timeout))

    def _dns_addresses(self, name: str, port: int) -> list[Target]:
        import dns.exception
        import dns.resolver

        res = self._resolver()
        if res is None:
            raise ConnectFailed("no DNS resolver configured")
        out: list[Target] = []
        for rtype, family in (("AAAA", socket.AF_INET6), ("A", socket.AF_INET)):
            try:
                answer = res.resolve(name, rtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise ConnectFailed(f"DNS lookup of {name} failed: {exc}") from None
            for rr in answer:
                ip = rr.to_text()
                sockaddr: tuple[object, ...] = (ip, port, 0, 0) if family == socket.AF_INET6 \
                    else (ip, port)
                out.append(Target(name, port, family, sockaddr))
        if not out:
            raise ConnectFailed(f"Host unknown: {name}", "4.4.4")
        return out


def _dns_why(exc: BaseException) -> str:
    """One short line: dnspython's messages list every server and attempt."""
    import dns.exception
    import dns.resolver

    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL or REFUSED)"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


class MailLoop(SmtpError):
    """The relay is this relayq itself: defer (4.4.6), never bounce; the fix is ours."""

    dsn_code = policy.LOOP_STATUS


def loop_reason(ip: str, port: int, listen: list[str], own_name: str, *replies: Reply) -> str:
    """Why a relay is ourselves, or "": its address is one of our listen addresses
    (config.own_listener), or its greeting or EHLO reply names it as we name
    ourselves (hostname.smtp_name), as sendmail and Postfix decide."""
    from relayq.core.config import own_listener

    spec = own_listener(ip, port, listen)
    where = f"[{ip}]:{port}"
    if spec:
        return f"smarthost {where} is this relayq's own listener (listen {spec})"
    mine = own_name.rstrip(".").lower()
    if "." not in mine or mine.split(".", 1)[0] == "localhost":
        return ""  # a name many hosts share (a container's default) proves nothing
    for reply in replies:
        words = reply.lines[0].split() if reply.lines else []
        if words and words[0].rstrip(".").lower() == mine:
            return f"smarthost {where} greets as {words[0]}, this relayq's own name"
    return ""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _getaddrinfo(name: str, port: int) -> list[Target]:
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectFailed(f"Host unknown: {name} ({exc.strerror})", "4.4.4") from None
    seen: set[tuple[object, ...]] = set()
    out = []
    for family, _, _, _, sockaddr in infos:
        if sockaddr not in seen:
            seen.add(sockaddr)
            out.append(Target(name, port, family, tuple(sockaddr)))
    return out


def parse_dns_server(spec: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '::1', '[::1]:5353' -> (ip, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        ip, _, rest = spec[1:].partition("]")
        return ip, int(rest[1:]) if rest.startswith(":") else 53
    if spec.count(":") == 1:
        ip, port = spec.split(":")
        return ip, int(port)
    return spec, 53


def make_resolver(servers: list[str], timeout: float) -> dns.resolver.Resolver | None:
    """A dnspython resolver with a short timeout; `servers` override resolv.conf."""
    import dns.nameserver
    import dns.resolver

    if servers:
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [dns.nameserver.Do53Nameserver(*parse_dns_server(s)) for s in servers]
    else:
        try:
            res = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return None
    res.timeout = timeout
    res.lifetime = timeout * 2
    return res


def mx_hosts(name: str, resolver: dns.resolver.Resolver | None) -> list[str]:
    """MX targets by preference; [] when there is no MX (use the host itself).

    Only an answer saying "no MX" (NXDOMAIN, an empty answer) means the host
    itself (RFC 5321 5.1); SERVFAIL, REFUSED or a timeout say nothing, so the
    message waits (ConnectFailed, 4.4.3) instead of going to the A record.
    """
    import dns.exception
    import dns.resolver

    if resolver is None:
        return []
    try:
        answer = resolver.resolve(name, "MX", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise ConnectFailed(f"MX lookup of {name} failed: {_dns_why(exc)}", "4.4.3") from None
    records = sorted(((rr.preference, i, rr.exchange.to_text(omit_final_dot=True))
                      for i, rr in enumerate(answer)))
    hosts = [h for _, _, h in records if h and h != "."]
    return hosts


def read_secret(cfg: Config) -> str:
    """The AUTH secret from password, password_file or password_command.

    The command runs without a shell, with a timeout, and its output never
    appears in an error message.
    """
    if cfg.password:
        return cfg.password
    if cfg.password_file:
        try:
            with open(cfg.password_file, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise AuthFailed(f"cannot read password_file {cfg.password_file}: "
                             f"{exc.strerror}") from None
        return _one_line(raw.decode("utf-8", "replace"))
    if cfg.password_command:
        try:
            argv = shlex.split(cfg.password_command)
        except ValueError as exc:
            raise AuthFailed(f"password_command: {exc}") from None
        if not argv:
            raise AuthFailed("password_command is empty")
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=SECRET_COMMAND_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise AuthFailed(f"password_command timed out after {SECRET_COMMAND_TIMEOUT:.0f}s"
                             ) from None
        except OSError as exc:
            raise AuthFailed(f"password_command {argv[0]}: {exc.strerror}") from None
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            hint = f": {err[0][:200]}" if err else ""
            raise AuthFailed(f"password_command exited with status {proc.returncode}{hint}")
        return _one_line(proc.stdout.decode("utf-8", "replace"))
    raise AuthFailed("user is set but no password, password_file or password_command")


def _one_line(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def _expect_in_step(client: SmtpClient, reply: Reply, what: str) -> None:
    """503 (bad sequence) to RCPT or DATA after MAIL was accepted: the replies are
    out of step with the commands (an extra or a missing reply), so every later
    one answers something else. Defer, never bounce on a reply that may not be
    about this recipient."""
    if reply.code == 503:
        client.close()
        raise ProtocolViolation(f"replies from {client.where} out of step with the commands: "
                                f"{reply} to {what} after MAIL FROM was accepted")


def _expect_final(client: SmtpClient, reply: Reply, what: str) -> None:
    """MAIL, RCPT and end of data never answer 1xx/3xx: that is a mis-paired reply."""
    if reply.intermediate:
        client.close()
        raise ProtocolViolation(f"unexpected reply to {what} from {client.where}: {reply}")
