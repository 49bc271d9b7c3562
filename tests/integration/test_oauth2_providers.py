"""Issue 16's "done when", per provider: docs/configuration.md's worked example for a
Microsoft 365 mailbox and for a Gmail account, as written, with only the network
pointed at loopback (the smarthost, its CA, the token endpoints: the fakes of
relayq.testing), one `relayq oauth2 login`, and mail that keeps flowing across the
access token's expiry and the refresh token's rotation. Never a real provider."""

from __future__ import annotations

import json
import tomllib
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_oauth2_login import Running, printed_url, token_file

from relayq.core.errors import EX_OK

if TYPE_CHECKING:
    from relayq.testing.oauth2 import FakeTokenEndpoint
    from relayq.testing.smarthost import Smarthost, SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(180)

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def example(provider: str, flow: str = "refresh_token") -> dict[str, Any]:
    """The worked example of the docs for this provider and flow, as TOML values."""
    section = DOC.read_text().split("## OAuth2: Microsoft 365 and Gmail", 1)[1]
    for block in section.split("```toml\n")[1:]:
        values = tomllib.loads(block.split("```", 1)[0])
        if values["oauth2_provider"] == provider and \
                values.get("oauth2_flow", "refresh_token") == flow:
            return values
    raise AssertionError(f"no worked example for {provider} {flow}")


def on_loopback(values: dict[str, Any], relay: Smarthost, ep: FakeTokenEndpoint,
                pki: TestPKI, root: Path) -> dict[str, Any]:
    """The example with the network moved to loopback: nothing else changes."""
    ca = pki.write_ca(str(root))
    out = dict(values, smarthost=relay.smarthost, ca_file=ca,
               oauth2_token_url=ep.token_url, oauth2_device_url=ep.device_url,
               oauth2_authorize_url=ep.authorize_url)
    out.pop("port", None)  # the test smarthost's port is in its smarthost value
    return out


def server_for(root: Path, values: dict[str, Any]) -> Relayq:
    rq = Relayq(root, **values)
    del rq.settings["tls"]  # the harness's tls = "none": the example's default stands
    rq.configure()
    return rq


def relay_for(smarthost_factory: SmarthostFactory, pki: TestPKI,
              ep: FakeTokenEndpoint) -> Smarthost:
    # offers PLAIN too: the token must still go as XOAUTH2 (the old "best offered" bug)
    return smarthost_factory(tls_context=pki.server_context(),
                             auth_required=True, token_check=ep.accepts,
                             auth_mechanisms=("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"))


def send_and_run(rq: Relayq, user: str, n: int) -> None:
    msg = f"From: {user}\nTo: bob@example.org\nSubject: {n}\n\nmessage {n}\n".encode()
    assert rq.sendmail("-odq", "-f", user, "bob@example.org", input=msg).returncode == EX_OK
    run = rq.sendmail("-q")
    assert run.returncode == EX_OK, (run.stderr, rq.log()[-2000:])


def flows_across_expiry_and_rotation(rq: Relayq, relay: Smarthost, ep: FakeTokenEndpoint,
                                     user: str) -> None:
    first = json.loads(token_file(rq).read_text())["refresh_token"]
    send_and_run(rq, user, 1)
    ep.invalidate_access()  # every access token issued so far is dead at the provider
    send_and_run(rq, user, 2)  # 535, a refresh (rotating the refresh token), 235
    after = json.loads(token_file(rq).read_text())
    assert after["refresh_token"] != first  # the rotated one is kept
    assert len(relay.transactions) == 2
    logins = relay.logins
    assert {m for m, _, _ in logins} == {"XOAUTH2"} and {u for _, u, _ in logins} == {user}
    accepted = [t for m, u, t in logins]
    assert len(set(accepted)) >= 2  # a fresh access token for the second message
    log = rq.log()
    for secret in (first, after["refresh_token"], *accepted):
        assert secret not in log


def test_microsoft_365_mailbox_from_the_worked_example(
        tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI,
        token_endpoint: FakeTokenEndpoint) -> None:
    values = example("microsoft")
    token_endpoint.client_id = values["oauth2_client_id"]
    relay = relay_for(smarthost_factory, pki, token_endpoint)
    rq = server_for(tmp_path, on_loopback(values, relay, token_endpoint, pki, tmp_path))
    login = Running(rq.env, "oauth2", "login")
    login.until("enter")  # the device code is shown: the user signs in elsewhere
    token_endpoint.approve_device(values["user"])
    rc, out, err = login.finish()
    assert (rc, err) == (EX_OK, ""), out
    [asked] = [q for q in token_endpoint.requests if q.get("_path") == "/devicecode"]
    assert asked["scope"] == "https://outlook.office.com/SMTP.Send offline_access"
    flows_across_expiry_and_rotation(rq, relay, token_endpoint, values["user"])


def test_gmail_account_from_the_worked_example(
        tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI,
        token_endpoint: FakeTokenEndpoint) -> None:
    """The laptop's browser login with --output, then import on the server."""
    values = example("google")
    token_endpoint.client_id = values["oauth2_client_id"]
    token_endpoint.client_secret = "google-client-secret-1"
    token_endpoint.browser_user = values["user"]
    secret = tmp_path / "google-secret"
    secret.write_text("google-client-secret-1\n")
    secret.chmod(0o600)
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    grant = laptop / "gmail-grant.json"
    env = {k: v for k, v in Relayq(laptop).env.items() if k != "RELAYQ_CONFIG"}
    run = Running(env, "oauth2", "login", "--browser", "--output", str(grant),
                  "--provider", "google", "--client-id", values["oauth2_client_id"],
                  "--client-secret-file", str(secret), "--user", values["user"],
                  "--authorize-url", token_endpoint.authorize_url,
                  "--token-url", token_endpoint.token_url)
    with urllib.request.urlopen(printed_url(run), timeout=30) as page:  # the browser
        assert page.status == 200
    rc, out, err = run.finish()
    assert (rc, err) == (EX_OK, ""), out
    assert grant.stat().st_mode & 0o777 == 0o600
    relay = relay_for(smarthost_factory, pki, token_endpoint)
    server = tmp_path / "server"
    server.mkdir()
    values["oauth2_client_secret_file"] = str(secret)
    rq = server_for(server, on_loopback(values, relay, token_endpoint, pki, server))
    imported = rq.run("relayq", "oauth2", "import", str(grant))
    assert imported.returncode == EX_OK, imported.stderr
    flows_across_expiry_and_rotation(rq, relay, token_endpoint, values["user"])
