"""relayq check-config: the effective configuration as valid TOML that round-trips, and
each failure (exit 78) and warning (exit 0) it reports, on real files and commands."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.debroot import DebRoot, skip_unless_possible
from tests.helpers.relayq_env import Relayq
from tests.helpers.users import ensure_users
from tests.security.test_service_queue import ROOT_MADE, TMPFILES, Host

from relayq.core.config import SCHEMA
from relayq.core.errors import EX_CONFIG, EX_OK

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterator

    from relayq.testing.tls import TestPKI


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path)


def check(rq: Relayq) -> tuple[int, dict[str, object], list[str]]:
    """(exit code, the printout parsed as TOML, stderr's lines); never a traceback."""
    r: subprocess.CompletedProcess[bytes] = rq.run("relayq", "check-config")
    err = r.stderr.decode()
    assert "Traceback" not in err, err
    return r.returncode, tomllib.loads(r.stdout.decode()), err.splitlines()


def only(lines: list[str], key: str, warning: bool) -> str:
    """The one stderr line about `key`, a warning or a failure as asked."""
    mine = [line for line in lines if f": {key}: " in line]
    assert len(mine) == 1, lines
    assert (": warning: " in mine[0]) == warning, mine
    return mine[0]


def test_the_printout_is_toml_with_every_key_and_round_trips(rq: Relayq) -> None:
    rq.configure(smarthost=["mail.example.org", "[192.0.2.1]:2525"], user="alerts",
                 password="hunter2", delivery_mode="background", max_queue_age="3d",
                 trusted_users=["root", "web"], tls="required")
    code, shown, _ = check(rq)
    assert code == EX_OK
    assert set(shown) == set(SCHEMA)  # every key, each once (tomllib refuses a repeat)
    assert shown["password"] == "********" and shown["user"] == "alerts"
    assert shown["smarthost"] == ["mail.example.org:25", "[192.0.2.1]:2525"]
    assert shown["port"] == 25 and shown["max_queue_age"] == 3 * 86400
    assert shown["queue_dir"] == str(rq.queue_dir) and shown["delivery_mode"] == "background"
    rq.write_config(rq.run("relayq", "check-config").stdout.decode())  # fed back
    code, again, _ = check(rq)
    assert code == EX_OK and again == shown


def test_strings_that_need_escapes_round_trip(rq: Relayq) -> None:
    rq.write_config(rq.config.read_text() + 'admin_group = "a\\"b\\\\c\\té"\n')
    code, shown, _ = check(rq)
    assert code == EX_OK and shown["admin_group"] == 'a"b\\c\té'
    rq.write_config(rq.run("relayq", "check-config").stdout.decode())
    assert check(rq)[1] == shown


def test_derived_values_are_printed_with_where_they_came_from(rq: Relayq) -> None:
    rq.configure(smarthost="relay.example.org", password_file=str(rq.root / "pw"),
                 user="u", tls="implicit")
    (rq.root / "pw").write_text("pw-Zq81x\n")
    (rq.root / "pw").chmod(0o600)
    del rq.settings["tls"]
    rq.configure(port=0)
    out = rq.run("relayq", "check-config").stdout.decode()
    assert 'tls = "required"  # a password is set' in out
    assert "port = 25  # the default (port = 0)" in out
    processes = max(1, min(os.cpu_count() or 1, 4))
    assert f"smtp_processes = {processes}  # one per CPU" in out
    assert ('smarthost = ["relay.example.org:25"]  # relay.example.org: MX lookup; ports '
            "made explicit") in out
    rq.configure(tls="implicit")
    out = rq.run("relayq", "check-config").stdout.decode()
    assert 'port = 465  # tls = "implicit" (port = 0)' in out
    assert "pw-Zq81x" not in out


def test_the_default_queue_is_printed_resolved(rq: Relayq, tmp_path: Path) -> None:
    del rq.settings["queue_dir"]
    rq.configure()
    env = {**rq.env, "XDG_STATE_HOME": str(tmp_path / "state")}
    import subprocess

    r = subprocess.run([str(Path(sys.executable).parent / "relayq"), "check-config"], env=env,
                       capture_output=True, check=False)
    if os.getuid() == 0:
        expect = "/var/spool/relayq"
    else:
        expect = str(tmp_path / "state" / "relayq")
    assert f'queue_dir = "{expect}"  # the default for uid {os.getuid()}' in r.stdout.decode()


def test_an_unknown_key_names_the_nearest_known_one(rq: Relayq) -> None:
    rq.write_config('smarthots = "[mail.example.org]"\n')
    for argv in (("relayq", "check-config"), ("relayq", "status"), ("mailq",),
                 ("sendmail", "-bv", "a@example.org")):
        r = rq.run(*argv)
        assert r.returncode == EX_CONFIG
        assert r.stderr.decode().endswith(f"{rq.config}: unknown key 'smarthots' (did you "
                                          "mean 'smarthost'?)\n"), (argv, r.stderr)
    rq.write_config('frobnicate = 1\n')
    r = rq.run("relayq", "check-config")
    assert r.stderr.decode().endswith("unknown key 'frobnicate'\n")


def test_a_relative_queue_dir_fails(rq: Relayq) -> None:
    rq.configure(queue_dir="spool/relayq")
    code, shown, err = check(rq)
    assert code == EX_CONFIG and shown["queue_dir"] == "spool/relayq"
    assert "is relative" in only(err, "queue_dir", warning=False)


def test_a_missing_password_file_fails(rq: Relayq) -> None:
    rq.configure(user="u", password_file=str(rq.root / "nope"))
    code, _, err = check(rq)
    assert code == EX_CONFIG
    line = only(err, "password_file", warning=False)
    assert f"cannot read password_file {rq.root / 'nope'}: No such file" in line


def test_an_empty_password_file_fails(rq: Relayq) -> None:
    (rq.root / "pw").write_text("")
    (rq.root / "pw").chmod(0o600)
    rq.configure(user="u", password_file=str(rq.root / "pw"), tls="required")
    code, _, err = check(rq)
    assert code == EX_CONFIG and "empty password" in only(err, "password_file", warning=False)


def test_a_password_command_that_fails_is_run_and_fails(rq: Relayq) -> None:
    script = rq.root / "pw.py"
    script.write_text("import sys\nsys.stderr.write('vault is locked\\n')\nsys.exit(3)\n")
    rq.configure(user="u", password_command=f"{sys.executable} {script}", tls="required")
    code, _, err = check(rq)
    assert code == EX_CONFIG
    line = only(err, "password_command", warning=False)
    assert "exited with status 3: vault is locked" in line


def test_a_working_password_command_passes_and_its_output_is_not_shown(rq: Relayq) -> None:
    script = rq.root / "pw.py"
    marker = rq.root / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').close()\nprint('t0ps3cret')\n")
    rq.configure(user="u", password_command=f"{sys.executable} {script}", tls="required")
    r = rq.run("relayq", "check-config")
    assert r.returncode == EX_OK, r.stderr
    assert marker.exists() and b"t0ps3cret" not in r.stdout + r.stderr


def test_a_user_without_a_password_fails_and_a_password_without_user_warns(rq: Relayq) -> None:
    rq.configure(user="u", tls="required")
    code, _, err = check(rq)
    assert code == EX_CONFIG and "no password" in only(err, "user", warning=False)
    (rq.root / "pw").write_text("x\n")
    (rq.root / "pw").chmod(0o600)
    rq.configure(user="", password_file=str(rq.root / "pw"))
    code, _, err = check(rq)
    assert code == EX_OK
    assert "user is not" in only(err, "password_file", warning=True)


def test_auth_in_clear_text_to_a_remote_relay_fails(rq: Relayq) -> None:
    rq.configure(user="u", password="p", tls="none", smarthost="[192.0.2.7]:25")
    code, _, err = check(rq)
    assert code == EX_CONFIG and "in clear text" in only(err, "tls", warning=False)
    rq.configure(smarthost="[127.0.0.1]:2525")  # allowed to loopback
    assert check(rq)[0] == EX_OK


def test_a_missing_ca_file_fails_and_is_only_a_warning_without_tls(rq: Relayq) -> None:
    rq.configure(tls="required", ca_file=str(rq.root / "ca.pem"))
    code, _, err = check(rq)
    assert code == EX_CONFIG
    assert f"cannot load ca_file {rq.root / 'ca.pem'}" in only(err, "ca_file", warning=False)
    rq.configure(tls="none")
    code, _, err = check(rq)
    assert code == EX_OK and "not used" in only(err, "ca_file", warning=True)


def test_a_client_cert_without_its_key_fails(rq: Relayq, pki: TestPKI) -> None:
    cert, key = pki.write_client_cert(str(rq.root))
    rq.configure(tls="required", client_cert=cert, ca_file=pki.write_ca(str(rq.root)))
    code, _, err = check(rq)
    assert code == EX_CONFIG and "cannot load client_cert" in only(err, "client_cert", False)
    rq.configure(client_key=key)
    assert check(rq)[0] == EX_OK
    rq.configure(client_cert="")
    code, _, err = check(rq)
    assert code == EX_OK and "without client_cert" in only(err, "client_key", warning=True)


def test_a_daemon_user_that_does_not_exist_fails(rq: Relayq) -> None:
    rq.configure(daemon_user="rqtest-nobody-here")
    code, _, err = check(rq)
    assert code == EX_CONFIG and "no such user" in only(err, "daemon_user", warning=False)


def test_a_non_loopback_listener_fails(rq: Relayq) -> None:
    rq.configure(listen=["192.0.2.1:25"])
    code, _, err = check(rq)
    assert code == EX_CONFIG and "not a loopback address" in only(err, "listen", False)


def test_no_smarthost_set_warns(rq: Relayq) -> None:
    del rq.settings["smarthost"]
    rq.configure(listen=[])
    code, _, err = check(rq)
    assert code == EX_OK
    assert "not set: mail goes to [127.0.0.1] port 25" in only(err, "smarthost", True)


def test_a_delay_warning_after_the_bounce_warns(rq: Relayq) -> None:
    rq.configure(delay_warning="5d", max_queue_age="4d")
    code, _, err = check(rq)
    assert code == EX_OK and "bounced before" in only(err, "delay_warning", warning=True)


def test_a_log_file_that_cannot_be_written_warns(rq: Relayq) -> None:
    rq.configure(log_file=str(rq.root / "no-such-dir" / "maillog"))
    code, _, err = check(rq)
    assert code == EX_OK and "cannot be created in" in only(err, "log_file", warning=True)
    (rq.root / "fifo").mkdir()
    rq.configure(log_file=str(rq.root / "fifo"))
    code, _, err = check(rq)
    assert code == EX_OK and "not a regular file" in only(err, "log_file", warning=True)
    rq.configure(log_file=str(rq.log_file))
    assert check(rq)[2] == []


def test_an_unqualified_masquerade_warns(rq: Relayq) -> None:
    rq.configure(masquerade_as="example")
    code, _, err = check(rq)
    assert code == EX_OK and "fully qualified" in only(err, "masquerade_as", warning=True)


# --- the host's names and the delivering user: in a throwaway root (tests.helpers.debroot),
# the host name in a UTS namespace of its own: nothing on the machine changes

CONF = "/etc/relayq/relayq.toml"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    skip_unless_possible()
    ensure_users()
    with DebRoot(tmp_path / "root") as root:
        yield Host(root)


def named(host: Host, nodename: str, config: str, mailname: str = "",
          hosts: str = "127.0.0.1 localhost\n") -> tuple[int, str, str]:
    """check-config as root on a host called `nodename` with this /etc/mailname and
    /etc/hosts."""
    root = host.root
    root.ok("mkdir -p /etc/relayq && cat > /etc/relayq/relayq.toml", input=config)
    root.ok("cat > /etc/hosts", input=hosts)
    root.ok(f"printf '%s\\n' {mailname} > /etc/mailname" if mailname else "rm -f /etc/mailname")
    code = (f"import sys\n{host.path_line}\nfrom relayq.cli._exit import leave\n"
            "from relayq.cli.main import main\nleave(main(sys.argv[1:]))\n")
    res = root.run(["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', nodename,
                    "/usr/bin/python3", "-IS", "-c", code, "check-config"], timeout=120)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stdout, res.stderr


BASE = 'smarthost = "[192.0.2.1]:25"\nsyslog = false\n'


def test_an_unqualified_host_name_warns_and_is_printed_as_the_domain(host: Host) -> None:
    code, out, err = named(host, "vm", BASE)
    assert code == EX_OK, err
    assert 'domain = "vm"  # from the host name' in out, out
    lines = err.splitlines()
    assert "mail goes out from root@vm" in only(lines, "domain", warning=True)
    assert tomllib.loads(out)["queue_dir"] == "/var/spool/relayq"


def test_the_domain_from_mailname_and_the_ehlo_name_from_hosts(host: Host) -> None:
    code, out, err = named(host, "vm", BASE, mailname="mail.example.org",
                           hosts="127.0.1.1 vm.example.net vm\n")
    assert code == EX_OK, err
    assert 'domain = "mail.example.org"  # from /etc/mailname' in out, out
    assert 'ehlo_name = "vm.example.net"  # from /etc/hosts' in out, out
    assert "warning" not in err, err
    code, out, err = named(host, "vm", BASE + 'domain = "example.com"\n')
    assert 'domain = "example.com"\n' in out and ": domain: " not in err, (out, err)


def test_a_password_file_the_delivering_user_cannot_read_fails(host: Host) -> None:
    """Root reads anything; delivery runs as the queue's owner (the relayq user of the
    package's queue), so check-config reads the file as that user."""
    host.root.ok(f"{ROOT_MADE} && {TMPFILES}")
    host.root.ok("mkdir -p /etc/relayq && umask 077 && echo s3cret > /etc/relayq/password")
    config = (BASE + 'domain = "example.org"\nuser = "u"\ntls = "required"\n'
              'password_file = "/etc/relayq/password"\n')
    code, _, err = named(host, "vm.example.org", config)
    assert code == EX_CONFIG, err
    assert ("cannot read password_file /etc/relayq/password: Permission denied"
            in only(err.splitlines(), "password_file", warning=False))
    host.root.ok("chgrp relayq /etc/relayq/password && chmod 640 /etc/relayq/password")
    code, _, err = named(host, "vm.example.org", config)
    assert code == EX_OK, err


def test_a_missing_or_malformed_generics_file_fails(rq: Relayq) -> None:
    rq.configure(generics_file=str(rq.root / "nope"))
    code, _, err = check(rq)
    assert code == EX_CONFIG and "cannot read" in only(err, "generics_file", warning=False)
    (rq.root / "generics").write_text("root admin@example.org extra\n")
    rq.configure(generics_file=str(rq.root / "generics"))
    code, _, err = check(rq)
    assert code == EX_CONFIG and f"{rq.root / 'generics'}:1" in only(
        err, "generics_file", warning=False)


def test_local_forward_with_local_delivery_warns(rq: Relayq) -> None:
    rq.configure(local_forward="admin@example.org", local_delivery=True)
    code, _, err = check(rq)
    assert code == EX_OK, err
    assert "local_delivery" in only(err, "local_forward", warning=True)


def test_password_command_arguments_are_masked(rq: Relayq) -> None:
    rq.configure(user="u", password_command="/bin/echo s3cr3t-token", tls="required")
    r = rq.run("relayq", "check-config")
    assert r.returncode == EX_OK, r.stderr
    assert b"s3cr3t-token" not in r.stdout + r.stderr
    assert tomllib.loads(r.stdout.decode())["password_command"] == "/bin/echo ********"


def test_an_ordinary_user_is_told_the_delivery_checks_are_not_run(tmp_path: Path) -> None:
    """Not root and not the delivering user: reading the root-only password file (or
    running the admin's password_command) as this caller says nothing true."""
    import subprocess
    import tempfile

    ensure_users()
    top = Path(tempfile.mkdtemp(prefix="relayq-nr-"))
    try:
        top.chmod(0o755)
        rq = Relayq(top, user="u", tls="required", password_file=str(top / "pw"),
                    log_file="")
        (top / "pw").write_text("s3cret\n")
        (top / "pw").chmod(0o600)
        (top / "queue").mkdir()
        rq.config.chmod(0o644)
        src = Path(__file__).resolve().parents[2] / "src"
        code = (f"import sys\nsys.path.insert(0, {str(src)!r})\nfrom relayq.cli._exit import "
                "leave\nfrom relayq.cli.main import main\nleave(main(['check-config']))\n")
        r = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", '/usr/bin/python3 -IS -c "$0"',
                            code], env=rq.env, capture_output=True, timeout=60, check=False)
        err = r.stderr.decode()
        assert r.returncode == EX_OK, err
        assert "Traceback" not in err and "Permission denied" not in err, err
        assert len([line for line in err.splitlines() if "not run" in line]) == 1, err
    finally:
        import shutil

        shutil.rmtree(top, ignore_errors=True)
