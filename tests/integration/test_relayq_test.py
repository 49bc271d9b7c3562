"""`relayq test [ADDRESS]` (issue 15 §2): each smarthost's answer, step by step, against
real loopback servers with real certificates; a message only when ADDRESS is given."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(90)

SECRET = "s3cret-Pw!7"
B64_PLAIN = "AGFsaWNlAHMzY3JldC1QdyE3"  # \0alice\0s3cret-Pw!7


def relayq_test(rq: Relayq, *args: str) -> tuple[int, str]:
    result: subprocess.CompletedProcess[bytes] = rq.run("relayq", "test", *args)
    out = result.stdout.decode() + result.stderr.decode()
    assert "Traceback" not in out, out
    for secret in (SECRET, B64_PLAIN):
        assert secret not in out
    return result.returncode, result.stdout.decode()


def field(out: str, label: str) -> str:
    lines = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.strip().startswith(label + ":")]
    assert lines, (label, out)
    return lines[0]


def no_mail(sh: Smarthost) -> None:
    assert sh.transactions == []
    assert not {"MAIL", "RCPT", "DATA"} & set(sh.verbs()), sh.verbs()


def tls_host(smarthost_factory: SmarthostFactory, pki: TestPKI, which: str = "good",
             **kwargs: object) -> Smarthost:
    return smarthost_factory(tls_context=pki.server_context(which), **kwargs)


def tls_settings(pki: TestPKI, tmp_path: Path, sh: Smarthost) -> dict[str, object]:
    return {"smarthost": f"[127.0.0.1]:{sh.port}", "tls": "required",
            "ca_file": pki.write_ca(str(tmp_path))}


def test_plain_shows_greeting_and_extensions_and_sends_nothing(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory()
    code, out = relayq_test(Relayq(tmp_path, smarthost=sh.smarthost))
    assert code == 0, out
    assert field(out, "greeting").startswith("220 ")
    assert "PIPELINING" in field(out, "extensions")
    assert field(out, "EHLO")
    assert "not sent" in field(out, "message")
    assert field(out, "result").startswith("ok")
    no_mail(sh)
    assert sh.verbs()[-1] == "QUIT"


def test_address_sends_exactly_one_message(smarthost_factory: SmarthostFactory,
                                           tmp_path: Path) -> None:
    sh = smarthost_factory()
    code, out = relayq_test(Relayq(tmp_path, smarthost=sh.smarthost), "bob@example.org")
    assert code == 0, out
    assert len(sh.transactions) == 1
    t = sh.transactions[0]
    assert t.rcpt_tos == ["bob@example.org"]
    assert t.mail_from.endswith("@host.example.org")
    assert b"Subject: relayq test from " in t.content
    assert field(out, "message").startswith("sent from <")


def test_starttls_shows_version_cipher_and_certificate(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> None:
    sh = tls_host(smarthost_factory, pki)
    code, out = relayq_test(Relayq(tmp_path, **tls_settings(pki, tmp_path, sh)))
    assert code == 0, out
    assert field(out, "TLS").startswith("TLSv1.")
    assert "relayq test CA" in field(out, "issuer")
    assert field(out, "subject")
    assert "days)" in field(out, "expires")
    assert field(out, "verify").startswith("ok")
    no_mail(sh)


@pytest.mark.parametrize(("which", "words"), [
    ("wrong-name", "not valid for '127.0.0.1'"),
    ("unknown-ca", "unable to get local issuer certificate"),
    ("expired", "certificate has expired"),
])
def test_bad_certificate_is_shown_and_nothing_is_sent(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path,
        which: str, words: str) -> None:
    """The issue's "done when": a TLS problem shown without sending mail (nor AUTH)."""
    sh = tls_host(smarthost_factory, pki, which, auth={"alice": SECRET})
    rq = Relayq(tmp_path, user="alice", password=SECRET, **tls_settings(pki, tmp_path, sh))
    code, out = relayq_test(rq, "bob@example.org")
    assert code == 76, out
    assert field(out, "verify") == "FAILED (below)"
    assert words in field(out, "problem")
    assert field(out, "issuer")  # the certificate, fetched again to show it
    if which == "expired":
        assert "EXPIRED" in field(out, "expires")
    no_mail(sh)
    assert "AUTH" not in sh.verbs()


def test_auth_accepted_masks_the_secret(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                        tmp_path: Path) -> None:
    sh = tls_host(smarthost_factory, pki, auth={"alice": SECRET})
    rq = Relayq(tmp_path, user="alice", password=SECRET, **tls_settings(pki, tmp_path, sh))
    code, out = relayq_test(rq)
    assert code == 0, out
    assert "PLAIN as alice" in field(out, "AUTH") and "accepted" in field(out, "AUTH")
    assert "AUTH" in sh.verbs()
    no_mail(sh)


