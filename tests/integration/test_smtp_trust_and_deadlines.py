"""Issue 12, defects 6, 11 and 12: whose certificate gets the password, a rotating
password_command, and deadlines for a whole connection setup and message transaction.

Real loopback servers (aiosmtpd, raw scripted sockets), a real DNS responder and
real certificates; nothing is mocked.
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_smtp_transport import (
    SECRET,
    Run,
    config,
    message,
    one,
    statuses,
    tls_keys,
)

from relayq.core.errors import EX_OK, EX_TEMPFAIL, ConfigError
from relayq.testing.dns import DnsResponder

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from relayq.testing.smarthost import RawSession, SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(60)

MSG = b"Subject: deadline\n\nbody\n"


# --- defect 6: the certificate must name the configured smarthost -----------------


def mx_records(port_host: str = "127.0.0.1") -> dict[str, dict[str, list[str]]]:
    return {"example.org": {"MX": ["10 mx1.example.org."]},
            "mx1.example.org": {"A": [port_host]}}


def test_mx_host_with_a_valid_certificate_for_its_own_name_gets_no_auth(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    """Whoever answers the (unauthenticated) MX query and holds any valid certificate
    for the name it chose must not receive the password: the certificate is checked
    against the configured smarthost name, example.org."""
    ctx = pki.server_context()
    pki.ca.issue_cert("mx1.example.org").configure_cert(ctx)
    sh = smarthost_factory(tls_context=ctx, auth={"u": SECRET}, require_starttls=True)
    with DnsResponder(mx_records()) as dns:
        r, run = one(config(f"example.org:{sh.port}", dns_servers=[dns.server], user="u",
                            password=SECRET, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"]
    assert "AUTH" not in sh.verbs() and "MAIL" not in sh.verbs()
    assert "TLS handshake with mx1.example.org failed" in r.error, r.error
    assert "must be valid for the configured smarthost example.org" in r.error, r.error
    assert r.outcomes[0].dsn_code.startswith("4.")
    assert SECRET not in run.said()


def test_mx_host_with_a_certificate_for_the_configured_name_is_used(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    ctx = pki.server_context()
    pki.ca.issue_cert("example.org").configure_cert(ctx)
    sh = smarthost_factory(tls_context=ctx, auth={"u": SECRET}, auth_required=True)
    with DnsResponder(mx_records()) as dns:
        r, _ = one(config(f"example.org:{sh.port}", dns_servers=[dns.server], user="u",
                          password=SECRET, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"], r
    assert r.relay == "mx1.example.org [127.0.0.1]"
    assert sh.transactions[0].auth_user == "u" and sh.transactions[0].tls


def test_a_subdomain_certificate_is_not_enough_either(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    """Not Postfix's dot-nexthop: mx1.example.org's certificate does not stand for
    example.org (write [mx1.example.org] to trust that host by name)."""
    ctx = pki.server_context()
    pki.ca.issue_cert("mx1.example.org", "*.example.org").configure_cert(ctx)
    sh = smarthost_factory(tls_context=ctx)
    with DnsResponder(mx_records()) as dns:
        r, _ = one(config(f"example.org:{sh.port}", dns_servers=[dns.server],
                          **tls_keys(pki, tmp_path)))
        assert statuses(r) == ["deferred"] and "certificate verif" in r.error
        r, _ = one(config(f"[mx1.example.org]:{sh.port}", dns_servers=[dns.server],
                          **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"], r


@pytest.mark.parametrize("fault", ["SERVFAIL", "REFUSED", "timeout"])
def test_a_failing_mx_lookup_defers_instead_of_using_the_a_record(
    smarthost_factory: SmarthostFactory, fault: str
) -> None:
    """RFC 5321 5.1: only "no MX" (NXDOMAIN, NoAnswer) means "use the host itself"."""
    sh = smarthost_factory()
    records = {"example.org": {"A": ["127.0.0.1"]}}
    with DnsResponder(records, faults={"example.org MX": fault}) as dns:
        r, _ = one(config(f"example.org:{sh.port}", dns_servers=[dns.server],
                          connect_timeout=1))
        assert ("example.org", "MX") in dns.queries
    assert statuses(r) == ["deferred"]
    assert r.error.startswith("MX lookup of example.org failed"), r.error
    assert r.outcomes[0].dsn_code == "4.4.3"
    assert sh.connections == 0


def test_no_mx_record_still_means_the_host_itself(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    with DnsResponder({"example.org": {"A": ["127.0.0.1"]}}) as dns:
        r, _ = one(config(f"example.org:{sh.port}", dns_servers=[dns.server]))
    assert statuses(r) == ["sent"] and r.relay == "example.org [127.0.0.1]"


def _self_signed(tmp_path: Path, name: str) -> Any:
    """A certificate for `name` signed by its own key (in no trust store)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = tmp_path / "self.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return pem


