"""The OAuth2 token machinery against the fake endpoint (relayq.testing.oauth2) over
real loopback HTTP: system.http's one POST, system.tokenstore's file, the fake's own
flows (which `relayq oauth2 login` relies on), and delivery.oauth2.TokenSource."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from relayq.core.config import parse
from relayq.core.errors import RelayqError
from relayq.core.policy import CLIENT_REASON, REAUTH_REASON
from relayq.delivery import oauth2
from relayq.delivery.oauth2 import GrantRevoked, TokenError, TokenSource, exchange, save_grant
from relayq.smtp.client import AuthFailed, ReauthNeeded
from relayq.system.http import HttpError, post_form
from relayq.system.tokenstore import TokenFile, dead_grants

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.core.config import Config
    from relayq.testing.oauth2 import FakeTokenEndpoint
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(60)
USER = "alerts@example.org"


def account(ep: FakeTokenEndpoint, tmp_path: Path, **keys: Any) -> Config:
    values: dict[str, Any] = {
        "smarthost": "[127.0.0.1]:9", "queue_dir": str(tmp_path / "q"), "user": USER,
        "oauth2_provider": "generic", "oauth2_client_id": ep.client_id,
        "oauth2_token_url": ep.token_url, "oauth2_scopes": ["smtp"], "oauth2_timeout": 5}
    values.update(keys)
    os.makedirs(values["queue_dir"], mode=0o700, exist_ok=True)
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return parse("\n".join(lines) + "\n")


def logged_in(ep: FakeTokenEndpoint, tmp_path: Path, **keys: Any) -> Config:
    cfg = account(ep, tmp_path, **keys)
    save_grant(cfg, {"refresh_token": ep.grant(USER)})
    return cfg


def token_file(cfg: Config) -> dict[str, Any]:
    with open(os.path.join(cfg.queue_dir, "oauth2", "default.json")) as f:
        data: dict[str, Any] = json.load(f)
    return data


# --- system.http ------------------------------------------------------------------


def test_post_form_returns_json_for_success_and_oauth_errors(
        token_endpoint: FakeTokenEndpoint) -> None:
    rt = token_endpoint.grant(USER)
    status, answer = post_form(token_endpoint.token_url, {
        "grant_type": "refresh_token", "refresh_token": rt,
        "client_id": token_endpoint.client_id}, timeout=10)
    assert status == 200 and token_endpoint.accepts(USER, answer["access_token"])
    status, answer = post_form(token_endpoint.token_url, {
        "grant_type": "refresh_token", "refresh_token": "rt.unknown",
        "client_id": token_endpoint.client_id}, timeout=10)
    assert status == 400 and answer["error"] == "invalid_grant"


def test_post_form_failures_are_http_errors_without_field_values(
        token_endpoint: FakeTokenEndpoint) -> None:
    secret = "s3cr3t-refresh-value"
    fields = {"refresh_token": secret}
    token_endpoint.down = True
    with pytest.raises(HttpError) as down:
        post_form(token_endpoint.token_url, fields, timeout=10)
    assert "connection refused" in down.value.message and down.value.status == 0
    assert down.value.code == 75
    token_endpoint.down = False
    token_endpoint.stall = 5
    t0 = time.monotonic()
    with pytest.raises(HttpError, match="timed out") as slow:
        post_form(token_endpoint.token_url, fields, timeout=0.5)
    assert time.monotonic() - t0 < 4.5  # bounded by the timeout, not by the stall
    token_endpoint.stall = 0
    for exc in (down.value, slow.value):
        assert secret not in str(exc)
    with pytest.raises(HttpError, match="not https"):
        post_form("http://192.0.2.1/token", fields, timeout=1)


class _Junk(http.server.BaseHTTPRequestHandler):
    body = b"<html>proxy error</html>"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def junk() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Junk)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_post_form_refuses_a_body_that_is_not_json_or_too_large(
        junk: http.server.HTTPServer) -> None:
    url = f"http://127.0.0.1:{junk.server_address[1]}/token"
    with pytest.raises(HttpError, match="not JSON") as exc:
        post_form(url, {}, timeout=10)
    assert exc.value.status == 200
    _Junk.body = b'{"a": "' + b"x" * 70000 + b'"}'
    try:
        with pytest.raises(HttpError, match="larger than 64 KiB"):
            post_form(url, {}, timeout=10)
    finally:
        _Junk.body = b"<html>proxy error</html>"


# --- system.tokenstore ------------------------------------------------------------------


def test_token_file_is_private_atomic_and_names_a_damaged_file(tmp_path: Path) -> None:
    tf = TokenFile(str(tmp_path / "oauth2" / "a.json"))
    assert tf.load() == {}
    tf.save({"refresh_token": "rt.x"})
    assert stat.S_IMODE(os.stat(tmp_path / "oauth2").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tf.path).st_mode) == 0o600
    assert tf.load() == {"refresh_token": "rt.x"}
    assert [p.name for p in (tmp_path / "oauth2").iterdir()] == ["a.json"]  # no temp left
    with tf.locked():
        assert stat.S_IMODE(os.stat(tf.path + ".lock").st_mode) == 0o600
    (tmp_path / "oauth2" / "a.json").write_text("{half")
    with pytest.raises(RelayqError, match=r"a\.json: damaged token file"):
        tf.load()


def test_token_file_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "oauth2").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "oauth2" / "a.json")
    with pytest.raises(RelayqError, match="symbolic link"):
        TokenFile(str(tmp_path / "oauth2" / "a.json")).load()


def test_the_lock_makes_a_second_holder_wait(tmp_path: Path) -> None:
    tf = TokenFile(str(tmp_path / "oauth2" / "a.json"))
    order: list[str] = []
    got = threading.Event()

    def other() -> None:
        with TokenFile(tf.path).locked():
            order.append("other")
            got.set()

    with tf.locked():
        thread = threading.Thread(target=other)
        thread.start()
        assert not got.wait(0.3)  # flock per open file: the other descriptor waits
        order.append("first")
    thread.join(10)
    assert order == ["first", "other"]


# --- the fake endpoint's flows ------------------------------------------------------


def test_fake_device_code_flow(token_endpoint: FakeTokenEndpoint) -> None:
    ep = token_endpoint
    status, dev = post_form(ep.device_url, {"client_id": ep.client_id, "scope": "smtp"},
                            timeout=10)
    assert status == 200 and dev["user_code"] and dev["verification_uri"].startswith(ep.url)
    poll = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": dev["device_code"], "client_id": ep.client_id}
    ep.device_interval = 30
    assert post_form(ep.token_url, poll, timeout=10)[1]["error"] == "authorization_pending"
    assert post_form(ep.token_url, poll, timeout=10)[1]["error"] == "slow_down"
    ep.approve_device(USER)
    status, answer = post_form(ep.token_url, poll, timeout=10)
    assert status == 200 and ep.accepts(USER, answer["access_token"])
    assert answer["refresh_token"] in ep.refresh_tokens(USER)
    assert post_form(ep.token_url, poll, timeout=10)[1]["error"] == "invalid_grant"  # used
    _, dev2 = post_form(ep.device_url, {"client_id": ep.client_id}, timeout=10)
    ep.deny_device()
    poll["device_code"] = dev2["device_code"]
    assert post_form(ep.token_url, poll, timeout=10)[1]["error"] == "access_denied"
    ep.device_lifetime = 0
    _, dev3 = post_form(ep.device_url, {"client_id": ep.client_id}, timeout=10)
    poll["device_code"] = dev3["device_code"]
    assert post_form(ep.token_url, poll, timeout=10)[1]["error"] == "expired_token"
    assert all(r.get("device_code") in (None, "***") for r in ep.requests)


class _NoFollow(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_fake_authorization_code_with_pkce(token_endpoint: FakeTokenEndpoint) -> None:
    ep = token_endpoint
    verifier = "v" * 50
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": ep.client_id, "scope": "smtp",
        "redirect_uri": "http://127.0.0.1:5555/", "state": "st8",
        "code_challenge": challenge.rstrip(b"=").decode(), "code_challenge_method": "S256"})
    opener = urllib.request.build_opener(_NoFollow())
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(ep.authorize_url + "?" + query, timeout=10)
    redirect.value.close()
    assert redirect.value.code == 302
    where = urllib.parse.urlsplit(redirect.value.headers["Location"])
    got = dict(urllib.parse.parse_qsl(where.query))
    assert where.port == 5555 and got["state"] == "st8"
    form = {"grant_type": "authorization_code", "code": got["code"], "client_id": ep.client_id,
            "redirect_uri": "http://127.0.0.1:5555/", "code_verifier": "w" * 50}
    assert post_form(ep.token_url, form, timeout=10)[1]["error"] == "invalid_grant"
    # a code is single use, also after a wrong verifier: ask for a new one
    with pytest.raises(urllib.error.HTTPError) as again:
        opener.open(ep.authorize_url + "?" + query, timeout=10)
    again.value.close()
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(
        again.value.headers["Location"]).query))["code"]
    form.update(code=code, code_verifier=verifier)
    status, answer = post_form(ep.token_url, form, timeout=10)
    assert status == 200 and ep.accepts(ep.browser_user, answer["access_token"])


def test_fake_client_credentials_needs_the_secret(token_endpoint: FakeTokenEndpoint) -> None:
    ep = token_endpoint
    ep.client_secret = "app-secret-1"
    form = {"grant_type": "client_credentials", "client_id": ep.client_id, "scope": "s"}
    assert post_form(ep.token_url, form, timeout=10)[0] == 401
    status, answer = post_form(ep.token_url, {**form, "client_secret": "app-secret-1"},
                               timeout=10)
    assert status == 200 and "refresh_token" not in answer
    assert ep.accepts("anyone@example.org", answer["access_token"])
    assert "app-secret-1" not in json.dumps(ep.requests)


# --- delivery.oauth2 ---------------------------------------------------------------------


def test_token_source_caches_then_refreshes_and_saves_the_rotated_token(
        token_endpoint: FakeTokenEndpoint, tmp_path: Path) -> None:
    ep = token_endpoint
    cfg = logged_in(ep, tmp_path)
    first_rt = token_file(cfg)["refresh_token"]
    src = TokenSource(cfg)
    token = src.access_token()
    assert ep.accepts(USER, token) and src.refreshes == 1
    saved = token_file(cfg)
    assert saved["refresh_token"] != first_rt  # rotated, and kept at once
    assert saved["refresh_token"] in ep.refresh_tokens(USER)
    assert first_rt in ep.refresh_tokens(USER)  # the old one still works at the fake
    assert src.access_token() == token and TokenSource(cfg).access_token() == token
    assert len(ep.token_requests("refresh_token")) == 1  # the file's token reused
    forced = src.access_token(force=True)  # after a 535
    assert forced != token and ep.accepts(USER, forced)
    used = [r for r in ep.token_requests("refresh_token")]
    assert len(used) == 2 and all(r["refresh_token"] == "***" for r in used)


def test_a_token_about_to_expire_is_refreshed(token_endpoint: FakeTokenEndpoint,
                                              tmp_path: Path) -> None:
    ep = token_endpoint
    ep.access_lifetime = 1
    cfg = logged_in(ep, tmp_path)
    src = TokenSource(cfg)
    old = src.access_token()
    time.sleep(1.2)
    assert not ep.accepts(USER, old)
    new = src.access_token()
    assert new != old and len(ep.token_requests("refresh_token")) == 2


def test_no_grant_yet_asks_for_a_login(token_endpoint: FakeTokenEndpoint,
                                       tmp_path: Path) -> None:
    with pytest.raises(ReauthNeeded) as exc:
        TokenSource(account(token_endpoint, tmp_path)).access_token()
    assert REAUTH_REASON in str(exc.value) and not token_endpoint.requests


def test_invalid_grant_is_recorded_once_and_the_postmaster_told_once(
        token_endpoint: FakeTokenEndpoint, tmp_path: Path) -> None:
    ep = token_endpoint
    cfg = logged_in(ep, tmp_path)
    ep.revoke()
    told: list[dict[str, Any]] = []
    with pytest.raises(GrantRevoked) as exc:
        TokenSource(cfg, notify=lambda c, m: told.append(m)).access_token()
    assert isinstance(exc.value, ReauthNeeded) and exc.value.error == "invalid_grant"
    assert REAUTH_REASON in str(exc.value) and "account default" in str(exc.value)
    mark = token_file(cfg)["reauth"]
    assert mark["notified"] is True and mark["error"].startswith("invalid_grant: AADSTS70008")
    assert len(told) == 1
    # the next run: held without asking the endpoint again, no second notice
    with pytest.raises(ReauthNeeded):
        TokenSource(cfg, notify=lambda c, m: told.append(m)).access_token()
    assert len(told) == 1 and len(ep.token_requests()) == 1
    assert [d["account"] for d in dead_grants(cfg)] == ["default"]
    save_grant(cfg, {"refresh_token": ep.grant(USER)})  # a new login clears it
    assert "reauth" not in token_file(cfg) and not dead_grants(cfg)
    assert ep.accepts(USER, TokenSource(cfg).access_token())


@pytest.mark.parametrize("fault", ["down", "stall", "503", "invalid_client"])
def test_endpoint_trouble_is_a_temporary_auth_failure(
        token_endpoint: FakeTokenEndpoint, tmp_path: Path, fault: str) -> None:
    ep = token_endpoint
    cfg = logged_in(ep, tmp_path, oauth2_timeout=1)
    if fault == "down":
        ep.down = True
    elif fault == "stall":
        ep.stall = 4
    elif fault == "503":
        ep.fail_with = (503, {"error": "temporarily_unavailable"})
    else:
        ep.client_id = "another-client"
    with pytest.raises(AuthFailed) as exc:
        TokenSource(cfg).access_token()
    # invalid_client (the application refused: an expired secret) holds the mail as a
    # dead grant does (REVIEW16 #16), under its own reason; the others are temporary
    assert isinstance(exc.value, ReauthNeeded) == (fault == "invalid_client")
    assert "reauth" not in token_file(cfg)
    assert {"down": "connection refused", "stall": "timed out", "503": "HTTP 503",
            "invalid_client": "invalid_client: unknown client_id"}[fault] in str(exc.value)
    if fault == "invalid_client":
        assert isinstance(exc.value, TokenError) and exc.value.error == "invalid_client"
        assert str(exc.value).startswith(CLIENT_REASON)


def test_client_credentials_gets_a_new_token_when_expired(
        token_endpoint: FakeTokenEndpoint, tmp_path: Path) -> None:
    ep = token_endpoint
    ep.client_secret = "app-secret-2"
    (tmp_path / "secret").write_text("app-secret-2\n")
    ep.access_lifetime = 1
    cfg = account(ep, tmp_path, oauth2_flow="client_credentials",
                  oauth2_client_secret_file=str(tmp_path / "secret"))
    src = TokenSource(cfg)
    first = src.access_token()
    assert ep.accepts(USER, first) and "refresh_token" not in token_file(cfg)
    time.sleep(1.2)
    second = src.access_token()
    assert second != first and ep.accepts(USER, second)
    assert "app-secret-2" not in json.dumps(token_file(cfg))


def test_exchange_adds_the_client_and_returns_the_answer(
        token_endpoint: FakeTokenEndpoint, tmp_path: Path) -> None:
    ep = token_endpoint
    cfg = account(ep, tmp_path)
    answer = exchange(cfg, {"grant_type": "refresh_token", "refresh_token": ep.grant(USER)})
    assert ep.accepts(USER, answer["access_token"])
    assert ep.requests[-1]["client_id"] == ep.client_id
    ep.fail_with = (400, {"error": "invalid_grant", "error_description": "x\x1b[31m" * 200})
    with pytest.raises(GrantRevoked) as exc:
        exchange(cfg, {"grant_type": "refresh_token", "refresh_token": "rt.y"})
    assert "\x1b" not in str(exc.value) and len(str(exc.value)) < 400


def test_idle_refresh_refreshes_only_old_tokens(token_endpoint: FakeTokenEndpoint,
                                                tmp_path: Path) -> None:
    ep = token_endpoint
    cfg = logged_in(ep, tmp_path, oauth2_idle_refresh=3600)
    TokenSource(cfg).access_token()
    lines: list[str] = []
    assert oauth2.refresh_due(cfg, log=lines.append) == 0
    data = token_file(cfg)
    data["refreshed_at"] -= 7200
    TokenFile(os.path.join(cfg.queue_dir, "oauth2", "default.json")).save(data)
    assert oauth2.refresh_due(cfg, log=lines.append) == 1
    assert token_file(cfg)["refreshed_at"] > time.time() - 60
    # a failure is logged once, not at every tick
    data = token_file(cfg)
    data["refreshed_at"] -= 7200
    TokenFile(os.path.join(cfg.queue_dir, "oauth2", "default.json")).save(data)
    ep.down = True
    failed: dict[str, str] = {}
    for _ in range(3):
        assert oauth2.refresh_due(cfg, log=lines.append, failed=failed) == 0
    assert sum("idle refresh of account default failed" in line for line in lines) == 1


def test_a_token_file_that_cannot_be_written_is_a_temporary_failure(
        token_endpoint: FakeTokenEndpoint, tmp_path: Path) -> None:
    cfg = logged_in(token_endpoint, tmp_path)
    directory = os.path.join(cfg.queue_dir, "oauth2")
    os.remove(os.path.join(directory, "default.json.lock"))
    os.mkdir(os.path.join(directory, "default.json.lock"))  # not a file: cannot be opened
    with pytest.raises(AuthFailed, match="OAuth2 token file: cannot open"):
        TokenSource(cfg).access_token()


# --- TLS and a proxy ------------------------------------------------------------------


def test_https_endpoint_with_oauth2_ca_file_and_an_untrusted_one(
        pki: TestPKI, tmp_path: Path) -> None:
    from relayq.testing.oauth2 import FakeTokenEndpoint

    ca = pki.write_ca(str(tmp_path))
    with FakeTokenEndpoint(tls_context=pki.server_context()) as ep:
        assert ep.token_url.startswith("https://127.0.0.1:")
        cfg = account(ep, tmp_path, oauth2_ca_file=ca)
        save_grant(cfg, {"refresh_token": ep.grant(USER)})
        assert ep.accepts(USER, TokenSource(cfg).access_token())
    with FakeTokenEndpoint(tls_context=pki.server_context("unknown-ca")) as ep:
        cfg = account(ep, tmp_path, oauth2_ca_file=ca)
        with pytest.raises(AuthFailed, match="TLS certificate not trusted"):
            exchange(cfg, {"grant_type": "refresh_token", "refresh_token": ep.grant(USER)})


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forwarding HTTP proxy (absolute-URI requests), recording what it carried."""

    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Proxy.seen.append(self.path)
        req = urllib.request.Request(self.path, data=body, method="POST",
                                     headers={"Content-Type": self.headers["Content-Type"]})
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    req, timeout=10) as resp:
                status, answer = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, answer = exc.code, exc.read()
            exc.close()
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


