"""SmtpTransport against real loopback servers (aiosmtpd, a raw scripted server, DNS).

Every test builds its Config with relayq.core.config.parse(); nothing is mocked.
"""

from __future__ import annotations

import io
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest

from relayq.core.config import Config, parse
from relayq.delivery.smtp_transport import MessageResult, OutgoingMessage, SmtpTransport
from relayq.testing.dns import DnsResponder
from relayq.testing.smarthost import RawSession, Smarthost

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-Pa55"
BODY = b"From: a@example.org\nSubject: test\n\n.leading dot\nline\n"


def config(smarthost: str | list[str], **keys: Any) -> Config:
    values: dict[str, Any] = {
        "tls": "none", "timeout": 5, "connect_timeout": 3, "ehlo_name": "client.example.org",
    }
    values.update(keys)
    hosts = smarthost if isinstance(smarthost, list) else [smarthost]
    lines = ["smarthost = [" + ", ".join(f'"{h}"' for h in hosts) + "]"]
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        elif isinstance(value, list):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        else:
            lines.append(f'{key} = "{value}"')
    return parse("\n".join(lines) + "\n")


def message(rcpts: tuple[str, ...] = ("b@example.org",), data: bytes = BODY,
            **kw: Any) -> OutgoingMessage:
    kw.setdefault("sender", "a@example.org")
    return OutgoingMessage(qid="Q1", recipients=[(r, "", "") for r in rcpts],
                           data=io.BytesIO(data), size=len(data), **kw)


class Run:
    """A transport plus everything it said (transcript, log)."""

    def __init__(self, cfg: Config) -> None:
        self.transcript: list[str] = []
        self.log: list[str] = []
        self.t = SmtpTransport(cfg, transcript=self.transcript.append, log=self.log.append)

    def deliver(self, msg: OutgoingMessage | None = None) -> MessageResult:
        return self.t.deliver(msg or message())

    def close(self) -> None:
        self.t.close()

    def said(self) -> str:
        return "\n".join(self.transcript + self.log)


def one(cfg: Config, msg: OutgoingMessage | None = None) -> tuple[MessageResult, Run]:
    run = Run(cfg)
    try:
        return run.deliver(msg), run
    finally:
        run.close()


def statuses(r: MessageResult) -> list[str]:
    return [o.status for o in r.outcomes]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def tls_keys(pki: TestPKI, tmp_path: Path, tls: str = "required") -> dict[str, Any]:
    return {"tls": tls, "ca_file": pki.write_ca(str(tmp_path))}


# --- plain delivery and content ---------------------------------------------------


