"""`relayq oauth2 login|import|status` through the real command against the fake
OAuth2 endpoint (relayq.testing.oauth2): the device code flow, the browser's
(the test is the browser: it fetches the printed URL and follows the redirect to
relayq's loopback listener), a grant made on a "laptop" without relayq.toml and
imported on the "server", then real mail through the test smarthost with it."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error

from relayq.core.errors import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    RelayqError,
)

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.oauth2 import FakeTokenEndpoint
    from relayq.testing.smarthost import SmarthostFactory

pytestmark = pytest.mark.timeout(120)

USER = "alerts@example.org"
MSG = b"From: alerts@example.org\nTo: bob@example.org\nSubject: oauth2\n\nhello\n"


def server(tmp_path: Path, ep: FakeTokenEndpoint, **more: object) -> Relayq:
    root = tmp_path / "server"
    root.mkdir(exist_ok=True)
    settings: dict[str, object] = {
        "user": USER, "oauth2_provider": "generic", "oauth2_client_id": ep.client_id,
        "oauth2_token_url": ep.token_url, "oauth2_device_url": ep.device_url,
        "oauth2_authorize_url": ep.authorize_url, "oauth2_scopes": ["smtp"]}
    settings.update(more)
    return Relayq(root, **settings)


def quiet_env(env: dict[str, str]) -> dict[str, str]:
    """No display: relayq must print the URL, never depend on a browser opening."""
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        env.pop(name, None)
    return env


class Running:
    """A relayq command in the background whose output the test reads as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([str(BIN / "relayq"), *args], env=quiet_env(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def until(self, text: str, timeout: float = 60) -> str:
        """The first line of output holding `text` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            self.seen.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None and self.proc.stdout is not None
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        self.reader.join(timeout)
        self.proc.stdout.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, "".join(self.seen), err


def wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def record_answers(ep: FakeTokenEndpoint) -> list[str]:
    """The error (or "ok") of each device-code poll the endpoint answered."""
    answers: list[str] = []
    real = ep.token

    def token(form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        status, answer = real(form)
        if form.get("grant_type", "").endswith("device_code"):
            answers.append(str(answer.get("error", "ok")))
        return status, answer

    ep.token = token  # type: ignore[method-assign]
    return answers


def token_file(rq: Relayq, account: str = "default") -> Path:
    return rq.queue_dir / "oauth2" / f"{account}.json"


def secrets_in(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    return [data[k] for k in ("refresh_token", "access_token") if data.get(k)]


# --- the device code flow -------------------------------------------------------------

def test_device_login_shows_the_code_obeys_pending_and_slow_down_and_saves_the_grant(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    ep = token_endpoint
    answers = record_answers(ep)
    rq = server(tmp_path, ep)
    run = Running(rq.env, "oauth2", "login")
    where = run.until("open")
    code = run.until("enter").split()[-1]
    assert where.split()[-1] == ep.url + "/device" and len(code) == 9
    wait_for(lambda: "authorization_pending" in answers, "a pending poll")
    ep.device_interval = 4  # relayq's 1 s polls are now too fast: slow_down
    wait_for(lambda: "slow_down" in answers, "a slow_down")
    after = answers.index("slow_down") + 1
    wait_for(lambda: len(answers) > after, "the poll after slow_down")
    assert answers[after] == "authorization_pending"  # 5 s more: no second slow_down
    ep.approve_device(USER)
    rc, out, err = run.finish()
    assert (rc, err) == (EX_OK, ""), out
    assert answers[-1] == "ok" and answers.count("slow_down") == 1
    path = token_file(rq)
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data["refresh_token"] in ep.refresh_tokens(USER) and data["user"] == USER
    assert "reauth" not in data and f"saved in {path}" in out
    assert not any(s in out + err for s in secrets_in(path))


def test_device_login_declined_fails_in_one_line_and_saves_nothing(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    rq = server(tmp_path, token_endpoint)
    run = Running(rq.env, "oauth2", "login")
    run.until("enter")
    token_endpoint.deny_device()
    rc, _, err = run.finish()
    assert rc == EX_NOPERM
    line = assert_one_line_error(subprocess.CompletedProcess([], rc, b"", err.encode()))
    assert "access_denied" in line and "declined" in line
    assert not token_file(rq).exists()


def test_device_code_that_expires_is_a_temporary_failure(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    token_endpoint.device_lifetime = 2
    rq = server(tmp_path, token_endpoint)
    r = subprocess.run([str(BIN / "relayq"), "oauth2", "login"], env=quiet_env(rq.env),
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == EX_TEMPFAIL
    assert "expired" in assert_one_line_error(r) and not token_file(rq).exists()


def test_google_has_no_device_flow_and_says_to_use_the_browser(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    rq = Relayq(tmp_path / "s", user=USER, oauth2_provider="google",
                oauth2_client_id="123.apps.googleusercontent.com")
    r = rq.run("relayq", "oauth2", "login")
    assert r.returncode == EX_CONFIG and "--browser" in assert_one_line_error(r)


def test_client_credentials_needs_no_login_and_tests_a_token(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    token_endpoint.client_secret = "app-secret-value"
    secret = tmp_path / "client-secret"
    secret.write_text("app-secret-value\n")
    secret.chmod(0o600)
    rq = server(tmp_path, token_endpoint, oauth2_flow="client_credentials",
                oauth2_client_secret_file=str(secret))
    r = rq.run("relayq", "oauth2", "login")
    out = r.stdout.decode()
    assert r.returncode == EX_OK, r.stderr
    assert "no login is needed" in out and "valid until" in out
    assert "app-secret-value" not in out + r.stderr.decode()
    assert [q["grant_type"] for q in token_endpoint.token_requests()] == ["client_credentials"]


# --- the browser's login --------------------------------------------------------------

def fetch(url: str) -> None:
    """The browser: the provider's page, its redirect to relayq's listener."""
    with urllib.request.urlopen(url, timeout=30) as page:
        page.read()


def printed_url(run: Running) -> str:
    return run.until("/authorize?").strip()


def test_browser_login_with_pkce_through_the_loopback_listener(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    token_endpoint.browser_user = USER
    rq = server(tmp_path, token_endpoint)
    run = Running(rq.env, "oauth2", "login", "--browser")
    url = printed_url(run)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["code_challenge_method"] == "S256" and len(query["state"]) >= 32
    assert query["redirect_uri"].startswith("http://127.0.0.1:") and query["scope"] == "smtp"
    assert "code_verifier" not in query and len(query["code_challenge"]) == 43
    with urllib.request.urlopen(url, timeout=30) as page:  # 302 -> relayq's listener
        assert page.status == 200 and "Signed in" in page.read().decode()
    rc, out, err = run.finish()
    assert (rc, err) == (EX_OK, ""), out
    data = json.loads(token_file(rq).read_text())
    assert data["refresh_token"] in token_endpoint.refresh_tokens(USER)
    [exchange] = token_endpoint.token_requests("authorization_code")
    assert exchange["redirect_uri"] == query["redirect_uri"]
    assert not any(s in out for s in secrets_in(token_file(rq)))


def test_browser_answer_with_another_state_is_refused(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    rq = server(tmp_path, token_endpoint)
    run = Running(rq.env, "oauth2", "login", "--browser")
    url = printed_url(run)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    with pytest.raises(urllib.error.HTTPError) as sent:
        urllib.request.build_opener(NoRedirect).open(url, timeout=30)
    where = sent.value.headers["Location"]
    sent.value.close()
    forged = where.replace("state=", "state=forged")
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(forged, timeout=30)
    answered.value.close()
    assert answered.value.code == 400
    rc, _, err = run.finish()
    assert rc == EX_NOPERM and "state" in err and err.count("\n") == 1
    assert token_endpoint.token_requests("authorization_code") == []
    assert not token_file(rq).exists()


def test_a_sign_in_declined_in_the_browser_fails_in_one_line(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    rq = server(tmp_path, token_endpoint)
    run = Running(rq.env, "oauth2", "login", "--browser")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(printed_url(run)).query))
    answer = urllib.parse.urlencode({"error": "access_denied", "state": query["state"],
                                     "error_description": "The user said no\x1b[31m"})
    with pytest.raises(urllib.error.HTTPError) as page:
        urllib.request.urlopen(f"{query['redirect_uri']}?{answer}", timeout=30)
    page.value.close()
    rc, _, err = run.finish()
    assert rc == EX_NOPERM and err.count("\n") == 1
    assert "access_denied: The user said no" in err and "\x1b" not in err
    assert not token_file(rq).exists()


def test_a_wrong_code_verifier_is_refused_at_the_endpoint(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    from relayq.delivery.oauth2_browser import BrowserLogin
    from relayq.system.configfile import load

    rq = server(tmp_path, token_endpoint)
    cfg = load(str(rq.config))
    with BrowserLogin(cfg) as flow:
        url = flow.url()
        flow.verifier = flow.verifier[::-1]  # not the one the challenge was made from
        browser = threading.Thread(target=fetch, args=(url,))
        browser.start()
        code = flow.wait(60)
        browser.join(30)
        with pytest.raises(RelayqError) as refused:
            flow.finish(code)
    assert refused.value.code == EX_NOPERM and "code_verifier" in refused.value.message
    assert code not in refused.value.message
    assert "run relayq oauth2 login" not in refused.value.message  # we are that login


def test_no_browser_answer_in_time_is_a_temporary_failure(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    rq = server(tmp_path, token_endpoint)
    r = subprocess.run([str(BIN / "relayq"), "oauth2", "login", "--browser", "--timeout", "1"],
                       env=quiet_env(rq.env), capture_output=True, timeout=60, check=False)
    assert r.returncode == EX_TEMPFAIL and "no answer" in assert_one_line_error(r)


# --- a laptop's grant, imported on the server, then real mail -----------------------------

def laptop_login(tmp_path: Path, ep: FakeTokenEndpoint, output: Path) -> tuple[int, str, str]:
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    env = dict(os.environ, RELAYQ_CONFIG=str(laptop / "no-such-relayq.toml"),
               HOME=str(laptop))
    run = Running(env, "oauth2", "login", "--browser", "--output", str(output),
                  "--provider", "generic", "--client-id", ep.client_id, "--user", USER,
                  "--authorize-url", ep.authorize_url, "--token-url", ep.token_url,
                  "--scope", "smtp")
    with urllib.request.urlopen(printed_url(run), timeout=30) as page:
        assert page.status == 200
    return run.finish()


def test_a_laptop_grant_imported_on_the_server_sends_mail(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint,
        smarthost_factory: SmarthostFactory) -> None:
    ep = token_endpoint
    ep.browser_user = USER
    grant = tmp_path / "laptop-grant.json"
    rc, out, err = laptop_login(tmp_path, ep, grant)
    assert (rc, err) == (EX_OK, ""), out
    assert grant.stat().st_mode & 0o777 == 0o600 and "relayq oauth2 import" in out
    assert not (tmp_path / "laptop" / "no-such-relayq.toml").exists()
    sh = smarthost_factory(token_check=ep.accepts, auth_mechanisms=("PLAIN", "XOAUTH2"),
                           auth_required=True, auth_require_tls=False)
    rq = server(tmp_path, ep, smarthost=sh.smarthost)
    r = rq.run("relayq", "oauth2", "import", str(grant))
    assert r.returncode == EX_OK, r.stderr
    assert json.loads(token_file(rq).read_text())["refresh_token"] == \
        json.loads(grant.read_text())["refresh_token"]
    assert token_file(rq).stat().st_mode & 0o777 == 0o600
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    assert rq.run("relayq", "flush").returncode == EX_OK
    assert [(m, u) for m, u, _ in sh.logins] == [("XOAUTH2", USER)]
    assert len(sh.transactions) == 1 and rq.queued() == []


def test_import_refuses_what_is_not_this_accounts_grant(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    rq = server(tmp_path, token_endpoint)
    cases = [({"refresh_token": "rt.x", "client_id": "another-app"}, EX_CONFIG, "client_id"),
             ({"refresh_token": "rt.x", "user": "someone@else.example"}, EX_CONFIG, "user"),
             ({"access_token": "at.x"}, EX_DATAERR, "no refresh token"),
             ("not json {", EX_DATAERR, "not a token file")]
    for n, (content, code, words) in enumerate(cases):
        f = tmp_path / f"grant{n}.json"
        f.write_text(content if isinstance(content, str) else json.dumps(content))
        r = rq.run("relayq", "oauth2", "import", str(f))
        assert r.returncode == code and words in assert_one_line_error(r), (content, r)
        assert "rt.x" not in r.stderr.decode()
    r = rq.run("relayq", "oauth2", "import", str(tmp_path / "missing.json"))
    assert r.returncode == EX_NOINPUT and assert_one_line_error(r)
    assert not token_file(rq).exists()


def test_root_imports_the_grant_for_the_queues_owner(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    """The daemon runs as the queue's owner (daemon_user): the token file must be its,
    mode 0600, though root ran the import."""
    import pwd
    import shutil

    from tests.helpers.users import DAEMON_USER, System, ensure_users, install_launchers

    ensure_users()
    owner = pwd.getpwnam(DAEMON_USER)
    ep = token_endpoint
    launchers = install_launchers()
    system = System(launchers, install=False, daemon_user=DAEMON_USER, user=USER,
                    oauth2_provider="generic", oauth2_client_id=ep.client_id,
                    oauth2_token_url=ep.token_url, oauth2_scopes=["smtp"])
    try:
        grant = tmp_path / "grant.json"  # root's: read before relayq becomes the owner
        grant.write_text(json.dumps({"refresh_token": ep.grant(USER)}))
        grant.chmod(0o600)
        r = system.relayq_as("root", "oauth2", "import", str(grant))
        assert r.returncode == EX_OK, r.stderr
        tokens = system.spool_root / "oauth2"
        st = (tokens / "default.json").stat()
        assert (st.st_uid, st.st_mode & 0o777) == (owner.pw_uid, 0o600)
        assert tokens.stat().st_uid == owner.pw_uid
        status = system.relayq_as("root", "oauth2", "status", "--json")
        assert json.loads(status.stdout)[0]["has_refresh_token"], status.stderr
    finally:
        system.cleanup()
        shutil.rmtree(launchers, ignore_errors=True)


def test_accounts_each_have_their_grant_and_are_named_with_account(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    ep = token_endpoint
    rq = server(tmp_path, ep)
    rq.write_config(rq.config.read_text() + f"""
[account.shop]
senders = ["@shop.example"]
smarthost = "[127.0.0.1]:9"
tls = "none"
user = "noreply@shop.example"
oauth2_provider = "generic"
oauth2_client_id = "{ep.client_id}"
oauth2_token_url = "{ep.token_url}"
oauth2_scopes = ["smtp"]
""")
    grant = tmp_path / "shop.json"
    grant.write_text(json.dumps({"refresh_token": ep.grant("noreply@shop.example"),
                                 "user": "noreply@shop.example"}))
    r = rq.run("relayq", "oauth2", "import", str(grant))
    assert r.returncode == EX_USAGE and "--account" in assert_one_line_error(r)
    r = rq.run("relayq", "oauth2", "import", str(grant), "--account", "default")
    assert r.returncode == EX_CONFIG and "user" in assert_one_line_error(r)  # not its mailbox
    assert rq.run("relayq", "oauth2", "import", str(grant), "--account", "shop").returncode == 0
    assert token_file(rq, "shop").exists() and not token_file(rq).exists()
    rows = json.loads(rq.run("relayq", "oauth2", "status", "--json").stdout)
    assert [(r["account"], r["has_refresh_token"]) for r in rows] == [
        ("default", False), ("shop", True)]
    [shop] = json.loads(rq.run("relayq", "oauth2", "status", "--json", "--account",
                               "shop").stdout)
    assert shop["user"] == "noreply@shop.example" and not shop["reauth_needed"]


# --- status ---------------------------------------------------------------------------

def test_status_shows_each_accounts_token_and_no_secret(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    from relayq.delivery.oauth2 import TokenSource
    from relayq.smtp.client import ReauthNeeded
    from relayq.system.configfile import load

    ep = token_endpoint
    ep.client_secret = "client-secret-value"
    secret = tmp_path / "client-secret"
    secret.write_text("client-secret-value\n")
    secret.chmod(0o600)
    rq = server(tmp_path, ep, oauth2_client_secret_file=str(secret))
    grant = tmp_path / "grant.json"
    grant.write_text(json.dumps({"refresh_token": ep.grant(USER), "user": USER}))
    assert rq.run("relayq", "oauth2", "import", str(grant)).returncode == EX_OK
    cfg = load(str(rq.config))
    TokenSource(cfg).access_token()  # a refresh: an access token and a last refresh
    text = rq.run("relayq", "oauth2", "status")
    out = text.stdout.decode()
    assert text.returncode == EX_OK, text.stderr
    for words in ("account default: generic, refresh_token as alerts@example.org",
                  "refresh token  yes", "access token   valid until", "login needed   no"):
        assert words in out, out
    shown = rq.run("relayq", "oauth2", "status", "--json")
    [row] = json.loads(shown.stdout)
    assert row["has_refresh_token"] and row["access_token_valid"] and not row["reauth_needed"]
    hidden = [*secrets_in(token_file(rq)), "client-secret-value", json.loads(grant.read_text())
              ["refresh_token"]]
    assert not any(s in out + shown.stdout.decode() for s in hidden)
    ep.revoke()
    source = TokenSource(cfg)
    source.access_token()
    with pytest.raises(ReauthNeeded):
        source.access_token(force=True)  # as after a 535: the refresh meets invalid_grant
    out = rq.run("relayq", "oauth2", "status").stdout.decode()
    assert "login needed   yes: invalid_grant" in out and "relayq oauth2 login" in out
    [row] = json.loads(rq.run("relayq", "oauth2", "status", "--json").stdout)
    assert row["reauth_needed"] and row["reauth_error"].startswith("invalid_grant")


def test_status_before_any_login_says_a_login_is_needed(
        tmp_path: Path, token_endpoint: FakeTokenEndpoint) -> None:
    rq = server(tmp_path, token_endpoint)
    r = rq.run("relayq", "oauth2", "status")
    assert r.returncode == EX_OK and "(none yet)" in r.stdout.decode()
    assert "login needed   yes: no grant yet" in r.stdout.decode()


# --- usage ----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["oauth2"],
    ["oauth2", "logout"],
    ["oauth2", "login", "--port", "8080"],
    ["oauth2", "login", "--browser", "--port", "70000"],
    ["oauth2", "login", "--browser", "--timeout", "soon"],
    ["oauth2", "login", "--provider", "google", "--client-id", "x", "--user", USER],
    ["oauth2", "login", "--browser", "--output", "f.json", "--provider", "google"],
    ["oauth2", "login", "--client-id", "x"],
    ["oauth2", "login", "--account", "nosuch"],
    ["oauth2", "import"],
    ["oauth2", "status", "--account", "nosuch"],
], ids=lambda a: " ".join(a[1:]) or "no action")
def test_usage_errors_exit_64_in_one_line(tmp_path: Path, token_endpoint: FakeTokenEndpoint,
                                          args: list[str]) -> None:
    rq = server(tmp_path, token_endpoint)
    r = rq.run("relayq", *args)
    assert r.returncode == EX_USAGE, r
    assert_one_line_error(r)


# --- the worked examples ------------------------------------------------------------------

def test_the_worked_examples_are_valid_configurations() -> None:
    """docs/configuration.md's OAuth2 examples parse, with the rules of the keys."""
    from pathlib import Path

    from relayq.core import oauth2
    from relayq.core.config import parse

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    section = doc.split("## OAuth2: Microsoft 365 and Gmail", 1)[1]
    examples = [block.split("```", 1)[0] for block in section.split("```toml\n")[1:]]
    assert len(examples) == 3
    seen = []
    for text in examples:
        cfg = parse(text, "example.toml")
        seen.append((cfg.oauth2_provider, cfg.oauth2_flow, cfg.tls, cfg.port))
        assert oauth2.endpoints(cfg)[2].startswith("https://") and oauth2.scopes(cfg)
    assert seen == [("microsoft", "refresh_token", "required", 587),
                    ("microsoft", "client_credentials", "required", 587),
                    ("google", "refresh_token", "required", 587)]