def test_auth_refused_is_its_own_code_and_sends_nothing(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> None:
    sh = tls_host(smarthost_factory, pki, auth={"alice": "another"})
    rq = Relayq(tmp_path, user="alice", password=SECRET, **tls_settings(pki, tmp_path, sh))
    code, out = relayq_test(rq, "bob@example.org")
    assert code == 77, out
    assert "535" in field(out, "problem")
    assert "failed" in field(out, "AUTH")
    no_mail(sh)


def test_verbose_dialogue_masks_the_secret(smarthost_factory: SmarthostFactory,
                                           pki: TestPKI, tmp_path: Path) -> None:
    sh = tls_host(smarthost_factory, pki, auth={"alice": SECRET})
    rq = Relayq(tmp_path, user="alice", password=SECRET, **tls_settings(pki, tmp_path, sh))
    result = rq.run("relayq", "-v", "test")
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "AUTH PLAIN" in out and SECRET not in out and B64_PLAIN not in out


def test_unreadable_password_file_is_a_configuration_problem(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, user="alice",
                password_file=str(tmp_path / "missing"))
    code, out = relayq_test(rq)
    assert code == 78, out
    assert "password_file" in field(out, "problem")
    assert sh.connections == 0


def test_connection_refused(tmp_path: Path) -> None:
    code, out = relayq_test(Relayq(tmp_path, smarthost="[127.0.0.1]:9"))
    assert code == 69, out
    assert "Connection refused" in field(out, "problem")


@pytest.mark.parametrize(("reply", "expected"), [("550 5.1.1 no such user", 65),
                                                 ("451 4.3.0 try later", 75)])
def test_test_message_refused(smarthost_factory: SmarthostFactory, tmp_path: Path,
                              reply: str, expected: int) -> None:
    sh = smarthost_factory(replies={"rcpt": reply})
    code, out = relayq_test(Relayq(tmp_path, smarthost=sh.smarthost), "bob@example.org")
    assert code == expected, out
    assert reply.split()[0] in field(out, "problem")
    assert sh.transactions == []


def test_several_smarthosts_each_tested_worst_code(smarthost_factory: SmarthostFactory,
                                                   pki: TestPKI, tmp_path: Path) -> None:
    good = smarthost_factory()
    bad_tls = tls_host(smarthost_factory, pki, "wrong-name")
    rq = Relayq(tmp_path, smarthost=[good.smarthost, "[127.0.0.1]:9",
                                     f"[127.0.0.1]:{bad_tls.port}"],
                tls="opportunistic", ca_file=pki.write_ca(str(tmp_path)))
    code, out = relayq_test(rq)
    assert out.count("smarthost [127.0.0.1]") == 3, out
    assert code == 69, out  # unreachable ranks before TLS (76)
    assert [line.split("(exit status ")[1].rstrip(")") for line in out.splitlines()
            if "result:" in line] == ["0", "69", "76"]


def test_implicit_tls(smarthost_factory: SmarthostFactory, pki: TestPKI,
                      tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), implicit_tls=True)
    rq = Relayq(tmp_path, smarthost=f"[127.0.0.1]:{sh.port}", tls="implicit",
                ca_file=pki.write_ca(str(tmp_path)))
    code, out = relayq_test(rq)
    assert code == 0, out
    assert field(out, "TLS").startswith("TLSv1.")


