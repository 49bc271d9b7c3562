"""relayq on Debian 12's own Python and packages, as the .deb runs it.

The .deb Depends on python3-aiosmtpd (1.4.3-1.1+deb12u1) and python3-dnspython
(2.3.0) and only Recommends python3-uvloop; its launchers start /usr/bin/python3
-I -S with relayq's folder ahead of the standard library and
/usr/lib/python3/dist-packages after it (as `relayq install` writes them).
Here a daemon started that way takes a real SMTP session on loopback,
`sendmail -bs` another, both are queued and `relayq flush` delivers them
through an MX lookup (dnspython) to a smarthost; the SMTP smuggling probes get
exactly the replies the venv's newer aiosmtpd gives, with uvloop and without
it; and Debian's pytest (python3-pytest) runs the aiosmtpd contract tests on
Debian's aiosmtpd.

Without uvloop: it cannot leave sys.path (it lives in dist-packages with the rest),
so the launcher puts a folder first whose `uvloop.py` raises ImportError, as a
missing package does, and leaves a mark that relayq tried it. Whether uvloop's
loop really ran is read from the daemon's /proc/PID/maps (its extension module
mapped or not).
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_daemon import DaemonProcess, free_port, wait_for
from tests.integration.test_listener import Raw, session

from relayq.core.errors import EX_OK
from relayq.server.aio import RUNAWAY_LINE
from relayq.testing.dns import DnsResponder

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.testing.smarthost import SmarthostFactory

DEBIAN_PYTHON = "/usr/bin/python3"
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
SRC = str(Path(__file__).resolve().parents[2] / "src")
# Debian 12's versions (checked on Debian 12 only)
WANT = {"aiosmtpd": "1.4.3", "dns": "2.3.0", "uvloop": "0.17.0"}
UVLOOP_SO = "uvloop/loop.cpython-"


def _debian_versions() -> dict[str, str]:
    code = (f"import sys; sys.path[:0] = [{DIST_PACKAGES!r}]\n"
            "for name, attr in (('aiosmtpd', '__version__'), ('dns.version', 'version'),"
            " ('uvloop', '__version__')):\n"
            "    try:\n"
            "        mod = __import__(name, fromlist=['_'])\n"
            "        print(name.split('.')[0], getattr(mod, attr))\n"
            "    except ImportError:\n"
            "        pass\n")
    try:
        r = subprocess.run([DEBIAN_PYTHON, "-I", "-S", "-c", code], capture_output=True,
                           text=True, timeout=60, check=False)
    except OSError:
        return {}
    return dict(line.split(" ", 1) for line in r.stdout.splitlines())  # type: ignore[misc]


@pytest.fixture(scope="module")
def debian() -> dict[str, str]:
    """Debian's module versions; skips when python3-aiosmtpd (or dnspython) is missing."""
    got = _debian_versions()
    missing = [pkg for mod, pkg in (("aiosmtpd", "python3-aiosmtpd"),
                                    ("dns", "python3-dnspython")) if mod not in got]
    if missing:
        pytest.skip(f"{DEBIAN_PYTHON} lacks {', '.join(missing)} (make test-deps installs it)")
    return got


def launcher(where: Path, *, hide_uvloop: bool, command: str = "relayq",
             module: str = "relayq.cli.main") -> Path:
    """`relayq` (or `module`'s command) the way the .deb starts it: -I -S, relayq's src
    ahead of the standard library, dist-packages after it (relayq.cli.install.launcher's
    text)."""
    paths = [SRC]
    if hide_uvloop:
        hidden = where / "no-uvloop"
        hidden.mkdir(exist_ok=True)
        (hidden / "uvloop.py").write_text(
            "import os\n"
            f"open({str(where / 'uvloop-tried')!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
            "raise ImportError('No module named uvloop (hidden by the test)')\n")
        paths.insert(0, str(hidden))
    path = where / command
    path.write_text(f"#!{DEBIAN_PYTHON} -IS\n"
                    "import sys\n"
                    f"sys.path[:0] = {paths!r}\n"
                    f"sys.path += [{DIST_PACKAGES!r}]\n"
                    "from relayq.cli._exit import leave\n"
                    f"from {module} import main\n"
                    "leave(main())\n")
    path.chmod(0o755)
    return path


