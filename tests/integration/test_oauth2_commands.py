"""OAuth2 through relayq's real commands (sendmail -> queue run -> the test smarthost,
which checks each token at the fake endpoint): rotation saved, a revoked grant held
with one notice and a critical status, the endpoint down then back, two processes
refreshing at once, the token file's mode and owner, and no secret anywhere."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.relayq_env import BIN, Relayq

from relayq.core.config import parse
from relayq.core.policy import REAUTH_REASON
from relayq.delivery.oauth2 import save_grant

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.core.config import Config
    from relayq.testing.oauth2 import FakeTokenEndpoint
    from relayq.testing.smarthost import Smarthost, SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(120)
USER = "alerts@example.org"
MSG = b"Subject: oauth2\n\nhello\n"


@pytest.fixture
def relay(smarthost_factory: SmarthostFactory, pki: TestPKI,
          token_endpoint: FakeTokenEndpoint) -> Smarthost:
    return smarthost_factory(tls_context=pki.server_context(), auth_required=True,
                             auth_mechanisms=("PLAIN", "XOAUTH2"),
                             token_check=token_endpoint.accepts)


def relayq_for(root: Path, relay: Smarthost, ep: FakeTokenEndpoint, pki: TestPKI,
               **settings: Any) -> Relayq:
    ca = pki.write_ca(str(root))
    os.chmod(ca, 0o644)
    values: dict[str, Any] = {
        "smarthost": relay.smarthost, "tls": "required", "ca_file": ca, "user": USER,
        "oauth2_provider": "generic", "oauth2_client_id": ep.client_id,
        "oauth2_token_url": ep.token_url, "oauth2_scopes": ["smtp"], "oauth2_timeout": 5}
    values.update(settings)
    return Relayq(root, **values)


def cfg_of(rq: Relayq) -> Config:
    return parse(rq.config.read_text())


def login(rq: Relayq, ep: FakeTokenEndpoint) -> str:
    refresh = ep.grant(USER)
    save_grant(cfg_of(rq), {"refresh_token": refresh})
    return refresh


def token_path(rq: Relayq) -> Path:
    return rq.queue_dir / "oauth2" / "default.json"


def token_data(rq: Relayq) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(token_path(rq).read_text())
    return data


def secrets_seen(ep: FakeTokenEndpoint, relay: Smarthost, *extra: str) -> list[str]:
    return [*ep.refresh_tokens(USER), *(s for _, _, s in relay.logins), *extra]


def assert_no_secret(text: str | bytes, secrets: list[str]) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for secret in secrets:
        assert secret not in text, "a secret leaked"


def test_rotation_is_saved_and_the_new_refresh_token_used(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    ep.access_lifetime = 1  # every run needs a refresh
    rq = relayq_for(tmp_path, relay, ep, pki)
    first = login(rq, ep)
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    r = rq.run("relayq", "run")
    assert r.returncode == 0, r.stderr
    second = token_data(rq)["refresh_token"]
    assert second != first and second in ep.refresh_tokens(USER)
    assert first in ep.refresh_tokens(USER)  # still valid at the fake, but not used again
    time.sleep(1.2)
    assert rq.sendmail("-odq", "b@example.org", input=MSG).returncode == 0
    verbose = rq.sendmail("-q", "-v")  # the -v transcript of a refresh and an AUTH
    assert verbose.returncode == 0, verbose.stderr
    assert b"AUTH XOAUTH2" in verbose.stdout + verbose.stderr
    assert len(relay.transactions) == 2
    used = [r for r in ep.requests if r.get("grant_type") == "refresh_token"]
    assert len(used) == 2
    assert token_data(rq)["refresh_token"] not in (first, second)
    secrets = secrets_seen(ep, relay, first, second)
    for out in (rq.log(), verbose.stdout + verbose.stderr, rq.run("mailq").stdout):
        assert_no_secret(out, secrets)


def test_a_bounce_after_an_oauth2_login_quotes_no_token(
        tmp_path: Path, smarthost_factory: SmarthostFactory, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    relay = smarthost_factory(tls_context=pki.server_context(), auth_required=True,
                              auth_mechanisms=("XOAUTH2",), token_check=ep.accepts,
                              rcpt_replies={"gone@example.org": "550 5.1.1 no such user"})
    rq = relayq_for(tmp_path, relay, ep, pki)
    refresh = login(rq, ep)
    assert rq.sendmail("-odq", "-f", "sender@example.org", "gone@example.org",
                       input=MSG).returncode == 0
    run = rq.sendmail("-q", "-v")
    bounces = [d for e, d in rq.queued() if not e.sender]
    sent = [t.content for t in relay.transactions if t.mail_from in ("", "<>")]  # went
    assert bounces or sent, "no bounce was made"
    assert b"no such user" in b"".join([*bounces, *sent])
    for text in [*bounces, *sent, run.stdout + run.stderr, rq.log().encode()]:
        assert_no_secret(text, secrets_seen(ep, relay, refresh))


def test_a_revoked_grant_holds_mail_past_max_queue_age_with_one_notice(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    rq = relayq_for(tmp_path, relay, ep, pki, max_queue_age=2, retry_min=1, retry_max=1,
                    local_forward="admin@example.net")
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    refresh = login(rq, ep)
    ep.revoke()
    verbose = rq.sendmail("-q", "-v")
    assert verbose.returncode == 75
    time.sleep(2.5)  # past max_queue_age
    assert rq.sendmail("-q").returncode == 75
    queued = rq.queued()
    mail = [e for e, _ in queued if e.sender]
    notices = [(e, d) for e, d in queued if not e.sender]
    assert len(mail) == 1 and mail[0].recipients[0].state != "failed"
    assert REAUTH_REASON in mail[0].recipients[0].reply
    assert len(notices) == 1, [e.recipients for e, _ in notices]  # no bounce, one notice
    env, data = notices[0]
    assert [r.address for r in env.recipients] == ["admin@example.net"]  # local_forward
    assert b"relayq oauth2 login" in data and b"account default" in data
    assert token_data(rq)["reauth"]["notified"] is True
    mailq = rq.run("mailq")
    assert REAUTH_REASON.encode() in mailq.stdout
    plugin = rq.run("relayq", "status", "-w", "100", "-c", "200")
    assert plugin.returncode == 2, plugin.stdout
    assert plugin.stdout.startswith(b"RELAYQ CRITICAL - ")
    assert b"account default needs relayq oauth2 login" in plugin.stdout
    text = rq.run("relayq", "status")
    assert b"CRITICAL:     account default" in text.stdout
    info = json.loads(rq.run("relayq", "status", "--json").stdout)
    assert [d["account"] for d in info["reauth"]] == ["default"]
    assert rq.sendmail("-q").returncode == 75  # a third run: still one notice
    assert len([e for e, _ in rq.queued() if not e.sender]) == 1
    assert rq.log().count("re-authorization notice queued") == 1
    secrets = secrets_seen(ep, relay, refresh)
    for out in (verbose.stdout + verbose.stderr, mailq.stdout, plugin.stdout, text.stdout,
                rq.log().encode(), data):
        assert_no_secret(out, secrets)
    # a new login: the mail goes, status is OK again
    login(rq, ep)
    assert rq.sendmail("-q").returncode == 0
    assert not rq.queued() and len(relay.transactions) == 2
    assert rq.run("relayq", "status", "-w", "100", "-c", "200").returncode == 0


def test_endpoint_down_defers_then_mail_flows(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    rq = relayq_for(tmp_path, relay, ep, pki, oauth2_timeout=2)
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    login(rq, ep)
    ep.down = True
    assert rq.sendmail("-q").returncode == 75
    [(env, _)] = rq.queued()
    assert "OAuth2 token endpoint" in env.recipients[0].reply
    assert "connection refused" in env.recipients[0].reply
    ep.stall, ep.down = 30, False
    t0 = time.monotonic()
    assert rq.sendmail("-q").returncode == 75
    assert time.monotonic() - t0 < 20  # oauth2_timeout, not the stall
    assert "timed out" in rq.queued()[0][0].recipients[0].reply
    ep.stall = 0
    assert rq.sendmail("-q").returncode == 0
    assert not rq.queued() and len(relay.transactions) == 1


REFRESH = """
import sys, time
from relayq.core.config import parse
from relayq.delivery.oauth2 import TokenSource
cfg = parse(open(sys.argv[1]).read())
go = sys.argv[2]
while not __import__("os").path.exists(go):
    time.sleep(0.01)
