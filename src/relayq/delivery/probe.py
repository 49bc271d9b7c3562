"""`relayq test`: one smarthost session, step by step, through the delivery's own code.

The connection, TLS and AUTH policy are SmtpTransport's (`client_for`,
`open_session`, `mechanism`, `secret`, `client_tls`): what this shows is what a
queue run would meet. Each step becomes a line of the report; the first
failure names the outcome, one sysexits code per kind of problem. The test
message is sent only when the caller gives an address.
"""

from __future__ import annotations

import io
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relayq.core.errors import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_OK,
    EX_PROTOCOL,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
)
from relayq.delivery.oauth2 import EndpointUnusable
from relayq.delivery.smtp_connect import MailLoop, targets
from relayq.delivery.smtp_transport import SmtpTransport
from relayq.smtp import protocol as proto
from relayq.smtp.client import (
    AuthFailed,
    ConnectFailed,
    SmtpClient,
    SmtpError,
    TlsFailed,
    tls_context,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config, Smarthost
    from relayq.delivery.smtp_connect import Target
    from relayq.smtp.protocol import Reply

# worst first: the exit status of several smarthosts is the first of these any one had
SEVERITY = (EX_CONFIG, EX_UNAVAILABLE, EX_PROTOCOL, EX_NOPERM, EX_DATAERR, EX_TEMPFAIL, EX_OK)
OUTCOMES = {
    EX_OK: "ok",
    EX_CONFIG: "configuration problem",
    EX_UNAVAILABLE: "cannot reach the relay",
    EX_PROTOCOL: "TLS problem",
    EX_NOPERM: "AUTH problem",
    EX_DATAERR: "test message refused",
    EX_TEMPFAIL: "test message deferred",
}


@dataclass
class Report:
    """What one smarthost answered: labelled lines, and the outcome's exit status."""

    smarthost: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    code: int = EX_OK

    def add(self, label: str, text: str) -> None:
        self.lines.append((label, visible(text)))

    def fail(self, code: int, text: str) -> None:
        self.add("problem", text)
        self.code = code


@dataclass
class TestMessage:
    """The envelope and header senders the submission would give the caller's mail."""

    __test__ = False  # not a pytest class
    recipient: str
    sender: str
    from_header: str


def visible(text: str) -> str:
    """A relay's words as the terminal may show them: a control character (ESC, BEL:
    a hostile server clearing the screen or faking a `result: ok` line) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def worst(codes: list[int]) -> int:
    """The exit status for several smarthosts' outcomes (SEVERITY's order)."""
    return min(codes, key=SEVERITY.index, default=EX_OK)


def probe_all(cfg: Config, message: TestMessage | None,
              transcript: Callable[[str], None] | None = None) -> list[Report]:
    """Every configured smarthost in order, each tried as a queue run would."""
    return [probe(cfg, sh, message, transcript) for sh in cfg.smarthosts()]


def probe(cfg: Config, sh: Smarthost, message: TestMessage | None,
          transcript: Callable[[str], None] | None = None) -> Report:
    """One smarthost: connect to its first address that answers, then each step."""
    notes: list[str] = []
    transport = SmtpTransport(cfg, transcript=transcript, log=notes.append)
    report = Report(repr(sh))
    if not _settings(transport, cfg, report):
        return report
    try:
        found = targets(cfg, sh.host, sh.port, sh.mx, notes.append)
    except SmtpError as exc:
        report.fail(EX_UNAVAILABLE, str(exc))
        return report
    unreachable = ""
    for n, t in enumerate(found, 1):
        client = transport.client_for(sh, t)
        ip = str(t.sockaddr[0])
        report.add("connect", f"{t.name if t.name == ip else f'{t.name} [{ip}]'} port {t.port}")
        try:
            client.set_deadline(cfg.session_deadline, "connection setup")
            transport.open_session(client, t)
            client.clear_deadline()
        except ConnectFailed as exc:
            if client.greeting is None:  # no answer here: the next address, as delivery does
                unreachable = str(exc)
                if n < len(found):  # the last one's is the problem below
                    report.add("unreachable", unreachable)
                continue
            _steps(report, transport, client, sh, t, exc)
            return report
        except SmtpError as exc:
            _steps(report, transport, client, sh, t, exc)
            return report
        _steps(report, transport, client, sh, t, None)
        if message is None:
            report.add("message", "not sent (give an ADDRESS to send one)")
        else:
            _send(report, client, message, transport.ehlo_name())
        client.quit()
        return report
    report.fail(EX_UNAVAILABLE, unreachable or f"{sh.host} has no address")
    return report


def _settings(transport: SmtpTransport, cfg: Config, report: Report) -> bool:
    """The TLS files and the AUTH secret, read before connecting: a failure is the
    configuration's (78), not the relay's."""
    try:
        if cfg.tls != "none":
            transport.client_tls()
        if cfg.user:
            transport.secret()
    except (TlsFailed, AuthFailed) as exc:
        # an OAuth2 token endpoint down or slow is an AUTH problem, not the configuration's
        report.fail(EX_NOPERM if isinstance(exc, EndpointUnusable) else EX_CONFIG, str(exc))
        return False
    return True


def _steps(report: Report, transport: SmtpTransport, client: SmtpClient, sh: Smarthost,
           t: Target, exc: SmtpError | None) -> None:
    """The report of a session that ended in `exc` (None: every step passed)."""
    if client.greeting is not None:
        report.add("greeting", _reply(client.greeting))
    if client.ehlo_reply is None:
        return _ended(report, client, exc)  # before EHLO: nothing more took place
    report.add("EHLO", transport.ehlo_name())
    if client.ehlo_reply is not None:
        report.add("extensions", " ".join(line for line in client.ehlo_reply.lines[1:])
                   or "(none)")
    _tls(report, transport, client, sh, t, exc)
    _auth(report, transport, client, exc)
    _ended(report, client, exc)


def _ended(report: Report, client: SmtpClient, exc: SmtpError | None) -> None:
    if exc is None:
        return
    client.quit()
    if isinstance(exc, MailLoop):
        report.fail(EX_CONFIG, str(exc))
    elif isinstance(exc, TlsFailed):
        report.fail(EX_PROTOCOL, str(exc))
    elif isinstance(exc, AuthFailed):
        report.fail(EX_NOPERM, str(exc))
    else:
        report.fail(EX_UNAVAILABLE, str(exc))


def _tls(report: Report, transport: SmtpTransport, client: SmtpClient, sh: Smarthost,
         t: Target, exc: SmtpError | None) -> None:
    cfg = transport.config
    if cfg.tls == "none":
        report.add("TLS", "off (tls = \"none\")")
        return
    sock = client.sock
    if client.tls and isinstance(sock, ssl.SSLSocket):
        cipher = sock.cipher()
        report.add("TLS", f"{sock.version()} {cipher[0] if cipher else '?'}"
                          f" ({cipher[2] if cipher else '?'} bits)")
        _certificate(report, sock.getpeercert(binary_form=True))
        report.add("verify", f"ok ({sh.host})" if cfg.tls_verify else
                   "not checked (tls_verify = false)")
        return
    if isinstance(exc, TlsFailed) and exc.certificate:
        report.add("verify", "FAILED (below)")
        der = _certificate_anyway(transport, client, sh, t)
        if der:
            report.add("note", "the certificate below was fetched again, unverified, to show it")
            _certificate(report, der)
        return
    if isinstance(exc, TlsFailed):
        report.add("TLS", "FAILED (below)")
    elif client.ehlo_reply is not None and not client.caps.starttls and cfg.tls != "implicit":
        report.add("TLS", "not offered (no STARTTLS): plain SMTP")


def _certificate_anyway(transport: SmtpTransport, failed: SmtpClient, sh: Smarthost,
                        t: Target) -> bytes:
    """A second session with a context that checks nothing, only to show the
    certificate verification refused; no AUTH, no mail."""
    ctx = tls_context(verify=False)
    client = transport.client_for(sh, t)
    try:
        client.set_deadline(transport.config.session_deadline, "connection setup")
        implicit = transport.config.tls == "implicit"
        client.connect(t.family, t.sockaddr, ctx if implicit else None)
        if not implicit:
            client.ehlo(transport.ehlo_name())
            client.starttls(ctx)
        sock = client.sock
        if not isinstance(sock, ssl.SSLSocket):
            return b""
        return sock.getpeercert(binary_form=True) or b""
    except SmtpError:
        return b""
    finally:
        client.quit()


def _certificate(report: Report, der: bytes | None) -> None:
    if not der:
        report.add("certificate", "(none sent)")
        return
    info = decode_certificate(der)
    if not info:
        report.add("certificate", "(could not be decoded)")
        return
    report.add("subject", _name(info.get("subject", ())))
    report.add("issuer", _name(info.get("issuer", ())))
    alt = info.get("subjectAltName", ())
    names = [v for k, v in (alt if isinstance(alt, tuple) else ()) if k in ("DNS", "IP Address")]
    if names:
        report.add("names", ", ".join(names))
    not_after = str(info.get("notAfter", ""))
    if not_after:
        left = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
        when = f"in {left:.0f} days" if left >= 0 else f"EXPIRED {-left:.0f} days ago"
        report.add("expires", f"{not_after} ({when})")


def decode_certificate(der: bytes) -> dict[str, object]:
    """The fields of a DER certificate, as getpeercert() gives a verified one.

    The ssl module decodes only verified certificates in memory; an unverified one
    goes through its (long-standing, private) file decoder, in a private temporary
    file. Nothing is shown rather than a guess if that is unavailable.
    """
    decoder = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decoder is None:
        return {}
    fd, path = tempfile.mkstemp(prefix="relayq-cert-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ssl.DER_cert_to_PEM_cert(der))
        decoded = decoder(path)
        return decoded if isinstance(decoded, dict) else {}
    except Exception:  # a private function's failure: show no fields, never a traceback
        return {}
    finally:
        os.unlink(path)


def _name(rdns: object) -> str:
    parts = []
    for rdn in rdns if isinstance(rdns, tuple) else ():
        for key, value in rdn:
            parts.append(f"{_SHORT.get(key, key)}={value}")
    return ", ".join(parts) or "(empty)"


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def _auth(report: Report, transport: SmtpTransport, client: SmtpClient,
          exc: SmtpError | None) -> None:
    cfg = transport.config
    offered = " ".join(client.caps.auth) or "none"
    if not cfg.user:
        if client.ehlo_reply is not None and (exc is None or isinstance(exc, AuthFailed)):
            report.add("AUTH", f"not configured (offered: {offered})")
        return
    if exc is not None and not isinstance(exc, AuthFailed):
        return  # the session ended before AUTH
    mech = transport.chosen or "?"
    what = "token" if cfg.oauth2_provider else "password"
    result = "accepted" if exc is None else "failed"
    report.add("AUTH", f"offered {offered}; {mech} as {cfg.user}, {what} ******: {result}")


def _send(report: Report, client: SmtpClient, message: TestMessage, host: str) -> None:
    """MAIL, RCPT, DATA of a short message; its reply names the outcome."""
    from email.utils import formatdate, make_msgid

    body = (f"From: {message.from_header}\r\nTo: {message.recipient}\r\n"
            f"Subject: relayq test from {host}\r\nDate: {formatdate(localtime=True)}\r\n"
            f"Message-ID: {make_msgid('relayq-test', domain=host)}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"This message was sent by `relayq test` on {host} to check its relay.\r\n")
    try:
        steps = ((proto.mail(message.sender), "MAIL"), (proto.rcpt(message.recipient), "RCPT"),
                 (proto.DATA, "DATA"))
        for line, what in steps:
            reply = client.command(line, what)
            if reply.code >= 400 or (what == "DATA" and reply.code != 354):
                _refused(report, what, reply)
                return
        reply = client.send_data(io.BytesIO(body.encode("ascii", "replace")))
    except proto.CommandError as exc:
        report.fail(EX_DATAERR, f"cannot send the test message: {exc}")
        return
    except SmtpError as exc:
        report.fail(EX_TEMPFAIL, f"test message not sent: {exc}")
        return
    if reply.code >= 400:
        _refused(report, "end of data", reply)
    else:
        report.add("message", f"sent from <{message.sender}> to <{message.recipient}>: "
                              f"{_reply(reply)}")


def _refused(report: Report, what: str, reply: Reply) -> None:
    code = EX_TEMPFAIL if 400 <= reply.code < 500 else EX_DATAERR
    report.fail(code, f"test message refused at {what}: {_reply(reply)}")


def _reply(reply: Reply) -> str:
    return f"{reply.code} {reply.text}".strip()
