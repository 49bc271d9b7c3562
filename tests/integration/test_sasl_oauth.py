"""SASL for OAuth2 tokens: XOAUTH2 and OAUTHBEARER (RFC 7628), the "best offered"
choice (a token never goes as a PLAIN password), and the SASL error exchange,
against the real test smarthost over real TLS."""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING

import pytest
from tests.integration.test_smtp_transport import config, one, statuses, tls_keys

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(60)

# the shapes providers hand out: a JWT (Microsoft) and a ya29. token (Google)
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + "e" * 300 + ".sig-" + "s" * 40
GOOGLE = "ya29.a0AfB_byC" + "x" * 150
USER = "alerts@example.org"


def token_command(tmp_path: Path, token: str) -> str:
    script = tmp_path / "token.py"
    script.write_text(f"print({token!r})\n")
    return f"{sys.executable} {script}"


@pytest.mark.parametrize("token", [JWT, GOOGLE], ids=["jwt", "google"])
def test_a_token_goes_as_xoauth2_when_plain_is_offered_too(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path, token: str) -> None:
    """The defect: best offered picked PLAIN, so Gmail got the token as a password."""
    sh = smarthost_factory(tls_context=pki.server_context(), auth={USER: token},
                           auth_mechanisms=("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"),
                           auth_required=True)
    r, run = one(config(sh.smarthost, user=USER, password_command=token_command(tmp_path, token),
                        **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"], r
    assert [m for m, _, _ in sh.logins] == ["XOAUTH2"]
    assert token not in run.said()


def test_oauthbearer_when_only_it_is_offered(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                             tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={USER: GOOGLE},
                           auth_mechanisms=("PLAIN", "OAUTHBEARER"), auth_required=True)
    r, run = one(config(sh.smarthost, user=USER, password_command=token_command(tmp_path, GOOGLE),
                        **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"], r
    assert sh.logins == [("OAUTHBEARER", USER, GOOGLE)]
    assert ">>> AUTH OAUTHBEARER ********" in run.transcript
    assert GOOGLE not in run.said()


def test_a_password_still_goes_as_plain(smarthost_factory: SmarthostFactory, pki: TestPKI,
                                        tmp_path: Path) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": "hunter2-pass"},
                           auth_mechanisms=("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"))
    r, _ = one(config(sh.smarthost, user="u", password="hunter2-pass", **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"] and [m for m, _, _ in sh.logins] == ["PLAIN"]


def test_a_long_password_command_output_falls_back_to_plain(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> None:
    """Output that only looks like a token still works where no OAuth2 SASL is offered."""
    secret = "p" * 120
    sh = smarthost_factory(tls_context=pki.server_context(), auth={"u": secret},
                           auth_mechanisms=("PLAIN", "LOGIN"))
    r, _ = one(config(sh.smarthost, user="u", password_command=token_command(tmp_path, secret),
                      **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"] and [m for m, _, _ in sh.logins] == ["PLAIN"]


@pytest.mark.parametrize("mech", ["xoauth2", "oauthbearer"])
def test_a_refused_token_ends_the_sasl_exchange_and_defers(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path, mech: str) -> None:
    """The server's 334 JSON error is answered (an empty line, or %x01 for
    OAUTHBEARER) and its 535 defers the message: a token problem never bounces."""
    sh = smarthost_factory(tls_context=pki.server_context(), auth={USER: "the-good-one-" * 9},
                           auth_mechanisms=(mech.upper(),))
    r, run = one(config(sh.smarthost, user=USER,
                        password_command=token_command(tmp_path, GOOGLE),
                        auth_mechanism=mech, **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["deferred"], r
    assert "535" in r.error and "token status 401" in run.said()
    assert "MAIL" not in sh.verbs()
    answer = "" if mech == "xoauth2" else "AQ=="
    sent = [line for line in run.transcript if line.startswith(">>> ")]
    after = sent[sent.index(f">>> AUTH {mech.upper()} ********") + 1]
    assert after.rstrip() == f">>> {answer}".rstrip(), sent
    assert GOOGLE not in run.said()


def test_a_token_too_long_for_the_command_line_follows_the_334(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> None:
    """RFC 4954 section 4: an AUTH line past 512 octets is not sent; the initial
    response follows the server's empty 334 (Microsoft's tokens pass 1 KB)."""
    sh = smarthost_factory(tls_context=pki.server_context(), auth={USER: JWT},
                           auth_mechanisms=("XOAUTH2",), auth_required=True)
    r, run = one(config(sh.smarthost, user=USER, password_command=token_command(tmp_path, JWT),
                        **tls_keys(pki, tmp_path)))
    assert statuses(r) == ["sent"], r
    sent = [line for line in run.transcript if line.startswith(">>> ")]
    assert sent[sent.index(">>> AUTH XOAUTH2") + 1] == ">>> ********"
    assert JWT not in run.said()


def test_oauthbearer_initial_response_is_rfc7628() -> None:
    from relayq.smtp import protocol as proto

    raw = base64.b64decode(proto.auth_oauthbearer("a,b=c@example.org", "TOK", "mx.example.org",
                                                  587))
    assert raw == (b"n,a=a=2Cb=3Dc@example.org,\x01host=mx.example.org\x01port=587\x01"
                   b"auth=Bearer TOK\x01\x01")


@pytest.mark.parametrize(("challenge", "status"), [
    (base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode(), "401"),
    (base64.b64encode(b'{"status":"invalid_token"}').decode(), "invalid_token"),
    (base64.b64encode(b'{"status":"\x1b[31m"}').decode(), ""),
    (base64.b64encode(b"[1,2]").decode(), ""),
    ("not base64!", ""),
])
def test_oauth_error_status_is_a_plain_word(challenge: str, status: str) -> None:
    from relayq.smtp import protocol as proto

    assert proto.oauth_error(challenge) == status