def test_plain_delivery_content_unchanged(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    data = b"Subject: x\n\n.\n..two\nend with no newline \xc3\xa9"
    r, _run = one(config(sh.smarthost), message(("b@example.org", "c@example.org"), data))
    assert statuses(r) == ["sent", "sent"] and r.error == ""
    assert r.relay == "[127.0.0.1]"
    assert r.outcomes[0].reply.startswith("250 2.0.0 Ok: queued")
    assert r.outcomes[0].dsn_code == "2.0.0"
    (t,) = sh.transactions
    assert t.mail_from == "a@example.org" and t.rcpt_tos == ["b@example.org", "c@example.org"]
    assert t.content == data.replace(b"\n", b"\r\n") + b"\r\n"
    assert f"SIZE={len(data)}" in t.mail_options
    assert sh.verbs()[-1] == "QUIT"


def test_null_sender(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    r, run = one(config(sh.smarthost), message(sender=""))
    assert statuses(r) == ["sent"]
    assert f">>> MAIL FROM:<> SIZE={len(BODY)}" in run.transcript


def test_ipv6_loopback(smarthost_factory: SmarthostFactory) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sh = smarthost_factory(host="::1")
    except OSError:
        pytest.skip("no ::1")
    r, _ = one(config(f"[::1]:{sh.port}"))
    assert statuses(r) == ["sent"] and r.relay == "[::1]"


# --- TLS ----------------------------------------------------------------------------


def test_starttls_required_verified(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                    tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), require_starttls=True)
    r, run = one(config(sh.smarthost, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"]
    assert sh.transactions[0].tls
    assert sh.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert any(": STARTTLS=client, relay=" in line and ", verify=OK, cipher=" in line
               for line in run.log)


def test_starttls_by_hostname(smarthost_factory: SmarthostFactory, pki: TestPKI,
                              tmp_path: Path) -> None:
    """[localhost] is verified against the name 'localhost'."""
    sh = smarthost_factory(tls_context=pki.server_context())
    r, _ = one(config(f"[localhost]:{sh.port}", **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"] and sh.transactions[0].tls


def test_opportunistic_uses_tls_when_offered(smarthost_factory: SmarthostFactory,
                                            pki: TestPKI, tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context())
    r, _ = one(config(sh.smarthost, **tls_keys(pki, tmp_path, "opportunistic")))
    assert statuses(r) == ["sent"] and sh.transactions[0].tls


def test_opportunistic_plain_when_not_offered(smarthost_factory: SmarthostFactory,
                                             pki: TestPKI, tmp_path: Path) -> None:
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost, **tls_keys(pki, tmp_path, "opportunistic")))
    assert statuses(r) == ["sent"] and not sh.transactions[0].tls


def test_tls_none_never_starttls(smarthost_factory: SmarthostFactory, pki: TestPKI) -> None:
    sh = smarthost_factory(tls_context=pki.server_context())
    r, _ = one(config(sh.smarthost, tls="none"))
    assert statuses(r) == ["sent"] and "STARTTLS" not in sh.verbs()


def test_implicit_tls(smarthost_factory: SmarthostFactory, pki: TestPKI,
                      tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), implicit_tls=True)
    r, _run = one(config(sh.smarthost, **tls_keys(pki, tmp_path, "implicit")))
    assert statuses(r) == ["sent"] and sh.transactions[0].tls
    assert "STARTTLS" not in sh.verbs()


def test_client_certificate(smarthost_factory: SmarthostFactory, pki: TestPKI,
                            tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(require_client_cert=True))
    cert, key = pki.write_client_cert(str(tmp_path))
    r, _ = one(config(sh.smarthost, client_cert=cert, client_key=key,
                      **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"] and sh.transactions[0].tls


@pytest.mark.parametrize("tls", ["required", "opportunistic"])
@pytest.mark.parametrize(("cert", "why"), [("unknown-ca", "certificate verif"),
                                           ("wrong-name", "certificate verif")])
def test_bad_certificate_defers_and_sends_nothing(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path,
    tls: str, cert: str, why: str,
) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(cert), auth={"u": SECRET},
                           auth_require_tls=False)
    r, _run = one(config(sh.smarthost, user="u", password=SECRET,
                        **tls_keys(pki, tmp_path, tls)))
    assert statuses(r) == ["deferred"]
    assert "TLS handshake with [127.0.0.1] failed" in r.error and why in r.error
    assert r.outcomes[0].dsn_code.startswith("4.")
    assert sh.verbs() == ["EHLO", "STARTTLS"]  # no AUTH, no MAIL, no plain-text retry
    assert sh.connections == 1


def test_tls_verify_false_accepts_unknown_ca(smarthost_factory: SmarthostFactory,
                                             pki: TestPKI) -> None:
    sh = smarthost_factory(tls_context=pki.server_context("unknown-ca"))
    r, run = one(config(sh.smarthost, tls="required", tls_verify=False))
    assert statuses(r) == ["sent"] and sh.transactions[0].tls
    assert any("STARTTLS=client, " in line and ", verify=NOT, " in line for line in run.log)


def test_required_but_not_offered(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                  tmp_path: Path) -> None:
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost, user="u", password=SECRET, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"]
    assert r.error == "TLS is required but [127.0.0.1] does not offer STARTTLS"
    assert sh.verbs() == ["EHLO", "QUIT"]


def test_454_to_starttls(smarthost_factory: SmarthostFactory, pki: TestPKI,
                         tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(),
                           replies={"starttls": "454 4.7.0 TLS not available"})
    r, _ = one(config(sh.smarthost, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"] and "454 4.7.0 TLS not available" in r.error
    assert "MAIL" not in sh.verbs()


def test_starttls_response_injection_discarded(smarthost_factory: SmarthostFactory,
                                               pki: TestPKI, tmp_path: Path) -> None:
    """Bytes sent with the 220 to STARTTLS are dropped; only the TLS EHLO counts."""
    srv = smarthost_factory.scripted(
        tls_context=pki.server_context(),
        replies={
            "EHLO": [b"250-raw.example.org\r\n250 STARTTLS\r\n",
                     b"250-raw.example.org\r\n250 PIPELINING\r\n"],
            "STARTTLS": b"220 go ahead\r\n250-FAKE\r\n250 AUTH PLAIN\r\n",
        },
    )
    r, run = one(config(srv.smarthost, user="u", password=SECRET, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"]
    assert "does not offer AUTH" in r.error
    assert b"AUTH" not in srv.received and b"MAIL" not in srv.received
    assert srv.received.count(b"EHLO") == 2
    assert any("discarded" in line for line in run.log)


# --- AUTH ---------------------------------------------------------------------------


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "XOAUTH2"])
def test_auth_mechanisms(smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path,
                         mech: str) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u@example.org": SECRET},
                           auth_required=True)
    r, run = one(config(sh.smarthost, user="u@example.org", password=SECRET,
                        auth_mechanism=mech.lower(), **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"], r
    assert sh.transactions[0].auth_user == "u@example.org"
    said = run.said()
    assert SECRET not in said and SECRET not in repr(r)
    if mech != "LOGIN":
        assert f">>> AUTH {mech} ********" in run.transcript
    else:
        assert run.transcript.count(">>> ********") == 2


def test_auth_best_offered_is_plain(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                    tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": SECRET})
    r, _run = one(config(sh.smarthost, user="u", password=SECRET, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"]
    assert [c.arg for c in sh.commands if c.verb == "AUTH"] == ["PLAIN"]
    assert all(c.tls for c in sh.commands if c.verb in ("AUTH", "MAIL"))


def test_auth_password_file(smarthost_factory: SmarthostFactory, pki: TestPKI,
                            tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": SECRET},
                           auth_mechanisms=("LOGIN",))
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    r, _ = one(config(sh.smarthost, user="u", password_file=str(pw),
                      **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"] and sh.transactions[0].auth_user == "u"


def test_auth_password_command_xoauth2(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                       tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u@example.org": "tok-123"},
                           auth_mechanisms=("XOAUTH2",))
    script = tmp_path / "token.py"
    script.write_text("print('tok-123')\n")
    cmd = f"{sys.executable} {script}"
    r, run = one(config(sh.smarthost, user="u@example.org", password_command=cmd,
                        auth_mechanism="xoauth2", **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"] and "tok-123" not in run.said()


def test_password_command_failure_defers(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                         tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": SECRET})
    cmd = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    r, _ = one(config(sh.smarthost, user="u", password_command=cmd, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"] and "password_command exited with status 3" in r.error
    assert "MAIL" not in sh.verbs()


@pytest.mark.parametrize("mech", ["plain", "login", "xoauth2"])
def test_wrong_password_defers(smarthost_factory: SmarthostFactory, pki: TestPKI,
                               tmp_path: Path, mech: str) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": SECRET})
    r, run = one(config(sh.smarthost, user="u", password="wrong-" + SECRET,
                        auth_mechanism=mech, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"]
    assert f"AUTH {mech.upper()} failed at [127.0.0.1]: 535" in r.error
    assert SECRET not in run.said() + repr(r)
    assert "MAIL" not in sh.verbs()


def test_auth_in_clear_to_loopback_is_allowed(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(auth={"u": SECRET}, auth_require_tls=False)
    r, _run = one(config(sh.smarthost, tls="none", user="u", password=SECRET))
    assert statuses(r) == ["sent"] and sh.transactions[0].auth_user == "u"


def test_auth_not_offered_defers(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost, user="u", password=SECRET))
    assert statuses(r) == ["deferred"] and "does not offer AUTH" in r.error


# --- replies at each stage ------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    ("stage", "reply", "status"),
    [
        ("greeting", "421 4.3.2 busy", "deferred"),
        ("greeting", "554 5.3.2 go away", "deferred"),
        ("ehlo", "421 4.3.2 closing", "deferred"),
        ("mail", "451 4.3.0 try later", "deferred"),
        ("mail", "550 5.7.1 sender refused", "failed"),
        ("rcpt", "450 4.2.0 mailbox busy", "deferred"),
        ("rcpt", "550 5.1.1 No such user", "failed"),
        ("data", "451 4.3.0 no DATA now", "deferred"),
        ("data", "554 5.5.0 no DATA", "failed"),
        ("eod", "452 4.3.1 out of space", "deferred"),
        ("eod", "554 5.7.1 spam", "failed"),
    ],
)
def test_reply_at_stage(smarthost_factory: SmarthostFactory, stage: str, reply: str,
                        status: str, pipelining: bool) -> None:
    sh = smarthost_factory(replies={stage: reply}, pipelining=pipelining)
    r, _ = one(config(sh.smarthost), message(("b@example.org", "c@example.org")))
    assert statuses(r) == [status, status]
    assert reply in r.outcomes[0].reply
    assert r.outcomes[0].dsn_code == ("4" if status == "deferred" else "5") + reply[5:9]
    assert (r.error != "") == (status == "deferred")
    assert sh.transactions == []


def test_ehlo_refused_falls_back_to_helo(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(replies={"ehlo": "502 5.5.2 no EHLO here"})
    r, _ = one(config(sh.smarthost), message(body="8BITMIME"))
    assert statuses(r) == ["sent"]  # 7-bit data: nothing to convert (issue 12 §9)
    r, _ = one(config(sh.smarthost))
    assert statuses(r) == ["sent"]
    assert sh.transactions[1].mail_options == []  # no extensions after HELO
    assert "HELO" in sh.verbs()


@pytest.mark.parametrize("pipelining", [True, False])
def test_partial_recipient_success(smarthost_factory: SmarthostFactory,
                                   pipelining: bool) -> None:
    sh = smarthost_factory(pipelining=pipelining, rcpt_replies={
        "bad@example.org": "550 5.1.1 No such user", "busy@example.org": "450 mailbox busy"})
    rcpts = ("b@example.org", "bad@example.org", "busy@example.org", "c@example.org")
    r, _ = one(config(sh.smarthost), message(rcpts))
    assert statuses(r) == ["sent", "failed", "deferred", "sent"]
    assert r.outcomes[1].reply == "550 5.1.1 No such user" and r.outcomes[1].dsn_code == "5.1.1"
    assert r.outcomes[2].dsn_code == "4.0.0"
    assert r.error == "450 mailbox busy"
    assert sh.transactions[0].rcpt_tos == ["b@example.org", "c@example.org"]


def test_no_recipient_accepted_no_data(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(pipelining=False, replies={"rcpt": "550 5.1.1 nobody"})
    run = Run(config(sh.smarthost))
    r = run.deliver(message(("x@example.org", "y@example.org")))
    assert statuses(r) == ["failed", "failed"]
    assert sh.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"]
    sh.rcpt_replies["ok@example.org"] = ""
    sh.replies.clear()
    r = run.deliver(message(("ok@example.org",)))
    run.close()
    assert statuses(r) == ["sent"] and sh.connections == 1


def test_dropped_mid_data(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(drop_in_data=True)
    data = b"Subject: big\n\n" + b"x" * 70 + b"\n" * 20000
    run = Run(config(sh.smarthost))
    r = run.deliver(message(("b@example.org", "c@example.org"), data))
    assert statuses(r) == ["deferred", "deferred"]
    assert "lost connection with [127.0.0.1]" in r.error
    sh.drop_in_data = False
    r = run.deliver(message())
    run.close()
    assert statuses(r) == ["sent"] and sh.connections == 2


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data", "eod"])
def test_stalled_server_defers_within_timeout(smarthost_factory: SmarthostFactory,
                                              stage: str) -> None:
    sh = smarthost_factory(stall=stage, pipelining=False)
    start = time.monotonic()
    r, _ = one(config(sh.smarthost, timeout=1))
    assert time.monotonic() - start < 4
    assert statuses(r) == ["deferred"] and "timeout waiting for reply to" in r.error


# --- connections, hosts, DNS --------------------------------------------------------


def test_connection_reuse(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    run = Run(config(sh.smarthost))
    results = [run.deliver(message((f"r{i}@example.org",))) for i in range(5)]
    run.close()
    assert all(statuses(r) == ["sent"] for r in results)
    assert sh.connections == 1 and len(sh.transactions) == 5
    assert sh.verbs().count("RSET") == 4 and sh.verbs().count("EHLO") == 1


def test_reconnect_after_server_closed(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(timeout=0.5)
    run = Run(config(sh.smarthost))
    assert statuses(run.deliver()) == ["sent"]
    time.sleep(1.2)  # the server's idle timeout closes the cached connection
    r = run.deliver()
    run.close()
    assert statuses(r) == ["sent"] and sh.connections == 2


def test_host_status_cache(smarthost_factory: SmarthostFactory) -> None:
    port = closed_port()
    run = Run(config(f"[127.0.0.1]:{port}"))
    r1 = run.deliver()
    r2 = run.deliver()
    run.close()
    assert r1.error == r2.error == "Connection refused by [127.0.0.1]"
    assert statuses(r2) == ["deferred"] and r2.outcomes[0].dsn_code == "4.4.1"
    assert run.t.connections == 1


def test_a_failed_connection_names_the_message_and_the_host_tried(
    smarthost_factory: SmarthostFactory,
) -> None:
    # issue 15: every line about a message starts with its id (sendmail's
    # "makeconnection ... failed"), and the deferral's relay= names the host tried last
    port = closed_port()
    r, run = one(config(f"[127.0.0.1]:{port}"))
    assert statuses(r) == ["deferred"] and r.relay == "" and r.tried == "[127.0.0.1]"
    assert run.log == [f"Q1: makeconnection ([127.0.0.1]:{port}) failed: "
                       "Connection refused by [127.0.0.1]"]
    sh = smarthost_factory()
    r, run = one(config([f"[127.0.0.1]:{closed_port()}", sh.smarthost]))
    assert statuses(r) == ["sent"] and all(line.startswith("Q1: ") for line in run.log)


def test_fallback_smarthost(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    r, run = one(config([f"[127.0.0.1]:{closed_port()}", sh.smarthost]))
    assert statuses(r) == ["sent"] and r.relay == "[127.0.0.1]"
    assert any("Connection refused" in line for line in run.log)


def test_connect_timeout(smarthost_factory: SmarthostFactory) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so the SYN goes unanswered (or fails fast)
    start = time.monotonic()
    r, _ = one(config("[192.0.2.1]:25", connect_timeout=1))
    assert time.monotonic() - start < 4
    assert statuses(r) == ["deferred"] and "192.0.2.1" in r.error


def test_mx_lookup(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    records = {
        "example.org": {"MX": ["20 mx2.example.org.", "10 mx1.example.org."]},
        "mx1.example.org": {"A": ["127.0.0.2"]},  # nothing listens there: refused
        "mx2.example.org": {"A": ["127.0.0.1"]},
    }
    with DnsResponder(records) as dns:
        r, run = one(config(f"example.org:{sh.port}", dns_servers=[dns.server]))
    assert statuses(r) == ["sent"], r
    assert r.relay == "mx2.example.org [127.0.0.1]"
    assert ("example.org", "MX") in dns.queries
    assert any("127.0.0.2" in line for line in run.log)


def test_no_mx_uses_host_address(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    with DnsResponder({"smarthost.example.org": {"A": ["127.0.0.1"]}}) as dns:
        r, _ = one(config(f"smarthost.example.org:{sh.port}", dns_servers=[dns.server]))
    assert statuses(r) == ["sent"] and r.relay == "smarthost.example.org [127.0.0.1]"


def test_unknown_host_defers() -> None:
    with DnsResponder({}) as dns:
        r, _ = one(config("nosuch.example.org:25", dns_servers=[dns.server]))
    assert statuses(r) == ["deferred"] and "Host unknown: nosuch.example.org" in r.error


# --- message properties ------------------------------------------------------------


def test_size_limit(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(size_limit=100)
    r, _ = one(config(sh.smarthost), message(data=b"x" * 200 + b"\n"))
    assert statuses(r) == ["failed"] and r.outcomes[0].dsn_code == "5.3.4"
    assert "MAIL" not in sh.verbs()


def test_8bitmime(smarthost_factory: SmarthostFactory) -> None:
    data = b"Subject: caf\xc3\xa9\n\n\xff\xfe raw bytes \x80\n"
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost), message(data=data, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    assert "BODY=8BITMIME" in sh.transactions[0].mail_options
    assert sh.transactions[0].content == data.replace(b"\n", b"\r\n")
    no8 = smarthost_factory(eightbitmime=False)
    r, _ = one(config(no8.smarthost), message(data=data, body="8BITMIME"))
    assert statuses(r) == ["sent"]  # converted to quoted-printable (issue 12 §9)
    assert no8.transactions[0].content.isascii()
    assert "BODY=8BITMIME" not in no8.transactions[0].mail_options


def test_smtputf8(smarthost_factory: SmarthostFactory) -> None:
    rcpt = "j\u00fcrgen@example.org"
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost), message((rcpt,), smtputf8=True, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    assert "SMTPUTF8" in sh.transactions[0].mail_options
    assert sh.transactions[0].rcpt_tos == [rcpt]
    plain = smarthost_factory(smtputf8=False)
    r, _ = one(config(plain.smarthost), message((rcpt,), smtputf8=True))
    assert statuses(r) == ["failed"] and r.outcomes[0].dsn_code == "5.6.7"


def test_dsn_parameters_only_when_offered(smarthost_factory: SmarthostFactory) -> None:
    msg = OutgoingMessage("Q1", "a@example.org",
                          [("b@example.org", "SUCCESS,FAILURE", "rfc822;b@example.org")],
                          io.BytesIO(BODY), len(BODY), ret="HDRS", envid="Q1")
    sh = smarthost_factory(dsn=True)
    r, _ = one(config(sh.smarthost), msg)
    assert statuses(r) == ["sent"]
    t = sh.transactions[0]
    assert "RET=HDRS" in t.mail_options and "ENVID=Q1" in t.mail_options
    assert t.rcpt_options == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b@example.org"]]
    nodsn = smarthost_factory()
    msg.data.seek(0)
    r, _ = one(config(nodsn.smarthost), msg)
    assert statuses(r) == ["sent"] and nodsn.transactions[0].rcpt_options == [[]]


def test_max_recipients_split(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rcpts = tuple(f"r{i}@example.org" for i in range(5))
    r, _ = one(config(sh.smarthost, max_recipients=2), message(rcpts))
    assert statuses(r) == ["sent"] * 5
    assert [t.rcpt_tos for t in sh.transactions] == [list(rcpts[:2]), list(rcpts[2:4]),
                                                     list(rcpts[4:])]
    assert all(t.content == sh.transactions[0].content for t in sh.transactions)
    assert sh.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_pipelining_used_when_offered(smarthost_factory: SmarthostFactory,
                                      pipelining: bool) -> None:
    sh = smarthost_factory(pipelining=pipelining)
    r, run = one(config(sh.smarthost), message(("b@example.org", "c@example.org")))
    assert statuses(r) == ["sent", "sent"]
    t = run.transcript
    first_reply = t.index("250 2.1.0 Ok")
    if pipelining:
        assert t.index(">>> DATA") < first_reply
    else:
        assert t.index(">>> RCPT TO:<b@example.org>") > first_reply


def test_bad_recipient_refused_before_writing(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost),
               message(("b@example.org", "x@example.org>\r\nRCPT TO:<evil@example.org")))
    assert statuses(r) == ["sent", "failed"] and r.outcomes[1].dsn_code == "5.1.3"
    assert sh.transactions[0].rcpt_tos == ["b@example.org"]
    assert sh.verbs().count("RCPT") == 1


# --- broken servers (raw) --------------------------------------------------------------


def test_wire_bytes_never_ambiguous(smarthost_factory: SmarthostFactory) -> None:
    srv = smarthost_factory.scripted()
    data = b"Subject: s\n\nA\n.\nMAIL FROM:<e@example.org>\r\n.\r\nx\r.\rbare\rcr\n.end"
    r, _ = one(config(srv.smarthost), message(data=data))
    assert statuses(r) == ["sent"]
    (wire,) = srv.messages
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")
    assert b"\r\n..\r\n" in wire and b"\r\n..end\r\n" in wire


def test_one_byte_per_segment(smarthost_factory: SmarthostFactory) -> None:
    srv = smarthost_factory.scripted(segment=1)
    r, _ = one(config(srv.smarthost))
    assert statuses(r) == ["sent"]


@pytest.mark.parametrize(
    "replies",
    [
        {"MAIL": b"250 extra\r\n250 2.1.0 Ok\r\n"},
        {"EHLO": b"250-raw\r\n250 8BITMIME\r\n250 unsolicited\r\n"},
        {"greeting": b"220 hi\r\n250 unsolicited\r\n"},
        {"RCPT": b"250 2.1.5 Ok\r\n354 too early\r\n", "DATA": b"250 2.0.0 mis-paired\r\n"},
        {"EHLO": b"250-" + b"x" * 1_000_000 + b"\r\n250 ok\r\n"},
        {"EHLO": b"250-x\r\n" * 100_000 + b"250 ok\r\n"},
        {"MAIL": b"hello there\r\n"},
        {".": b"354 again\r\n"},
    ],
    ids=["extra-before-mail", "extra-after-ehlo", "extra-after-greeting", "mis-paired",
         "1MB-line", "100k-lines", "garbage", "bad-eod"],
)
@pytest.mark.parametrize("pipelining", [True, False])
def test_protocol_errors_defer(smarthost_factory: SmarthostFactory,
                               replies: dict[str, bytes], pipelining: bool) -> None:
    replies = dict(replies)
    if not pipelining and "EHLO" not in replies:
        replies["EHLO"] = b"250-raw.example.org\r\n250 8BITMIME\r\n"
    srv = smarthost_factory.scripted(replies=replies)
    r, _ = one(config(srv.smarthost), message(("b@example.org", "c@example.org")))
    assert statuses(r) == ["deferred", "deferred"], r
    assert r.outcomes[0].dsn_code.startswith("4.")


def test_smarthost_maildir(tmp_path: Path) -> None:
    with Smarthost(maildir=str(tmp_path / "md")) as sh:
        r, _ = one(config(sh.smarthost))
    assert statuses(r) == ["sent"]
    (f,) = list((tmp_path / "md" / "new").iterdir())
    text = f.read_bytes()
    assert text.startswith(b"X-Envelope-From: <a@example.org>\nX-Envelope-To: <b@example.org>\n")
    assert text.endswith(BODY)


def test_scripted_server_custom_script(smarthost_factory: SmarthostFactory) -> None:
    """A script can drive the session itself: here, close right after the greeting."""

    def script(s: RawSession) -> None:
        s.send(b"220 bye soon\r\n")
        s.readline()

    srv = smarthost_factory.scripted(script=script)
    r, _ = one(config(srv.smarthost))
    assert statuses(r) == ["deferred"] and "lost connection" in r.error


def test_smarthost_command_line(tmp_path: Path) -> None:
    """`python -m relayq.testing.smarthost` (used by make demo) serves until SIGTERM."""
    import signal
    import subprocess

    port_file = tmp_path / "port"
    with subprocess.Popen(
        [sys.executable, "-m", "relayq.testing.smarthost", "--maildir", str(tmp_path / "md"),
         "--port-file", str(port_file)],
        stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert "listening on 127.0.0.1:" in proc.stdout.readline()
            port = int(port_file.read_text())
            r, _ = one(config(f"[127.0.0.1]:{port}"))
            assert statuses(r) == ["sent"]
            assert len(list((tmp_path / "md" / "new").iterdir())) == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0


def test_host_status_ages_out(smarthost_factory: SmarthostFactory) -> None:
    """A daemon's transport lives long: a relay that was down is tried again later."""
    port = closed_port()
    run = Run(config(f"[127.0.0.1]:{port}"))
    run.t.DOWN_FOR = 0.3
    try:
        assert statuses(run.deliver()) == ["deferred"]
        sh = smarthost_factory(port=port)  # the relay comes back on the same port
        assert statuses(run.deliver()) == ["deferred"]  # still remembered as down
        assert run.t.connections == 1
        time.sleep(0.4)
        assert statuses(run.deliver()) == ["sent"]
        assert len(sh.transactions) == 1
    finally:
        run.close()


@pytest.mark.parametrize("reply", [b"250-" + b"x" * 4_000_000 + b"\r\n250 ok\r\n",
                                   b"250-x\r\n" * 400_000 + b"250 ok\r\n"],
                         ids=["4MB-line", "400k-lines"])
def test_a_huge_reply_is_refused_with_bounded_memory(
    smarthost_factory: SmarthostFactory, reply: bytes
) -> None:
    """The client gives up at 64 KiB or 512 lines: memory does not follow the relay."""
    import tracemalloc

    srv = smarthost_factory.scripted(replies={"EHLO": reply})
    tracemalloc.start()
    try:
        r, _ = one(config(srv.smarthost))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert statuses(r) == ["deferred"] and "reply" in r.error, r.error
    assert peak < 2 * 1024 * 1024, peak  # the reply is 2 to 4 MB


def test_tls_below_1_2_is_refused(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                  tmp_path: Path) -> None:
    import ssl
    import warnings

    from relayq.smtp.client import tls_context

    assert tls_context().minimum_version >= ssl.TLSVersion.TLSv1_2
    old = pki.server_context()
    try:
        with warnings.catch_warnings():  # the old versions are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    sh = smarthost_factory(tls_context=old)
    r, _ = one(config(sh.smarthost, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"] and "TLS handshake" in r.error, r.error
    assert sh.transactions == []
