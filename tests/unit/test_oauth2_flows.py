"""The login's pure parts: PKCE (RFC 7636's own example), what an endpoint's error
means for the exit status, what an imported token file must be, the prompt."""

from __future__ import annotations

import json
import urllib.parse
from typing import TYPE_CHECKING

import pytest

from relayq.core.config import parse
from relayq.core.errors import EX_CONFIG, EX_DATAERR, EX_NOPERM, EX_TEMPFAIL, RelayqError
from relayq.delivery.oauth2 import TokenError
from relayq.delivery.oauth2_browser import BrowserLogin, challenge, pkce_pair
from relayq.delivery.oauth2_login import (
    DeviceCode,
    device_poll,
    device_prompt,
    grant_record,
    import_answer,
    login_failure,
    read_import,
)
from relayq.smtp.client import AuthFailed

if TYPE_CHECKING:
    from pathlib import Path

GOOGLE = parse('smarthost = "[smtp.gmail.com]"\nport = 587\nuser = "a@gmail.com"\n'
               'oauth2_provider = "google"\noauth2_client_id = "42.apps.googleusercontent.com"\n')


def test_pkce_s256_is_rfc_7636s_example() -> None:
    assert challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == \
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    verifier, made = pkce_pair()
    assert 43 <= len(verifier) <= 128 and made == challenge(verifier)
    assert set(verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                "0123456789-._~")


def test_googles_authorize_url_asks_for_offline_access_and_never_holds_the_verifier() -> None:
    with BrowserLogin(GOOGLE) as flow:
        url = flow.url()
        assert url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["access_type"] == "offline" and query["prompt"] == "consent"
        assert query["scope"] == "https://mail.google.com/" and query["login_hint"] == "a@gmail.com"
        assert query["redirect_uri"] == f"http://127.0.0.1:{flow.port}/"
        assert flow.verifier not in url and query["code_challenge"] == challenge(flow.verifier)


@pytest.mark.parametrize(("error", "code"), [
    ("access_denied", EX_NOPERM), ("authorization_declined", EX_NOPERM),
    ("expired_token", EX_TEMPFAIL),
    ("invalid_client", EX_CONFIG), ("unauthorized_client", EX_CONFIG),
    ("invalid_grant", EX_NOPERM), ("something_new", EX_NOPERM)])
def test_an_endpoints_error_is_one_line_with_its_exit_status(error: str, code: int) -> None:
    failure = login_failure(TokenError(f"refused account default: {error}: why", error, "why"))
    assert failure.code == code and error in failure.message and "\n" not in failure.message


def test_an_unreachable_endpoint_is_temporary() -> None:
    assert login_failure(AuthFailed("OAuth2 token endpoint unusable: refused")).code == \
        EX_TEMPFAIL


def test_device_polling_ends_at_its_limit_without_asking_or_sleeping_past_it() -> None:
    """The wait is bounded (expires_in, or a limit below it); no poll after the end.
    The clock is the test's, and no request is made (Google's endpoint is not called)."""
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    dev = DeviceCode({"device_code": "d", "user_code": "U-1", "verification_uri": "https://x/",
                      "expires_in": 12, "interval": 5})
    with pytest.raises(RelayqError) as expired:
        device_poll(GOOGLE, dev, sleep=sleep, clock=lambda: now[0], limit=0.001)
    assert expired.value.code == EX_TEMPFAIL and "expired" in expired.value.message
    assert sum(slept) <= 0.001


def test_the_device_prompt_is_one_block_with_the_url_and_the_code() -> None:
    dev = DeviceCode({"device_code": "secret-device-code", "user_code": "AB12CD34E",
                      "verification_uri": "https://microsoft.com/devicelogin",
                      "expires_in": 900, "interval": 5})
    text = device_prompt(GOOGLE, dev)
    assert "open   https://microsoft.com/devicelogin" in text and "enter  AB12CD34E" in text
    assert "15 minutes" in text and "secret-device-code" not in text


def test_a_grant_without_a_refresh_token_is_refused() -> None:
    with pytest.raises(RelayqError) as none:
        grant_record(GOOGLE, {"access_token": "at", "expires_in": 3600})
    assert none.value.code == EX_NOPERM and "refresh token" in none.value.message
    data = grant_record(GOOGLE, {"refresh_token": "rt", "access_token": "at",
                                 "expires_in": 60}, now=1000.0)
    assert data["expires_at"] == 1060.0 and data["client_id"] == GOOGLE.oauth2_client_id


def test_an_import_keeps_a_valid_access_token_and_checks_whose_it_is(tmp_path: Path) -> None:
    f = tmp_path / "grant.json"
    f.write_text(json.dumps({"refresh_token": "rt", "access_token": "at", "expires_at": 5000,
                             "client_id": GOOGLE.oauth2_client_id, "user": "A@gmail.com"}))
    answer = import_answer(GOOGLE, read_import(str(f)), str(f), now=1000.0)
    assert answer == {"refresh_token": "rt", "access_token": "at", "expires_in": 4000}
    assert "access_token" not in import_answer(GOOGLE, read_import(str(f)), str(f), now=4990.0)
    f.write_text(json.dumps({"refresh_token": "rt", "provider": "microsoft"}))
    with pytest.raises(RelayqError) as other:
        import_answer(GOOGLE, read_import(str(f)), str(f))
    assert other.value.code == EX_CONFIG and "provider" in other.value.message
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(RelayqError) as bad:
        read_import(str(f))
    assert bad.value.code == EX_DATAERR
