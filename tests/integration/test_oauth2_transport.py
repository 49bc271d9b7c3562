"""The SMTP transport with oauth2_provider set: its AUTH secret is the account's access
token from delivery.oauth2 (the fake token endpoint), checked by the real test
smarthost (token_check=endpoint.accepts) over real TLS."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import pytest
from tests.integration.test_smtp_transport import config, one, statuses, tls_keys

from relayq.core.policy import REAUTH_REASON, waits_on_us
from relayq.delivery.oauth2 import save_grant
from relayq.queue.spool import Spool

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.core.config import Config
    from relayq.testing.oauth2 import FakeTokenEndpoint
    from relayq.testing.smarthost import Smarthost, SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(60)
USER = "alerts@example.org"


@pytest.fixture
def relay(smarthost_factory: SmarthostFactory, pki: TestPKI,
          token_endpoint: FakeTokenEndpoint) -> Smarthost:
    return smarthost_factory(tls_context=pki.server_context(), auth_required=True,
                             auth_mechanisms=("PLAIN", "XOAUTH2", "OAUTHBEARER"),
                             token_check=token_endpoint.accepts)


def oauth_config(relay: Smarthost, ep: FakeTokenEndpoint, pki: TestPKI, tmp_path: Path,
                 **keys: Any) -> Config:
    queue = tmp_path / "q"
    queue.mkdir(mode=0o700, exist_ok=True)
    values: dict[str, Any] = {
        "user": USER, "oauth2_provider": "generic", "oauth2_client_id": ep.client_id,
        "oauth2_token_url": ep.token_url, "oauth2_scopes": ["smtp"], "oauth2_timeout": 5,
        "queue_dir": str(queue), "domain": "host.example.org", **tls_keys(pki, tmp_path)}
    hosts = keys.pop("smarthost", relay.smarthost)
    values.update(keys)
    return config(hosts, **values)


def logged_in(relay: Smarthost, ep: FakeTokenEndpoint, pki: TestPKI, tmp_path: Path,
              **keys: Any) -> Config:
    cfg = oauth_config(relay, ep, pki, tmp_path, **keys)
    save_grant(cfg, {"refresh_token": ep.grant(USER)})
    return cfg


def secrets_of(ep: FakeTokenEndpoint, relay: Smarthost) -> list[str]:
    """Every refresh and access token there is (to grep outputs for)."""
    return ep.refresh_tokens(USER) + [secret for _, _, secret in relay.logins]


def test_the_access_token_goes_as_xoauth2_and_is_cached(
        relay: Smarthost, token_endpoint: FakeTokenEndpoint, pki: TestPKI,
        tmp_path: Path) -> None:
    cfg = logged_in(relay, token_endpoint, pki, tmp_path)
    r, run = one(cfg)
    assert statuses(r) == ["sent"], r
    r2, run2 = one(cfg)  # another process later: the file's token, no new refresh
    assert statuses(r2) == ["sent"], r2
    assert [m for m, _, _ in relay.logins] == ["XOAUTH2", "XOAUTH2"]
    assert relay.logins[0][2] == relay.logins[1][2]
    assert len(token_endpoint.token_requests()) == 1
    said = run.said() + run2.said()
    for secret in secrets_of(token_endpoint, relay):
        assert secret not in said


def test_an_expired_token_is_refreshed_before_auth(
        relay: Smarthost, token_endpoint: FakeTokenEndpoint, pki: TestPKI,
        tmp_path: Path) -> None:
    token_endpoint.access_lifetime = 1
    cfg = logged_in(relay, token_endpoint, pki, tmp_path)
    assert statuses(one(cfg)[0]) == ["sent"]
    time.sleep(1.2)  # the cached token is now expired
    r, run = one(cfg)
    assert statuses(r) == ["sent"], r
    assert len(relay.logins) == 2 and relay.logins[0][2] != relay.logins[1][2]
    assert "535" not in "\n".join(run.transcript)  # refreshed first, never refused


def test_a_refused_cached_token_is_refreshed_once_and_auth_retried(
        relay: Smarthost, token_endpoint: FakeTokenEndpoint, pki: TestPKI,
        tmp_path: Path) -> None:
    cfg = logged_in(relay, token_endpoint, pki, tmp_path)
    assert statuses(one(cfg)[0]) == ["sent"]
    token_endpoint.invalidate_access()  # the file still holds a token the relay refuses
    r, run = one(cfg)
    assert statuses(r) == ["sent"], r
    said = "\n".join(run.transcript)
    assert "535" in said and "235" in said
    assert any("trying once more" in line for line in run.log)
    assert len(token_endpoint.token_requests("refresh_token")) == 2
    assert len(relay.logins) == 3  # the first run's, the refused one, the retried one


def test_a_revoked_grant_defers_with_the_reauth_reason_and_queues_one_notice(
        relay: Smarthost, token_endpoint: FakeTokenEndpoint, pki: TestPKI,
        tmp_path: Path) -> None:
    cfg = logged_in(relay, token_endpoint, pki, tmp_path)
    grants = token_endpoint.refresh_tokens(USER)
    token_endpoint.revoke()
    r, run = one(cfg)
    assert statuses(r) == ["deferred"]
    reply = r.outcomes[0].reply
    assert REAUTH_REASON in reply and "invalid_grant" in reply
    assert waits_on_us(reply, r.outcomes[0].remote)  # never returned at max_queue_age
    assert not relay.logins  # no AUTH attempted with a dead grant
    r2, _ = one(cfg)
    assert REAUTH_REASON in r2.outcomes[0].reply
    spool = Spool(cfg.queue_dir)
    notices = [spool.read_envelope(q) for q in spool.ids()]
    assert len(notices) == 1 and notices[0].sender == ""
    assert [x.address for x in notices[0].recipients] == ["postmaster@host.example.org"]
    with open(spool.data_path(notices[0].qid), "rb") as f:
        text = f.read().decode()
    assert "account default" in text and "relayq oauth2 login" in text
    assert "invalid_grant" in text
    for secret in grants:
        assert secret not in text and secret not in run.said()


@pytest.mark.parametrize("fault", ["down", "stall", "503"])
def test_endpoint_trouble_defers_and_mail_flows_when_it_is_back(
        relay: Smarthost, token_endpoint: FakeTokenEndpoint, pki: TestPKI,
        tmp_path: Path, fault: str) -> None:
    ep = token_endpoint
    cfg = logged_in(relay, ep, pki, tmp_path, oauth2_timeout=1)
    if fault == "down":
        ep.down = True
    elif fault == "stall":
        ep.stall = 10
    else:
        ep.fail_with = (503, {"error": "temporarily_unavailable"})
    t0 = time.monotonic()
    r, _ = one(cfg)
    assert time.monotonic() - t0 < 8  # within oauth2_timeout, not the stall
    assert statuses(r) == ["deferred"]
    reply = r.outcomes[0].reply
    assert "OAuth2 token endpoint" in reply and REAUTH_REASON not in reply
    assert r.outcomes[0].dsn_code.startswith("4.")
    ep.down, ep.stall, ep.fail_with = False, 0, None
    r, _ = one(cfg)
    assert statuses(r) == ["sent"], r


def test_the_session_deadline_bounds_the_token_request(
        relay: Smarthost, token_endpoint: FakeTokenEndpoint, pki: TestPKI,
        tmp_path: Path) -> None:
    cfg = logged_in(relay, token_endpoint, pki, tmp_path, oauth2_timeout=30,
                    session_deadline=2)
    token_endpoint.stall = 20
    t0 = time.monotonic()
    r, _ = one(cfg)
    assert time.monotonic() - t0 < 10
    assert statuses(r) == ["deferred"] and "timed out" in r.outcomes[0].reply


def test_client_credentials_through_the_transport(
        relay: Smarthost, token_endpoint: FakeTokenEndpoint, pki: TestPKI,
        tmp_path: Path) -> None:
    ep = token_endpoint
    ep.client_secret = "app-only-secret-xyz"
    ep.access_lifetime = 1
    secret = tmp_path / "client-secret"
    secret.write_text(ep.client_secret + "\n")
    cfg = oauth_config(relay, ep, pki, tmp_path, oauth2_flow="client_credentials",
                       oauth2_client_secret_file=str(secret))
    r, run = one(cfg)
    assert statuses(r) == ["sent"], r
    time.sleep(1.2)
    r, run2 = one(cfg)
    assert statuses(r) == ["sent"], r
    assert len(ep.token_requests("client_credentials")) == 2
    said = run.said() + run2.said()
    assert ep.client_secret not in said
    with open(os.path.join(cfg.queue_dir, "oauth2", "default.json")) as f:
        assert ep.client_secret not in f.read()


def test_a_failed_token_request_is_not_repeated_for_each_smarthost(
        relay: Smarthost, smarthost_factory: SmarthostFactory, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI, tmp_path: Path) -> None:
    backup = smarthost_factory(tls_context=pki.server_context(), auth_required=True,
                               auth_mechanisms=("XOAUTH2",), token_check=token_endpoint.accepts)
    cfg = logged_in(relay, token_endpoint, pki, tmp_path, oauth2_timeout=1,
                    smarthost=[relay.smarthost, backup.smarthost])
    token_endpoint.stall = 10
    t0 = time.monotonic()
    r, _ = one(cfg)
    assert statuses(r) == ["deferred"] and time.monotonic() - t0 < 8
    assert len(token_endpoint.token_requests()) == 1


def test_a_535_then_a_failing_endpoint_is_not_retried_at_the_next_smarthost(
        relay: Smarthost, smarthost_factory: SmarthostFactory, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI, tmp_path: Path) -> None:
    backup = smarthost_factory(tls_context=pki.server_context(), auth_required=True,
                               auth_mechanisms=("XOAUTH2",), token_check=token_endpoint.accepts)
    cfg = logged_in(relay, token_endpoint, pki, tmp_path,
                    smarthost=[relay.smarthost, backup.smarthost])
    assert statuses(one(cfg)[0]) == ["sent"]
    token_endpoint.invalidate_access()
    token_endpoint.fail_with = (503, {"error": "temporarily_unavailable"})
    r, _ = one(cfg)
    assert statuses(r) == ["deferred"] and "HTTP 503" in r.outcomes[0].reply
    assert len(token_endpoint.token_requests()) == 2  # the first login's, one forced refresh
    assert len(relay.logins) == 2 and not backup.logins