@pytest.mark.parametrize("cert", ["expired", "self-signed", "dns-name-only"])
def test_certificate_rows_defer_without_auth(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path, cert: str
) -> None:
    """Matrix rows: an expired, a self-signed and (for the IP-literal smarthost
    [127.0.0.1]) a certificate naming only localhost: deferred, no AUTH, no MAIL."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if cert == "expired":
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        pki.ca.issue_cert("127.0.0.1", not_before=past - datetime.timedelta(days=30),
                          not_after=past).configure_cert(ctx)
    elif cert == "self-signed":
        ctx.load_cert_chain(str(_self_signed(tmp_path, "localhost")))
    else:
        pki.ca.issue_cert("localhost").configure_cert(ctx)
    sh = smarthost_factory(tls_context=ctx, auth={"u": SECRET})
    r, _ = one(config(sh.smarthost, user="u", password=SECRET, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"]
    assert "TLS handshake with [127.0.0.1] failed: certificate verification failed" in r.error
    assert sh.verbs() == ["EHLO", "STARTTLS"]


def test_ip_literal_smarthost_is_verified_against_its_address(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    ctx = pki.server_context()
    pki.ca.issue_cert("127.0.0.1").configure_cert(ctx)
    sh = smarthost_factory(tls_context=ctx, auth={"u": SECRET})
    r, _ = one(config(sh.smarthost, user="u", password=SECRET, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"] and sh.transactions[0].auth_user == "u"


# --- defect 11: a password_command's token expires ----------------------------------


def token_command(tmp_path: Path) -> tuple[str, Path]:
    """A password_command printing tok-1, tok-2, ... (one more on each run)."""
    counter = tmp_path / "runs"
    script = tmp_path / "token.py"
    script.write_text(
        "import sys\n"
        "p = sys.argv[1]\n"
        "try:\n    n = int(open(p).read())\nexcept FileNotFoundError:\n    n = 0\n"
        "open(p, 'w').write(str(n + 1))\n"
        "print(f'tok-{n + 1}')\n")
    return f"{sys.executable} {script} {counter}", counter


def runs(counter: Path) -> int:
    return int(counter.read_text()) if counter.exists() else 0


@pytest.mark.parametrize("mech", ["plain", "xoauth2"])
def test_535_then_235_with_a_rotating_password_command(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path, mech: str
) -> None:
    """The token the worker holds has expired (the relay now takes tok-2): one 535
    re-runs the command and AUTH is tried once more on the same connection."""
    cmd, counter = token_command(tmp_path)
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": "tok-2"},
                           auth_required=True)
    r, run = one(config(sh.smarthost, user="u", password_command=cmd, auth_mechanism=mech,
                        **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"], r
    assert runs(counter) == 2
    assert sh.verbs().count("AUTH") == 2 and sh.connections == 1
    assert sh.transactions[0].auth_user == "u"
    assert "tok-1" not in run.said() and "tok-2" not in run.said()


def test_a_second_535_is_the_failure(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    cmd, counter = token_command(tmp_path)
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": "tok-99"})
    r, _ = one(config(sh.smarthost, user="u", password_command=cmd,
                      **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"] and "AUTH PLAIN failed at [127.0.0.1]: 535" in r.error
    assert runs(counter) == 2 and sh.verbs().count("AUTH") == 2
    assert "MAIL" not in sh.verbs()


def test_an_unchanged_secret_is_not_sent_again_after_535(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    """A helper that caches its token prints the same one: no second AUTH with it."""
    script = tmp_path / "same.py"
    script.write_text("print('tok-same')\n")
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": "tok-other"})
    r, _ = one(config(sh.smarthost, user="u", password_command=f"{sys.executable} {script}",
                      **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"] and sh.verbs().count("AUTH") == 1


def test_a_rotated_password_file_is_read_again_after_535(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("old-" + SECRET + "\n")
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": "old-" + SECRET})
    run = Run(config(sh.smarthost, user="u", password_file=str(pw), **tls_keys(pki, tmp_path)))
    try:
        assert statuses(run.deliver(message())) == ["sent"]
        run.t.close()
        pw.write_text("new-" + SECRET + "\n")
        sh.auth["u"] = "new-" + SECRET
        assert statuses(run.deliver(message())) == ["sent"]
    finally:
        run.close()
    assert sh.verbs().count("AUTH") == 3 and sh.connections == 2
    assert SECRET not in run.said()


def test_password_command_is_run_again_after_its_max_age(
    smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path
) -> None:
    """A busy worker keeps its transport: a new connection after
    password_command_max_age runs the command again before AUTH (no 535 needed);
    within the age the cached token is used."""
    cmd, counter = token_command(tmp_path)
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": "tok-1"})
    run = Run(config(sh.smarthost, user="u", password_command=cmd,
                     password_command_max_age=1, **tls_keys(pki, tmp_path)))
    try:
        assert statuses(run.deliver(message())) == ["sent"]
        run.t.close()  # the next message needs a new connection
        assert statuses(run.deliver(message())) == ["sent"]  # within the age: cached
        assert runs(counter) == 1
        run.t.close()
        sh.auth["u"] = "tok-2"  # the provider rotated the token
        time.sleep(1.2)
        assert statuses(run.deliver(message())) == ["sent"]
    finally:
        run.close()
    assert runs(counter) == 2
    assert sh.verbs().count("AUTH") == 3 and sh.connections == 3  # never a 535


def test_password_command_max_age_setting() -> None:
    assert config("[127.0.0.1]").password_command_max_age == 300
    assert config("[127.0.0.1]", password_command_max_age="1h").password_command_max_age == 3600
    with pytest.raises(ConfigError, match="password_command_max_age"):
        config("[127.0.0.1]", password_command_max_age="soon")


# --- defect 12: deadlines for a connection setup and a message transaction ---------


def drip(s: RawSession, data: bytes, gap: float) -> None:
    """Send `data` one byte at a time, `gap` seconds apart (each reply stays far
    inside the per-reply timeout; only the total is too slow)."""
    for i in range(len(data)):
        s.sock.sendall(data[i:i + 1])
        time.sleep(gap)


def dripping_relay(gap: float, stages: tuple[str, ...],
                   done: threading.Event) -> Callable[[RawSession], None]:
    """A lock-step relay whose replies at `stages` (greeting, EHLO, MAIL, RCPT, DATA,
    ".") arrive a byte every `gap` seconds."""

    def say(s: RawSession, stage: str, data: bytes) -> None:
        if stage in stages and not done.is_set():
            drip(s, data, gap)
        else:
            s.sock.sendall(data)

    def script(s: RawSession) -> None:
        say(s, "greeting", b"220 raw.example.org ESMTP\r\n")
        while line := s.readline():
            verb = line.split(b" ", 1)[0].strip().upper().decode()
            if verb == "EHLO":
                say(s, "EHLO", b"250-raw.example.org\r\n250 8BITMIME\r\n")
            elif verb == "DATA":
                say(s, "DATA", b"354 go ahead\r\n")
                if not s.read_data():
                    return
                say(s, ".", b"250 2.0.0 Ok: queued as DRIP\r\n")
            elif verb == "QUIT":
                s.sock.sendall(b"221 bye\r\n")
                return
            else:
                say(s, verb, b"250 2.1.0 Ok\r\n")

    return script


def deadline_config(smarthost: str, **keys: Any) -> Any:
    keys = {"timeout": 30, "session_deadline": 5, "message_deadline": 3,
            "min_data_rate": 1 << 30, **keys}
    return config(smarthost, **keys)


def test_a_slow_connection_setup_meets_the_session_deadline(
    smarthost_factory: SmarthostFactory
) -> None:
    """Greeting and EHLO each arrive well inside `timeout` (30 s), a byte every 0.1 s,
    but together they pass the 3 s session deadline: deferred, the worker freed."""
    done = threading.Event()
    srv = smarthost_factory.scripted(script=dripping_relay(0.1, ("greeting", "EHLO"), done))
    try:
        r, _ = one(deadline_config(srv.smarthost, session_deadline=3))
    finally:
        done.set()
    assert statuses(r) == ["deferred"]
    assert "connection setup exceeded its deadline of 3 s" in r.error, r.error
    assert b"MAIL" not in srv.received


def test_a_relay_answering_each_command_slowly_meets_the_message_deadline(
    smarthost_factory: SmarthostFactory
) -> None:
    """Ten recipients, lock-step, each RCPT answered a byte every 0.1 s (1.4 s per
    reply, far inside the 30 s timeout): the 3 s message deadline ends it before DATA."""
    done = threading.Event()
    srv = smarthost_factory.scripted(script=dripping_relay(0.1, ("RCPT",), done))
    rcpts = tuple(f"r{i}@example.org" for i in range(10))
    try:
        r, _ = one(deadline_config(srv.smarthost), message(rcpts))
    finally:
        done.set()
    assert statuses(r) == ["deferred"] * 10
    assert "message transaction exceeded its deadline of 3 s" in r.error, r.error
    assert "waiting for reply to RCPT TO" in r.error
    assert srv.messages == []


def test_the_message_deadline_grows_with_the_size(smarthost_factory: SmarthostFactory) -> None:
    """1 s base + 300 KB at 100 KB/s: a 2 s transaction is inside its deadline."""
    done = threading.Event()
    srv = smarthost_factory.scripted(script=dripping_relay(0.1, ("MAIL",), done))
    body = MSG + b"x" * 78 + b"\n"
    data = body * (300_000 // len(body))
    try:
        r, _ = one(deadline_config(srv.smarthost, message_deadline=1, min_data_rate=100_000),
                   message(data=data))
    finally:
        done.set()
    assert statuses(r) == ["sent"], r


def test_the_deadline_after_the_final_dot_is_a_lost_connection(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """The reply to the final dot drips past the deadline: the relay may have the
    message, so it is exactly a connection lost after the dot: deferred (never
    'sent', never a bounce), the retry may duplicate."""
    done = threading.Event()
    srv = smarthost_factory.scripted(script=dripping_relay(0.3, (".",), done))
    rq = Relayq(tmp_path, smarthost=srv.smarthost, timeout=30, message_deadline=4,
                min_data_rate=1 << 30)
    try:
        assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
        r = rq.sendmail("-q")
    finally:
        done.set()
    assert r.returncode == EX_TEMPFAIL, r.stderr
    [(env, _)] = rq.queued()
    assert env.pending() and env.attempts == 1
    assert "message transaction exceeded its deadline of 4 s" in env.error, env.error
    assert "waiting for reply to end of data" in env.error
    assert len(srv.messages) == 1  # it has the message: a retry may duplicate
    assert "stat=Deferred" in rq.log()


def test_a_stalled_tcp_window_during_data_meets_the_deadline(
    smarthost_factory: SmarthostFactory
) -> None:
    """After 354 the relay stops reading (a 4 KiB receive buffer): the client's
    writes block; the 5 s deadline (not the 30 s write timeout) frees the worker."""
    done = threading.Event()

    def script(s: RawSession) -> None:
        s.sock.sendall(b"220 raw.example.org ESMTP\r\n")
        while line := s.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"DATA":
                s.sock.sendall(b"354 go ahead\r\n")
                done.wait(60)  # never reads the message
                return
            s.sock.sendall(b"250-raw.example.org\r\n250 8BITMIME\r\n" if verb == b"EHLO"
                           else b"250 ok\r\n")

    srv = smarthost_factory.scripted(script=script, rcvbuf=4096)
    line = b"y" * 998 + b"\n"
    data = MSG + line * (16 * 1024 * 1024 // len(line))  # more than any socket buffer
    try:
        r, _ = one(deadline_config(srv.smarthost, message_deadline=4, min_data_rate=16 << 20),
                   message(data=data))
    finally:
        done.set()
    assert statuses(r) == ["deferred"]
    assert "message transaction exceeded its deadline of" in r.error, r.error
    assert "message data" in r.error


def test_deadline_settings() -> None:
    cfg = config("[127.0.0.1]")
    assert (cfg.session_deadline, cfg.message_deadline, cfg.min_data_rate) == (600, 600, 2048)
    with pytest.raises(ConfigError, match="min_data_rate"):
        config("[127.0.0.1]", min_data_rate=0)
    with pytest.raises(ConfigError, match="message_deadline"):
        config("[127.0.0.1]", message_deadline="x")


def test_a_deadline_does_not_outlive_its_transaction(smarthost_factory: SmarthostFactory) -> None:
    """A cached connection idle longer than the message deadline still carries the
    next message (its deadline starts with it)."""
    sh = smarthost_factory()
    run = Run(deadline_config(sh.smarthost, message_deadline=2))
    try:
        assert statuses(run.deliver(message())) == ["sent"]
        time.sleep(2.5)
        assert statuses(run.deliver(message())) == ["sent"]
    finally:
        run.close()
    assert sh.connections == 1