def new_relayq(root: Path, **settings: object) -> Relayq:
    root.mkdir(parents=True, exist_ok=True)
    return Relayq(root, pid_file=str(root / "relayq.pid"), queue_interval="1h",
                  listen=[f"127.0.0.1:{free_port()}"], delivery_mode="deferred", **settings)


def port_of(rq: Relayq) -> int:
    return int(str(rq.settings["listen"][0]).rsplit(":", 1)[1])  # type: ignore[index]


def uses_uvloop(pid: int, *, debian: bool = True) -> bool:
    """uvloop's extension is mapped in the process (and, on Debian's Python, no file
    of the venv's)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    if debian:
        assert sys.prefix not in maps and sys.base_prefix not in maps, maps
    return UVLOOP_SO in maps


# the smuggling probes (tests/integration/test_listener.py, tests/security D7) and more
TRICKS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n", b"\r", b"\r\r\n",
          b"\r\n.\r\r\n", b"\r\n.\x00\r\n.\n"]
INNER = (b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
         b"From: admin@example.org\r\n\r\nsmuggled\r\n.\r\n")


def transcript(port: int) -> list[str]:
    """Every reply to a fixed series of sessions: one good message, each smuggling
    trick, a runaway line; queue ids and the host name masked."""
    out: list[str] = []
    c = Raw(port)
    out += [c.reply(), c.cmd("EHLO client.example.org")]
    for line in ("MAIL FROM:<alice@example.org> BODY=8BITMIME", "RCPT TO:<bob@example.org>",
                 "DATA"):
        out.append(c.cmd(line))
    c.send(b"Subject: good\r\n\r\n..leading dot\r\nend\r\n.\r\n")
    out += [c.reply(), c.cmd("QUIT")]
    c.close()
    for trick in TRICKS:
        c = session(port)
        out += [c.cmd("MAIL FROM:<alice@example.org>"), c.cmd("RCPT TO:<bob@example.org>"),
                c.cmd("DATA")]
        c.send(b"Subject: trick\r\n\r\nhello" + trick + INNER)
        out += [c.reply(), c.cmd("NOOP"), c.cmd("RCPT TO:<v@example.org>"), c.cmd("QUIT")]
        c.close()
    c = session(port)
    out += [c.cmd("MAIL FROM:<alice@example.org>"), c.cmd("RCPT TO:<bob@example.org>"),
            c.cmd("DATA")]
    c.send(b"Subject: long\r\n\r\n" + b"x" * (4 * RUNAWAY_LINE) + b"\r\n.\r\n")
    out += [c.reply(), c.cmd("NOOP"), c.cmd("QUIT")]
    c.close()
    text = "\n".join(out)  # the host name is this machine's for every daemon
    return re.sub(r"250 2\.0\.0 \S+ Message", "250 2.0.0 QID Message", text).split("\n")


def check_transcript(got: list[str]) -> None:
    """What the listener must answer whichever aiosmtpd it runs on."""
    text = "\n".join(got)
    assert text.count("250 2.0.0 QID Message accepted") == 1, text
    assert text.count("550 5.6.0 Bare LF") + text.count("550 5.6.0 Bare CR") == len(TRICKS)
    assert text.count("503 5.5.1 Error: need MAIL command") == len(TRICKS), text
    assert "500 5.5.2 Line too long" in text, text


def run_listener(rq: Relayq, cmd: list[str] | None) -> tuple[list[str], int, bool]:
    """(transcript, daemon exit code, uvloop mapped) of one daemon's session series."""
    d = DaemonProcess(rq, "--listen", cmd=cmd and [*cmd, "daemon", "--foreground", "--listen"])
    try:
        d.wait_ready()
        mapped = uses_uvloop(d.proc.pid, debian=cmd is not None)
        got = transcript(port_of(rq))
    finally:
        code = d.stop()
    assert "Traceback" not in d.stderr_path.read_text(), d.stderr_path.read_text()
    return got, code, mapped