def test_oauth2_proxy_carries_the_token_request(token_endpoint: FakeTokenEndpoint,
                                                tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proxy = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = logged_in(token_endpoint, tmp_path, oauth2_proxy=proxy)
        assert token_endpoint.accepts(USER, TokenSource(cfg).access_token())
        assert _Proxy.seen == [token_endpoint.token_url]
    finally:
        server.shutdown()
        server.server_close()


def test_the_plugin_is_critical_while_a_grant_is_dead() -> None:
    from relayq.cli.nagios import Thresholds, check

    info: dict[str, Any] = {"messages": 0, "maildrop_waiting": 0, "oldest_age_seconds": None,
                            "warning": None, "dead_letters": 0, "daemon_pid": None,
                            "daemon_running": True, "quarantined": 0, "reauth": []}
    assert check(info, Thresholds(warning=5, critical=10))[0] == 0
    info["reauth"] = [{"account": "shop", "user": "u@x", "since": 1.0,
                       "error": "invalid_grant: AADSTS50173"}]
    code, line = check(info, Thresholds(warning=5, critical=10))
    assert code == 2 and line.startswith("RELAYQ CRITICAL - 0 messages waiting, account shop "
                                         "needs relayq oauth2 login (invalid_grant: AADSTS50173)")


def test_another_mailboxs_grant_is_not_used(token_endpoint: FakeTokenEndpoint,
                                            tmp_path: Path) -> None:
    cfg = logged_in(token_endpoint, tmp_path)
    TokenSource(cfg).access_token()
    other = account(token_endpoint, tmp_path, user="someone-else@example.org")
    with pytest.raises(ReauthNeeded, match=r"holds the grant of alerts@example\.org"):
        TokenSource(other).access_token()
    assert len(token_endpoint.token_requests()) == 1
