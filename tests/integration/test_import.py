"""relayq import: each peer's configuration, written from its documentation, becomes
the relayq.toml in tests/data/import/KIND/expected.toml (a golden file: review a
change to it as a change of behaviour); secrets never reach the terminal."""

from __future__ import annotations

import os
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from tests.helpers.relayq_env import BIN

from relayq.core.config import parse
from relayq.core.peers import masked

DATA = Path(__file__).resolve().parents[1] / "data" / "import"
KINDS = sorted(p.name for p in DATA.iterdir() if p.is_dir())
SECRETS = ("n-s3cret", "s-s3cret", "d-s3cret", "d-other", "m-s3cret", "p-s3cret", "a-s3cret",
           "e-s3cret")


def relayq_import(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "relayq"), "import", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "RELAYQ_CONFIG": "/dev/null"})


def inputs(kind: str) -> list[str]:
    return sorted(p.name for p in (DATA / kind).iterdir() if p.name != "expected.toml")


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_becomes_its_golden_relayq_toml(kind: str) -> None:
    r = relayq_import(*inputs(kind), cwd=DATA / kind)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (DATA / kind / "expected.toml").read_text()
    if "# Not carried over:" in r.stdout:  # said on the terminal too, not only in the file
        assert "not carried over" in r.stderr
    parse(r.stdout)  # a configuration relayq takes as it is
    for secret in SECRETS:
        assert secret not in r.stdout + r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_the_format_is_found_or_forced(kind: str, tmp_path: Path) -> None:
    """Found from the names; with other names, from the content (or --from)."""
    main = {"nullmailer": "remotes", "ssmtp": "ssmtp.conf", "dma": "dma.conf",
            "msmtp": "msmtprc", "postfix": "main.cf", "sendmail": "submit.mc",
            "sendmail-seed": "submit.mc", "exim4": "update-exim4.conf.conf"}[kind]
    renamed = tmp_path / "some-file"
    renamed.write_bytes((DATA / kind / main).read_bytes())
    found = relayq_import(str(renamed), cwd=tmp_path)
    kind = kind.split("-")[0]  # sendmail-seed: the seed's snippets, a sendmail case
    forced = relayq_import("--from", kind, str(renamed), cwd=tmp_path)
    assert found.returncode == forced.returncode == 0, found.stderr + forced.stderr
    assert f"from {kind}" in found.stdout and found.stdout == forced.stdout


def test_write_makes_a_private_file_with_the_password_and_never_replaces_one(
        tmp_path: Path) -> None:
    target = tmp_path / "relayq.toml"
    env = {**os.environ, "RELAYQ_CONFIG": str(target)}
    args = [str(BIN / "relayq"), "import", "--write", *inputs("ssmtp")]
    r = subprocess.run(args, cwd=DATA / "ssmtp", capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "s-s3cret" not in r.stdout + r.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    values = tomllib.loads(target.read_text())
    assert values["password"] == "s-s3cret" and values["smarthost"] == "smtp.example.org:587"
    # revaliases became a generics file next to it, named by generics_file
    generics = tmp_path / "generics"
    assert values["generics_file"] == str(generics)
    assert [ln for ln in generics.read_text().splitlines() if not ln.startswith("#")] == [
        "root alerts@example.org", "alice alice@example.org"]
    assert stat.S_IMODE(generics.stat().st_mode) == 0o644
    before = target.read_bytes()
    again = subprocess.run(args, cwd=DATA / "ssmtp", capture_output=True, text=True, env=env,
                           timeout=60)
    assert again.returncode == 73 and "never replaces" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generics", "relayq.toml"]  # no temp



def test_write_leaves_no_generics_file_when_the_relayq_toml_exists(tmp_path: Path) -> None:
    """Both files or neither: revaliases' generics file is not left behind."""
    target = tmp_path / "relayq.toml"
    target.write_text("# the administrator's\n")
    r = subprocess.run([str(BIN / "relayq"), "import", "--write", *inputs("ssmtp")],
                       cwd=DATA / "ssmtp", capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RELAYQ_CONFIG": str(target)})
    assert r.returncode == 73 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relayq.toml"]
    assert target.read_text() == "# the administrator's\n"


def test_bad_input_is_one_line_and_a_sysexits_code(tmp_path: Path) -> None:
    (tmp_path / "random.txt").write_text("hello world\n")
    unknown = relayq_import("random.txt", cwd=tmp_path)
    assert unknown.returncode == 65 and "give --from" in unknown.stderr
    missing = relayq_import("absent.conf", cwd=tmp_path)
    assert missing.returncode == 66 and "absent.conf" in missing.stderr
    for r in (unknown, missing):
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    usage = relayq_import("--from", "sendmail-xyz", "x", cwd=tmp_path)
    assert usage.returncode != 0 and "Traceback" not in usage.stderr


@pytest.mark.parametrize("line", [
    "smtp.example.org smtp --pass=abc", "AuthPass=abc", "password abc", "passwd: abc",
    "auth_pass = abc"])
def test_a_shown_line_never_holds_its_secret(line: str) -> None:
    assert "abc" not in masked(line)


@pytest.mark.parametrize(("auth", "want"), [("oauthbearer", "OAUTHBEARER"),
                                            ("xoauth2", "XOAUTH2"), ("plain", "PLAIN")])
def test_msmtp_oauth_mechanisms_carry_over(auth: str, want: str) -> None:
    """relayq offers OAUTHBEARER now: msmtp's `auth oauthbearer` is kept, not a note."""
    from relayq.core import peer_msmtp

    text = ("account default\nhost smtp.example.org\nport 587\ntls on\nuser u@example.org\n"
            f"auth {auth}\npasswordeval cat /etc/token\n")
    got = peer_msmtp.convert([("/etc/msmtprc", text)])
    assert {s.key: s.value for s in got.settings}["auth_mechanism"] == want
    assert not [n for n in got.notes if "AUTH" in str(n)]