@pytest.fixture(scope="module")
def venv_transcript(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The replies relayq gives on the venv's aiosmtpd (the newest in range)."""
    rq = new_relayq(tmp_path_factory.mktemp("venv"))
    got, code, _ = run_listener(rq, None)
    assert code == EX_OK
    check_transcript(got)
    return got


def test_debian_python_runs_on_debian_packages_only(debian: dict[str, str]) -> None:
    """The launcher's sys.path sees Debian's modules and this relayq, nothing of the venv."""
    release = Path("/etc/debian_version")
    if release.exists() and release.read_text().startswith("12."):
        assert {k: debian.get(k, "missing") for k in WANT} == WANT | (
            {} if "uvloop" in debian else {"uvloop": "missing"})  # only Recommended
    code = (f"import sys; sys.path[:0] = [{SRC!r}]; sys.path += [{DIST_PACKAGES!r}]\n"
            "import aiosmtpd, dns.resolver, relayq.server.listener, relayq.delivery.smtp_connect\n"
            "print(relayq.__file__, aiosmtpd.__file__, dns.resolver.__file__, sep='\\n')\n")
    r = subprocess.run([DEBIAN_PYTHON, "-I", "-S", "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    ours, aio, dns = r.stdout.split()
    assert ours.startswith(SRC) and aio.startswith(DIST_PACKAGES) and dns.startswith(DIST_PACKAGES)
    assert sys.prefix not in r.stdout


@pytest.mark.parametrize("hide_uvloop", [False, True], ids=["uvloop", "no-uvloop"])
def test_smuggling_is_refused_as_on_the_venv(
    debian: dict[str, str], venv_transcript: list[str], tmp_path: Path, hide_uvloop: bool
) -> None:
    """Debian's aiosmtpd 1.4.3+deb12u1 reads DATA by CRLF as 1.4.6 does (its CVE-2024-
    27305 backport); every probe gets the venv's replies, reply for reply."""
    if not hide_uvloop and "uvloop" not in debian:
        pytest.skip(f"{DEBIAN_PYTHON} lacks python3-uvloop")
    rq = new_relayq(tmp_path / "q")
    got, code, mapped = run_listener(rq, [str(launcher(tmp_path, hide_uvloop=hide_uvloop))])
    assert code == EX_OK
    assert mapped is not hide_uvloop
    assert (tmp_path / "uvloop-tried").exists() is hide_uvloop
    check_transcript(got)
    assert got == venv_transcript
    [(env, _)] = rq.queued()
    assert env.sender == "alice@example.org"
    assert "admin@example.org" not in rq.log() and "victim" not in rq.log()


@pytest.fixture
def dns_server() -> Iterator[DnsResponder]:
    records = {"example.org": {"MX": ["10 mx1.example.org."]},
               "mx1.example.org": {"A": ["127.0.0.1"]}}
    with DnsResponder(records) as dns:
        yield dns


@pytest.mark.parametrize("hide_uvloop", [False, True], ids=["uvloop", "no-uvloop"])
def test_a_session_is_queued_then_delivered_through_an_mx_lookup(
    debian: dict[str, str], tmp_path: Path, smarthost_factory: SmarthostFactory,
    dns_server: DnsResponder, hide_uvloop: bool
) -> None:
    """smtplib submits to the Debian-run daemon, a PHP-style program to `sendmail -bs`
    (aiosmtpd over stdin, Unix line ends); the messages wait in the queue with their
    envelopes, and `relayq flush` (Debian's Python too) finds the relay by MX
    (dnspython 2.3) and delivers them."""
    if not hide_uvloop and "uvloop" not in debian:
        pytest.skip(f"{DEBIAN_PYTHON} lacks python3-uvloop")
    sh = smarthost_factory()
    relayq = launcher(tmp_path, hide_uvloop=hide_uvloop)
    rq = new_relayq(tmp_path / "q", smarthost=f"example.org:{sh.port}",
                    dns_servers=[dns_server.server])
    d = DaemonProcess(rq, cmd=[str(relayq), "daemon", "--foreground", "--listen"])
    try:
        d.wait_ready()
        assert uses_uvloop(d.proc.pid) is not hide_uvloop
        with smtplib.SMTP("127.0.0.1", port_of(rq), timeout=30) as s:
            s.ehlo("client.example.org")
            assert s.has_extn("dsn") and s.has_extn("smtputf8")
            refused = s.sendmail("alice@example.org", ["bob@example.org"],
                                 b"Subject: from debian\r\n\r\n.dot\r\nend\r\n",  # sent ..dot
                                 rcpt_options=["NOTIFY=FAILURE"])
            assert refused == {}
        [(env, data)] = rq.queued()
        assert env.sender == "alice@example.org"
        assert [r.address for r in env.recipients] == ["bob@example.org"]
        assert b"\n.dot\n" in data and b"Subject: from debian" in data
    finally:
        assert d.stop() == EX_OK
    assert "Traceback" not in d.stderr_path.read_text(), d.stderr_path.read_text()
    sendmail = launcher(tmp_path, hide_uvloop=hide_uvloop, command="sendmail",
                        module="relayq.cli.sendmail")
    bs = subprocess.run([str(sendmail), "-bs"], env=rq.env, capture_output=True, timeout=120,
                        check=False, input=b"EHLO php.example.org\nMAIL FROM:<carol@example.org>\n"
                        b"RCPT TO:<dave@example.org>\nDATA\nSubject: bs\n\n..x\n.\nQUIT\n")
    assert bs.returncode == EX_OK and b"Traceback" not in bs.stderr, bs.stderr
    assert b"\r\n250 2.0.0 " in bs.stdout and bs.stdout.endswith(b"221 2.0.0 Bye\r\n"), bs.stdout
    assert len(rq.queued()) == 2
    r = subprocess.run([str(relayq), "flush"], env=rq.env, capture_output=True, timeout=120,
                       check=False)
    assert r.returncode == EX_OK, r.stderr.decode() + rq.log()[-2000:]
    wait_for(lambda: len(sh.transactions) == 2, what="the deliveries")
    got = {t.mail_from: t for t in sh.transactions}
    assert got["alice@example.org"].rcpt_tos == ["bob@example.org"]
    assert b"\r\n.dot\r\n" in got["alice@example.org"].content
    assert got["carol@example.org"].rcpt_tos == ["dave@example.org"]
    assert got["carol@example.org"].content.endswith(b"Subject: bs\r\n\r\n.x\r\n")
    assert ("example.org", "MX") in dns_server.queries
    assert rq.queued() == []
    assert "mx1.example.org [127.0.0.1]" in rq.log()


def test_the_aiosmtpd_contract_holds_on_debians_aiosmtpd(
    debian: dict[str, str], tmp_path: Path
) -> None:
    """tests/unit/test_aiosmtpd_contract.py and the clone test, run by Debian's pytest
    (python3-pytest) on Debian's aiosmtpd: each member relayq relies on is there."""
    try:
        import_pytest = subprocess.run([DEBIAN_PYTHON, "-I", "-c", "import pytest"],
                                       capture_output=True, timeout=60, check=False)
    except OSError:
        pytest.skip(f"{DEBIAN_PYTHON} cannot be run")
    if import_pytest.returncode != 0:
        pytest.skip(f"{DEBIAN_PYTHON} lacks python3-pytest (make test-deps installs it)")
    repo = str(Path(SRC).parent)
    # the project's ini names plugins Debian's pytest may lack (timeout, xdist): a plain one
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\nfilterwarnings =\n    error\n"
                   "    ignore::DeprecationWarning:aiosmtpd.*\n")
    args = ["-c", str(ini), "--rootdir", repo, "--noconftest", "-p", "no:cacheprovider", "-q",
            "tests/unit/test_aiosmtpd_contract.py",
            "tests/integration/test_processes.py::test_a_cloned_server_matches_a_constructed_one"]
    code = (f"import sys; sys.path[:0] = [{SRC!r}, {repo!r}]\n"
            f"import aiosmtpd, pytest; assert aiosmtpd.__file__.startswith({DIST_PACKAGES!r})\n"
            f"sys.exit(pytest.main({args!r}))\n")
    r = subprocess.run([DEBIAN_PYTHON, "-I", "-B", "-c", code], cwd=repo, capture_output=True,
                       text=True, timeout=100, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
