"""The admin side: relayq check-config, sendmail -bp, per-user queues, big messages."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error

from relayq.core.errors import EX_CONFIG, EX_OK

if TYPE_CHECKING:
    from relayq.testing.smarthost import SmarthostFactory


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path)


def test_check_config_masks_secrets(rq: Relayq) -> None:
    rq.configure(user="alerts", password="hunter2-secret", smarthost="[mail.example.org]:587",
                 tls="required")
    r = rq.run("relayq", "check-config")
    assert r.returncode == EX_OK
    out = r.stdout.decode()
    assert "hunter2" not in out and 'password = "********"' in out
    assert 'smarthost = ["[mail.example.org]:587"]' in out
    assert 'delivery_mode = "queue"' in out


def test_check_config_names_a_wrong_key(rq: Relayq) -> None:
    rq.config.write_text('smarthost = "[mail.example.org]"\nretry_mni = "5m"\n')
    r = rq.run("relayq", "check-config")
    assert r.returncode == EX_CONFIG
    assert "retry_mni" in assert_one_line_error(r)


def test_missing_explicit_config_is_an_error(rq: Relayq, tmp_path: Path) -> None:
    r = rq.sendmail("-C", str(tmp_path / "nope.toml"), "a@example.org", input=b"\nx\n")
    assert r.returncode == EX_CONFIG
    assert "nope.toml" in assert_one_line_error(r)


def test_minus_C_selects_the_config(rq: Relayq, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(f'queue_dir = "{tmp_path}/other-queue"\ndelivery_mode = "queue"\n'
                     'syslog = false\n')
    assert rq.sendmail("-C", str(other), "a@example.org", input=b"\nx\n").returncode == EX_OK
    assert rq.queued() == []
    assert len(os.listdir(tmp_path / "other-queue" / "queue")) == 2


def test_bp_is_mailq(rq: Relayq) -> None:
    rq.sendmail("a@example.org", input=b"Subject: x\n\nx\n")
    rq.sendmail("b@example.net", input=b"Subject: x\n\nx\n")
    listing = rq.sendmail("-bp").stdout
    assert listing == rq.run("mailq").stdout == rq.run("mailq", "-Ac").stdout
    assert b"Total requests: 2" in listing
    assert b"b@example.net" not in rq.sendmail("-bp", "-qR@example.org").stdout


def test_version(rq: Relayq) -> None:
    r = rq.run("relayq", "version")
    assert r.returncode == EX_OK and r.stdout.startswith(b"relayq ")


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_other_users_get_a_queue_in_their_xdg_state_dir() -> None:
    work = Path(tempfile.mkdtemp(prefix="relayq-home-", dir="/tmp"))  # pytest's is 0700
    try:
        _private_queue_of_nobody(work)
    finally:
        shutil.rmtree(work)


def _private_queue_of_nobody(work: Path) -> None:
    work.chmod(0o755)
    home = work / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
           str(BIN / "sendmail"), "-odq", "a@example.org"]
    r = subprocess.run(cmd, input=b"Subject: x\n\nx\n", env=env, capture_output=True,
                       timeout=30, check=False)
    if r.returncode != 0 and b"Permission denied" in r.stderr:
        pytest.skip("the venv is not readable by nobody here")
    assert r.returncode == EX_OK, r.stderr
    queue = home / ".local" / "state" / "relayq" / "queue"
    assert len(os.listdir(queue)) == 2
    assert os.stat(queue).st_uid == 65534
    assert (os.stat(queue.parent).st_mode & 0o777) == 0o700
    assert not (queue.parent / "maildrop").exists()  # a private queue takes no one's mail


def test_100mb_message_is_relayed_intact(
    rq: Relayq, smarthost_factory: SmarthostFactory, tmp_path: Path
) -> None:
    sh = smarthost_factory(size_limit=None)
    rq.configure(smarthost=sh.smarthost)
    src = tmp_path / "big"
    line = b"0123456789" * 7 + b"abcde\n"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        f.write(b"Subject: big\n\n")
        for _ in range((100 << 20) // len(line)):
            f.write(line)
            digest.update(line.replace(b"\n", b"\r\n"))
    with open(src, "rb") as f:
        r = subprocess.run([str(BIN / "sendmail"), "-i", "a@example.org"], stdin=f,
                           env=rq.env, capture_output=True, timeout=120, check=False)
    assert r.returncode == EX_OK, r.stderr
    assert rq.sendmail("-q", timeout=300).returncode == EX_OK
    [t] = sh.transactions
    body = t.content.split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(body).hexdigest() == digest.hexdigest()


def test_status_counts_without_reading_envelopes(rq: Relayq) -> None:
    import json
    import time

    before = time.time()
    for _ in range(3):
        rq.sendmail("a@example.org", input=b"\nx\n")
    damaged = sorted((rq.queue_dir / "queue").glob("*.e"))[-1]
    damaged.write_text("garbage")  # status must not parse it (and a run quarantines it)
    r = rq.run("relayq", "status")
    assert r.returncode == EX_OK, r.stderr
    assert "messages:     3, oldest " in r.stdout.decode()
    assert "daemon:       not running" in r.stdout.decode()
    rq.sendmail("-q")  # port 9: the two good ones stay, the damaged one is quarantined
    info = json.loads(rq.run("relayq", "status", "--json").stdout)
    assert (info["messages"], info["quarantined"], info["daemon_pid"]) == (2, 1, None)
    assert 0 <= info["oldest_age_seconds"] <= time.time() - before + 2


def test_qid_time_inverts_make_qid() -> None:
    from relayq.queue.names import SLOTS, make_qid, qid_time

    for t in (1_795_657_340.123456, 1_700_000_000.0, 1_800_000_000.999):
        assert 0 <= t - qid_time(make_qid(t, 4242), t + 10) < 1 / SLOTS + 1e-6
    assert qid_time("not-a-qid!", 0) == 0.0


def test_a_secret_readable_by_others_is_refused_naming_file_and_mode(tmp_path: Path) -> None:
    rq = Relayq(tmp_path, user="alerts", password="hunter2-secret")
    rq.config.chmod(0o644)
    r = rq.sendmail("-odq", "a@example.org", input=b"\nx\n")
    assert r.returncode == 78
    line = assert_one_line_error(r)
    assert str(rq.config) in line and "0644" in line and "hunter2" not in line
    rq.config.chmod(0o640)  # group root: the relayq group model allows it
    assert rq.sendmail("-odq", "a@example.org", input=b"\nx\n").returncode == 0
    secret = tmp_path / "pw"
    secret.write_text("hunter2-secret\n")
    secret.chmod(0o604)
    rq.settings.pop("password")
    rq.configure(password_file=str(secret))
    r = rq.sendmail("-odq", "a@example.org", input=b"\nx\n")
    assert r.returncode == 78 and "is a password file" in assert_one_line_error(r)
    secret.chmod(0o600)
    assert rq.sendmail("-odq", "a@example.org", input=b"\nx\n").returncode == 0


def test_tls_is_required_by_default_once_a_password_is_configured(tmp_path: Path) -> None:
    from relayq.core.config import parse

    assert parse("").tls == "opportunistic"
    assert parse("user = 'u'\npassword = 'p'\n").tls == "required"
    assert parse("user = 'u'\npassword_command = 'pass show x'\n").tls == "required"
    assert parse("user = 'u'\npassword = 'p'\ntls = 'opportunistic'\n").tls == "opportunistic"
