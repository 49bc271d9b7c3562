"""Regression tests for the adversarial review of issue 16, OAuth2 side (REVIEW16.md):
an endpoint's hostile numbers and echoed secrets, a FIFO at the token path, a
killed save's leftovers, an expired client secret."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import pytest

from relayq.core import oauth2
from relayq.core.config import Config, parse
from relayq.delivery.oauth2 import TokenSource, save_grant
from relayq.smtp.client import AuthFailed

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.oauth2 import FakeTokenEndpoint

pytestmark = pytest.mark.timeout(60)
USER = "alerts@example.org"


def config(tmp_path: Path, ep: FakeTokenEndpoint, **more: Any) -> Config:
    queue = tmp_path / "q"
    queue.mkdir(mode=0o700, exist_ok=True)
    lines = [f'queue_dir = "{queue}"', 'smarthost = "[127.0.0.1]:9"', f'user = "{USER}"',
             'oauth2_provider = "generic"', f'oauth2_client_id = "{ep.client_id}"',
             f'oauth2_token_url = "{ep.token_url}"', 'oauth2_scopes = ["smtp"]',
             'oauth2_timeout = 5']
    lines += [f"{k} = {json.dumps(v)}" for k, v in more.items()]
    return parse("\n".join(lines) + "\n")


@pytest.mark.parametrize("expires_in", [10**400, "1e999", "NaN", -5, True, "soon", None])
def test_a_hostile_expires_in_is_bounded_and_the_rotated_token_kept(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint, expires_in: object) -> None:
    """A 400-digit integer raised OverflowError after the endpoint had rotated the refresh
    token (lost); inf/NaN wrote non-standard JSON and broke every later attempt."""
    cfg = config(tmp_path, token_endpoint)
    save_grant(cfg, {"refresh_token": "RT-old-1234"})
    answer: dict[str, Any] = {"access_token": "AT-new-5678", "refresh_token": "RT-rotated-9",
                              "token_type": "Bearer"}
    if expires_in is not None:
        answer["expires_in"] = expires_in
    token_endpoint.fail_with = (200, answer)
    assert TokenSource(cfg).access_token() == "AT-new-5678"
    raw = (tmp_path / "q" / "oauth2" / "default.json").read_text()
    data = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data["refresh_token"] == "RT-rotated-9"
    left = data["expires_at"] - data["refreshed_at"]
    assert oauth2.MIN_LIFETIME <= left <= oauth2.MAX_LIFETIME


def test_an_error_description_echoing_the_request_is_masked(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    secret = tmp_path / "secret"
    secret.write_text("client-secret-VALUE\n")
    secret.chmod(0o600)
    cfg = config(tmp_path, token_endpoint, oauth2_client_secret_file=str(secret))
    save_grant(cfg, {"refresh_token": "RT-echoed-4321"})
    token_endpoint.fail_with = (400, {
        "error": "invalid_request",
        "error_description": "bad request client_secret=client-secret-VALUE "
                             "refresh_token=RT-echoed-4321"})
    with pytest.raises(AuthFailed) as caught:
        TokenSource(cfg).access_token()
    assert "client-secret-VALUE" not in str(caught.value)
    assert "RT-echoed-4321" not in str(caught.value) and "***" in str(caught.value)


def test_a_fifo_at_the_token_path_is_refused_not_waited_on(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    cfg = config(tmp_path, token_endpoint)
    path = tmp_path / "q" / "oauth2" / "default.json"
    path.parent.mkdir(mode=0o700)
    os.mkfifo(path, 0o600)
    with pytest.raises(AuthFailed) as caught:
        TokenSource(cfg).access_token()
    assert "not a regular file" in str(caught.value)


def test_a_killed_saves_temporary_files_are_removed_by_the_next_save(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    """A SIGKILL between the temporary file's write and its rename left it, holding the
    refresh token, forever."""
    cfg = config(tmp_path, token_endpoint)
    save_grant(cfg, {"refresh_token": "RT-first-1111"})
    folder = tmp_path / "q" / "oauth2"
    stale = folder / ".default.json.0123456789abcdef.tmp"
    stale.write_text('{"refresh_token": "RT-first-1111"}')
    other = folder / ".other.json.0123456789abcdef.tmp"  # another account's: its own save
    other.write_text("{}")
    save_grant(cfg, {"refresh_token": "RT-second-2222"})
    assert not stale.exists() and other.exists()


def test_another_mailboxs_grant_needs_a_login_everywhere(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    """The account's user changed since the login: status and oauth2 status said all was
    well while delivery held the mail (two copies of the rule)."""
    from relayq.delivery.oauth2_login import account_status
    from relayq.system.tokenstore import dead_grants

    old = config(tmp_path, token_endpoint)
    save_grant(old, {"refresh_token": token_endpoint.grant(USER)})
    text = (tmp_path / "q" / "oauth2" / "default.json").read_text()
    cfg = parse(f'queue_dir = "{tmp_path / "q"}"\nsmarthost = "[127.0.0.1]:9"\n'
                f'user = "new@example.org"\noauth2_provider = "generic"\n'
                f'oauth2_client_id = "{token_endpoint.client_id}"\n'
                f'oauth2_token_url = "{token_endpoint.token_url}"\noauth2_scopes = ["smtp"]\n')
    with pytest.raises(AuthFailed, match="holds the grant of"):
        TokenSource(cfg).access_token()
    assert (tmp_path / "q" / "oauth2" / "default.json").read_text() == text  # not rewritten
    [dead] = dead_grants(cfg)
    assert "holds the grant of alerts@example.org" in dead["error"]
    row = account_status(cfg)
    assert row["reauth_needed"] and "holds the grant" in row["reauth_error"]


def test_an_expired_client_secret_holds_the_mail_and_alerts(
        tmp_path: Path, smarthost_factory: Any, pki: Any,
        token_endpoint: FakeTokenEndpoint) -> None:
    """invalid_client (an Azure client secret past its date) returned the mail at
    max_queue_age, silently; now it waits, status is critical, and a renewed secret
    (the endpoint answering again) lets it go."""
    import time

    from tests.integration.test_oauth2_commands import MSG, login, relayq_for

    relay = smarthost_factory(tls_context=pki.server_context(), auth_required=True,
                              auth_mechanisms=("XOAUTH2",), token_check=token_endpoint.accepts)
    rq = relayq_for(tmp_path, relay, token_endpoint, pki, max_queue_age=2, retry_min=1,
                    retry_max=1)
    login(rq, token_endpoint)
    token_endpoint.fail_with = (401, {"error": "invalid_client",
                                      "error_description": "AADSTS7000222: secret expired"})
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    assert rq.sendmail("-q").returncode == 75
    time.sleep(2.5)  # past max_queue_age
    assert rq.sendmail("-q").returncode == 75
    queued = rq.queued()
    assert [e.sender for e, _ in queued if not e.sender] == []  # no bounce
    plugin = rq.run("relayq", "status", "-w", "100", "-c", "200")
    assert plugin.returncode == 2 and b"renew oauth2_client_secret_file" in plugin.stdout
    token_endpoint.fail_with = None
    assert rq.sendmail("-q").returncode == 0 and len(relay.transactions) == 1
    assert rq.run("relayq", "status", "-w", "100", "-c", "200").returncode == 0


def test_a_dripping_endpoint_is_bounded_by_oauth2_timeout(tmp_path: Path) -> None:
    """Headers a byte at a time defeated the per-read timeout: an 18 s request with
    oauth2_timeout = 2. The drip here lasts past this test's own timeout (60 s): only
    a whole-request bound lets the call return, deferring."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for i in range(400):
            if stop.wait(0.5):
                break
            conn.sendall(b"X-Drip-%d: y\r\n" % i)
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    queue = tmp_path / "q"
    queue.mkdir(mode=0o700)
    cfg = parse(f'queue_dir = "{queue}"\nsmarthost = "[127.0.0.1]:9"\nuser = "{USER}"\n'
                'oauth2_provider = "generic"\noauth2_client_id = "cid"\n'
                f'oauth2_token_url = "http://127.0.0.1:{server.getsockname()[1]}/t"\n'
                'oauth2_scopes = ["smtp"]\noauth2_timeout = 1\n')
    save_grant(cfg, {"refresh_token": "RT-drip-1234"})
    try:
        with pytest.raises(AuthFailed, match="timed out"):
            TokenSource(cfg).access_token()
    finally:
        stop.set()
        time.sleep(0.1)
        server.close()


def test_proxy_credentials_are_a_secret(tmp_path: Path) -> None:
    """check-config printed http://user:pass@..., the cache kept it, and a world-readable
    file holding it was accepted."""
    from tests.helpers.relayq_env import Relayq

    rq = Relayq(tmp_path, oauth2_proxy="http://bob:pr0xy-pass@proxy.example.org:3128")
    rq.config.chmod(0o644)
    refused = rq.run("relayq", "check-config")
    assert refused.returncode == 78 and b"pr0xy-pass" not in refused.stdout + refused.stderr
    rq.config.chmod(0o600)
    shown = rq.run("relayq", "check-config")
    assert b"pr0xy-pass" not in shown.stdout + shown.stderr
    assert b'oauth2_proxy = "http://********@proxy.example.org:3128"' in shown.stdout


def test_a_bad_proxy_scheme_error_shows_no_password() -> None:
    from relayq.core.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse('user = "a@example.org"\noauth2_provider = "google"\noauth2_client_id = "x"\n'
              'oauth2_proxy = "socks5://bob:PROXYPASS@proxy.example.org:1080"\n')
    assert "PROXYPASS" not in str(caught.value) and "********" in str(caught.value)