print(TokenSource(cfg).access_token(force=True))
"""


def test_two_processes_refreshing_at_once_leave_one_consistent_file(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    ep.stall = 0.5  # each refresh takes a while: the two overlap
    rq = relayq_for(tmp_path, relay, ep, pki)
    rq.queue_dir.mkdir(mode=0o700)
    login(rq, ep)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", REFRESH, str(rq.config), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    time.sleep(0.3)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    tokens = [o.decode().strip() for o, _ in outs]
    refreshes = [r for r in ep.requests if r.get("grant_type") == "refresh_token"]
    assert 1 <= len(refreshes) <= 2
    data = token_data(rq)  # parseable, whole
    assert data["access_token"] in tokens and ep.accepts(USER, data["access_token"])
    assert data["refresh_token"] in ep.refresh_tokens(USER)
    assert sorted(p.name for p in token_path(rq).parent.iterdir()) == [
        "default.json", "default.json.lock"]  # no temporary file left
    assert rq.sendmail("-odi", "a@example.org", input=MSG).returncode == 0
    assert len(relay.transactions) == 1


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged queue owner can reach (pytest's are root's, 0700)."""
    work = Path(tempfile.mkdtemp(prefix="relayq-oauth2-", dir="/tmp"))
    work.chmod(0o755)
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a queue for nobody")
def test_the_token_file_is_0600_and_the_queue_owners(
        shared_dir: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    state = shared_dir / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    rq = relayq_for(state, relay, ep, pki, daemon_user="nobody")
    rq.log_file.touch()
    os.chown(rq.log_file, 65534, 65534)
    first = login(rq, ep)  # as root, like `relayq oauth2 login`, before any mail
    assert os.stat(rq.queue_dir).st_uid == 65534  # the queue made for its owner
    for path in (token_path(rq), token_path(rq).parent):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (65534, 65534), path
    assert stat.S_IMODE(os.stat(token_path(rq)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(token_path(rq).parent).st_mode) == 0o700
    assert _refresh_as_nobody(rq) == 0  # the owner can lock, refresh and rewrite it
    st = os.stat(token_path(rq))
    assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o600
    assert token_data(rq)["refresh_token"] != first
    first = token_data(rq)["refresh_token"]
    drop = ("import os; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "import relayq.delivery.oauth2")
    probe = subprocess.run([sys.executable, "-c", drop], capture_output=True, timeout=30,
                           check=False)  # this interpreter and relayq, after the same drop
    if probe.returncode != 0:
        pytest.skip("relayq's installation is not readable by nobody here")
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    r = rq.run("relayq", "run")  # becomes nobody, refreshes, rewrites the file
    assert r.returncode == 0, r.stderr
    assert len(relay.transactions) == 1
    assert token_data(rq)["refresh_token"] != first
    st = os.stat(token_path(rq))
    assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o600


def _refresh_as_nobody(rq: Relayq) -> int:
    """A forced refresh in a forked child that became nobody (the modules it needs
    are loaded before the fork: this installation may not be readable by nobody)."""
    import encodings.idna  # noqa: F401 - loaded before the drop

    from relayq.delivery.oauth2 import TokenSource

    cfg = cfg_of(rq)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            TokenSource(cfg).access_token(force=True)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_no_secret_in_argv_environment_or_check_config(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    ep.client_secret = "client-secret-from-file-42"
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(ep.client_secret + "\n")
    secret_file.chmod(0o600)
    rq = relayq_for(tmp_path, relay, ep, pki, oauth2_client_secret_file=str(secret_file))
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    refresh = login(rq, ep)
    ep.stall = 3  # the run waits on the endpoint: look at it meanwhile
    run = subprocess.Popen([str(BIN / "relayq"), "run"], env=rq.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ep.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = []
    for pid in [run.pid, *_children(run.pid)]:
        for what in ("cmdline", "environ"):
            try:
                seen.append(Path(f"/proc/{pid}/{what}").read_bytes())
            except OSError:
                pass
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert seen
    secrets = secrets_seen(ep, relay, refresh, ep.client_secret)
    for blob in [*seen, out, err, rq.log().encode()]:
        assert_no_secret(blob, secrets)
    assert ep.requests[0]["client_secret"] == "***"  # it was sent, in the form only
    check = rq.run("relayq", "check-config")
    assert check.returncode == 0, check.stderr
    assert_no_secret(check.stdout + check.stderr, secrets)
    assert str(secret_file).encode() in check.stdout  # the path, never the content


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


ENV_DUMP = """
import json, os, sys
json.dump(dict(os.environ), open(sys.argv[1], "w"))
print("hunter2-password-value")
"""


def test_a_password_commands_child_inherits_nothing_we_set(
        tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI) -> None:
    sh = smarthost_factory(tls_context=pki.server_context(),
                           auth={USER: "hunter2-password-value"})
    script = tmp_path / "pw.py"
    script.write_text(ENV_DUMP)
    dump = tmp_path / "env.json"
    ca = pki.write_ca(str(tmp_path))
    rq = Relayq(tmp_path, smarthost=sh.smarthost, tls="required", ca_file=ca, user=USER,
                password_command=f"{sys.executable} {script} {dump}")
    assert rq.sendmail("-odi", "a@example.org", input=MSG).returncode == 0
    child = json.loads(dump.read_text())
    given = rq.env
    added = {k for k in child if k not in given}
    assert added <= {"HOME"}, added  # nothing of ours, let alone a secret
    assert not any("hunter2" in v for v in child.values())


def test_an_idle_daemon_refreshes_an_old_grant_and_logs_a_failure_once(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    from tests.integration.test_daemon import DaemonProcess, wait_for

    ep = token_endpoint
    rq = relayq_for(tmp_path, relay, ep, pki, oauth2_idle_refresh=4, queue_interval="1h",
                    pid_file=str(tmp_path / "relayq.pid"))
    first = login(rq, ep)
    d = DaemonProcess(rq).wait_ready()
    try:
        wait_for(lambda: "OAuth2 access token of account default refreshed" in rq.log(),
                 what="the idle refresh")
        assert token_data(rq)["refresh_token"] != first  # rotated and saved
        assert relay.logins == []  # no mail was sent: the daemon only kept the grant alive
        ep.down = True
        wait_for(lambda: "idle refresh of account default failed" in rq.log(),
                 what="a failed idle refresh")
        time.sleep(3)  # at least one more tick past the idle time
        assert rq.log().count("idle refresh of account default failed") == 1
        assert d.proc.poll() is None  # never fatal
    finally:
        assert d.stop() == 0


def test_relayq_test_logs_in_with_the_token_and_shows_none(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    ep = token_endpoint
    rq = relayq_for(tmp_path, relay, ep, pki)
    refresh = login(rq, ep)
    r = rq.run("relayq", "test", "b@example.org")
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0, out
    assert f"XOAUTH2 as {USER}, token ******: accepted" in out
    assert len(relay.transactions) == 1
    assert_no_secret(out, secrets_seen(ep, relay, refresh))


def test_relayq_test_with_the_endpoint_down_is_an_auth_problem(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    rq = relayq_for(tmp_path, relay, token_endpoint, pki)
    login(rq, token_endpoint)
    token_endpoint.down = True
    r = rq.run("relayq", "test")
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 77, out  # AUTH problem, not the configuration's (78)
    assert "OAuth2 token endpoint unusable" in out and "connection refused" in out


def test_an_account_never_logged_in_is_critical_while_its_mail_waits(
        tmp_path: Path, relay: Smarthost, token_endpoint: FakeTokenEndpoint,
        pki: TestPKI) -> None:
    """Mail held for a login that never happened must alert as a revoked grant does;
    a client_credentials account needs no login and is not listed."""
    rq = relayq_for(tmp_path, relay, token_endpoint, pki)
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    assert rq.sendmail("-q").returncode == 75
    plugin = rq.run("relayq", "status", "-w", "100", "-c", "200")
    assert plugin.returncode == 2, plugin.stdout
    assert b"account default needs relayq oauth2 login" in plugin.stdout
    login(rq, token_endpoint)
    assert rq.sendmail("-q").returncode == 0
    assert rq.run("relayq", "status", "-w", "100", "-c", "200").returncode == 0