def test_usage(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    assert rq.run("relayq", "test", "a@b", "c@d").returncode == 64
    assert rq.run("relayq", "test", "<>").returncode == 64


def test_self_signed_certificate(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                 tmp_path: Path) -> None:
    sh = tls_host(smarthost_factory, pki, "self-signed")
    code, out = relayq_test(Relayq(tmp_path, **tls_settings(pki, tmp_path, sh)))
    assert code == 76, out
    assert "self-signed" in field(out, "problem")
    assert "relayq self-signed" in field(out, "issuer")
    no_mail(sh)


def test_tls_verify_off_says_so(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                tmp_path: Path) -> None:
    sh = tls_host(smarthost_factory, pki, "wrong-name")
    rq = Relayq(tmp_path, **tls_settings(pki, tmp_path, sh), tls_verify=False)
    code, out = relayq_test(rq)
    assert code == 0, out
    assert field(out, "verify").startswith("not checked")
    assert "other.example.net" in field(out, "names")


def test_starttls_required_but_not_offered(smarthost_factory: SmarthostFactory,
                                           tmp_path: Path) -> None:
    sh = smarthost_factory()
    code, out = relayq_test(Relayq(tmp_path, smarthost=sh.smarthost, tls="required"))
    assert code == 76, out
    assert "does not offer STARTTLS" in field(out, "problem")
    no_mail(sh)


def test_refused_starttls_makes_no_second_connection(smarthost_factory: SmarthostFactory,
                                                     tmp_path: Path) -> None:
    server = smarthost_factory.scripted(replies={
        "EHLO": b"250-raw.example.org\r\n250 STARTTLS\r\n",
        "STARTTLS": b"454 4.7.0 TLS not available now\r\n"})
    rq = Relayq(tmp_path, smarthost=f"[127.0.0.1]:{server.port}", tls="required")
    code, out = relayq_test(rq)
    assert code == 76, out
    assert "454 4.7.0" in field(out, "problem")
    assert field(out, "TLS") == "FAILED (below)"
    assert "fetched again" not in out


def test_no_220_greeting(smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory(replies={"greeting": "554 5.3.2 go away"})
    code, out = relayq_test(Relayq(tmp_path, smarthost=sh.smarthost))
    assert code == 69, out
    assert "554 5.3.2" in field(out, "problem")


def test_a_silent_server_times_out_with_one_line(smarthost_factory: SmarthostFactory,
                                                 tmp_path: Path) -> None:
    server = smarthost_factory.scripted(script=lambda session: session.readline())
    rq = Relayq(tmp_path, smarthost=f"[127.0.0.1]:{server.port}", timeout=1)
    result = rq.run("relayq", "test", timeout=60)
    assert result.returncode == 69, result.stdout
    err = result.stderr.decode()
    assert "greeting" in err and err.count("\n") == 1 and "Traceback" not in err


def test_failing_password_command_is_a_configuration_problem(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory(auth={"alice": SECRET}, auth_require_tls=False)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, user="alice", password_command="false")
    code, out = relayq_test(rq)
    assert code == 78, out
    assert "password_command exited with status 1" in field(out, "problem")
    assert sh.connections == 0


def test_own_listener_gets_no_auth(smarthost_factory: SmarthostFactory,
                                   tmp_path: Path) -> None:
    sh = smarthost_factory(auth={"alice": SECRET}, auth_require_tls=False)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, listen=[f"127.0.0.1:{sh.port}"],
                user="alice", password=SECRET)
    result = rq.run("relayq", "test")
    assert result.returncode == 78
    assert "AUTH" not in sh.verbs()
    assert b"listener" in result.stderr + result.stdout


def test_missing_ca_file(smarthost_factory: SmarthostFactory, pki: TestPKI,
                         tmp_path: Path) -> None:
    sh = tls_host(smarthost_factory, pki)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, tls="required",
                ca_file=str(tmp_path / "missing.pem"))
    code, out = relayq_test(rq)
    assert code == 78, out
    assert "cannot load ca_file" in field(out, "problem")
    assert sh.connections == 0


def test_second_address_answering_is_success(smarthost_factory: SmarthostFactory,
                                             tmp_path: Path) -> None:
    """As delivery: a host's next address is tried; the one that answers decides."""
    from relayq.testing.dns import DnsResponder

    sh = smarthost_factory()
    # AAAA is tried before A (smtp_connect._dns_addresses): ::1 refuses, 127.0.0.1 answers
    with DnsResponder({"relay.example.org": {"AAAA": ["::1"], "A": ["127.0.0.1"]}}) as dns:
        rq = Relayq(tmp_path, smarthost=f"relay.example.org:{sh.port}",
                    dns_servers=[dns.server])
        result = rq.run("relayq", "test")
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "[::1]" in out and field(out, "unreachable")
    assert "problem:" not in out and result.stderr == b""


@pytest.mark.parametrize("script", [
    {"greeting": b"220 evil \x1b[2J\x1b]0;pwned\x07 ESMTP\r\n"},
    {"EHLO": b"250-raw.example.org\r\n250 \x1b[31mRED\r\n"},
])
def test_control_characters_from_the_relay_are_escaped(
        smarthost_factory: SmarthostFactory, tmp_path: Path,
        script: dict[str, bytes]) -> None:
    server = smarthost_factory.scripted(replies=script)
    rq = Relayq(tmp_path, smarthost=f"[127.0.0.1]:{server.port}")
    for args in (("test",), ("-v", "test")):
        result = rq.run("relayq", *args)
        assert b"\x1b" not in result.stdout and b"\x07" not in result.stdout
        assert b"\\x1b" in result.stdout


def test_a_session_that_ends_at_the_greeting_shows_no_later_step(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory(replies={"greeting": "554 5.3.2 go away"})
    code, out = relayq_test(Relayq(tmp_path, smarthost=sh.smarthost))
    assert code == 69
    assert "EHLO:" not in out and "TLS:" not in out and "AUTH:" not in out
