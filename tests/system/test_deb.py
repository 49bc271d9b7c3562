"""relayq's Debian package, installed, used, upgraded, removed and purged for real.

`make deb`'s package (tests.helpers.debbuild: one build per source state) goes into
throwaway Debian roots over this machine's `/` (tests.helpers.debroot), each
prepared the same way: no relayq, no /usr/sbin/sendmail, and none of relayq's
Python dependencies, so that `apt-get install ./relayq_*.deb` must resolve them
itself. debconf is preseeded (DEBIAN_FRONTEND=noninteractive), the smarthost is a
recording one on 127.0.0.1 in this process. Two roots:

- a fresh install without /etc/mailname: what the package puts where, mail from
  root and from an ordinary user, mailq, newaliases, man; then remove (config and
  queue stay), purge with an empty queue, and nothing of relayq left behind;
- /etc/mailname already there (kept as is), mail queued while the smarthost is
  down survives an upgrade to a newer build and is delivered once after; purge
  with mail still queued keeps the queue and says so.

Each scenario collects its mismatches (`Findings`) and fails with all of them at
the end, so that one run shows every way the package differs from the rules.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.debbuild import BuildFailed, newer_package, package
from tests.helpers.debroot import DebRoot, Entry, changed_since, skip_unless_possible
from tests.helpers.relayq_env import BIN, Relayq
from tests.integration.test_daemon import wait_for

from relayq.testing.smarthost import Smarthost

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.testing.smarthost import SmarthostFactory

pytestmark = pytest.mark.timeout(900)  # a build (first run), apt, dpkg, man-db: minutes

DEPENDENCIES = ("python3-aiosmtpd", "python3-dnspython", "python3-uvloop")
COMMANDS = ("/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases",
            "/usr/bin/relayq")
UNITS = ("relayq.service", "relayq-listener.service", "relayq-listener.socket")
HOOKS = ("/etc/NetworkManager/dispatcher.d/relayq", "/etc/networkd-dispatcher/routable.d/relayq",
         "/etc/network/if-up.d/relayq", "/etc/ppp/ip-up.d/relayq")
MAN = ("man8/sendmail.8", "man1/mailq.1", "man8/newaliases.8", "man8/relayq.8",
       "man5/relayq.toml.5")
IFUP_ENV = {"IFACE": "eth0", "LOGICAL": "eth0", "ADDRFAM": "inet", "METHOD": "dhcp",
            "MODE": "start", "PHASE": "post-up", "VERBOSITY": "0"}  # what ifupdown passes
USER = "rqdeb-user"  # an ordinary user made inside the root
MESSAGE = "To: {to}\nSubject: {subject}\n\nhi\n"

# what may stay in the upper directory after a purge: package-manager state, logs,
# caches, the mail name and the service user (Debian keeps both), the test's user
ALLOWED_AFTER_PURGE = [re.compile(p) for p in (
    r"/var/lib/dpkg/(?!info/relayq\.).*", r"/var/lib/apt/.*", r"/var/cache/apt/.*",
    r"/var/cache/debconf/.*", r"/var/log/(dpkg\.log|alternatives\.log|apt/.*)",
    r"/var/cache/man/.*", r"/var/cache/ldconfig/.*", r"/etc/ld\.so\.cache",
    r"/etc/mailname", r"/etc/(passwd|group|shadow|gshadow|subuid|subgid)-?", r"/etc/\.pwd\.lock",
    rf"/home/{USER}(/.*)?", rf"/var/mail/{USER}", r"/run/.*", r"/tmp/.*",
)]


class Findings:
    """Mismatches between the package and the rules, reported all at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: object, what: str) -> bool:
        if not ok:
            self.items.append(what)
        return bool(ok)

    def assert_none(self) -> None:
        assert not self.items, "the package differs from the rules:\n- " + "\n- ".join(self.items)


@pytest.fixture(scope="session")
def deb() -> Path:
    """This tree's package (built by `make deb`'s script unless already built)."""
    skip_unless_possible()
    try:
        return package()
    except BuildFailed as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[DebRoot]:
    skip_unless_possible()
    with DebRoot(tmp_path / "root") as r:
        yield r


def prepare(root: DebRoot, mailname: str | None, smarthost: str) -> None:
    """No relayq, nothing at /usr/sbin/sendmail, none of relayq's dependencies; debconf
    preseeded. `mailname` None: no /etc/mailname; else /etc/mailname says it."""
    root.purge("relayq", *DEPENDENCIES)
    for path in COMMANDS:
        owner = root.run(["dpkg-query", "-S", path])
        if owner.returncode == 0:  # another MTA's sendmail, in the machine below
            root.purge(*{line.split(":")[0] for line in owner.stdout.splitlines()})
    # and what relayq itself leaves on this machine (tests running it as root)
    root.ok(["rm", "-rf", *COMMANDS, "/etc/relayq", "/var/spool/relayq", "/usr/share/relayq",
             "/var/cache/relayq", "/var/log/relayq", "/run/relayq", "/etc/mailname"])
    if mailname is not None:
        root.ok(["sh", "-c", 'printf "%s\\n" "$1" > /etc/mailname', "sh", mailname])
    root.preseed([f"relayq shared/mailname string {mailname or 'host.example.org'}",
                  f"relayq relayq/smarthost string {smarthost}"])
    for path in COMMANDS:
        assert not root.path(path).exists(), path


def install(root: DebRoot, deb: Path) -> str:
    """apt-get install /tmp/relayq_*.deb inside the root; its output."""
    inside = root.put(deb, f"/tmp/{deb.name}")
    res = root.apt_install(inside)
    assert res.returncode == 0, f"apt-get install exited {res.returncode}\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr


def submit(root: DebRoot, to: str, subject: str, *flags: str, user: str = "") -> None:
    root.ok(["/usr/sbin/sendmail", *flags, "-t"], input=MESSAGE.format(to=to, subject=subject),
            user=user, timeout=120)


def received(host: Smarthost, subject: str) -> list[list[str]]:
    """The recipients of each transaction whose Subject is `subject`."""
    return [t.rcpt_tos for t in host.transactions
            if f"\r\nSubject: {subject}\r\n".encode() in b"\r\n" + t.content]


def queue_files(root: DebRoot) -> dict[str, str]:
    """Every file under /var/spool/relayq: path -> sha256 of its content."""
    out = root.ok(["find", "/var/spool/relayq", "-type", "f"]).split()
    return {p: hashlib.sha256(root.path(p).read_bytes()).hexdigest() for p in sorted(out)}


def free_port() -> int:
    """A loopback port nothing listens on (the smarthost starts there later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- what an installed package must look like -------------------------------------------


def check_installed(root: DebRoot, f: Findings, mailname: str, smarthost: str) -> None:
    f.check(root.path("/etc/mailname").read_text() == f"{mailname}\n",
            f"/etc/mailname says {root.path('/etc/mailname').read_text()!r}, not {mailname!r}")
    config = root.path("/etc/relayq/relayq.toml")
    if f.check(config.exists(), "no /etc/relayq/relayq.toml"):
        try:
            value = tomllib.loads(config.read_text()).get("smarthost")
        except tomllib.TOMLDecodeError as e:
            value = f"(not TOML: {e})"
        f.check(value in (smarthost, [smarthost]),
                f"relayq.toml's smarthost is {value!r}, not {smarthost!r}")
    for path in COMMANDS:
        owner = root.run(["dpkg-query", "-S", path]).stdout.strip()
        f.check(owner == f"relayq: {path}", f"dpkg -S {path}: {owner!r}")
        f.check(root.run(["test", "-x", path]).returncode == 0, f"{path} is not executable")
    fields = dict(line.split("=", 1) for line in root.ok(
        ["dpkg-query", "-W", "-f=Provides=${Provides}\\nConflicts=${Conflicts}\\n"
         "Replaces=${Replaces}\\nDepends=${Depends}\\nRecommends=${Recommends}\\n",
         "relayq"]).splitlines())
    for field in ("Provides", "Conflicts", "Replaces"):
        f.check("mail-transport-agent" in fields[field], f"{field}: {fields[field]!r}")
    wanted = {"Depends": ("python3", "python3-aiosmtpd", "python3-dnspython"),
              "Recommends": ("python3-uvloop",)}
    for field, names in wanted.items():
        have = {alt.split()[0].split(":")[0]  # python3:any is python3
                for alt in re.split(r"[,|]", fields[field]) if alt.strip()}
        f.check(set(names) <= have, f"{field}: {fields[field]!r} lacks {set(names) - have}")
    f.check(root.path("/usr/lib/sysusers.d/relayq.conf").exists(), "no sysusers.d/relayq.conf")
    for dep in (*DEPENDENCIES, "relayq"):
        f.check(root.installed(dep), f"{dep} is not installed (Depends/Recommends)")
    units = {u: [d for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
                 if root.path(f"{d}/{u}").is_file()] for u in UNITS}
    f.check(all(units.values()), f"units missing: {[u for u, d in units.items() if not d]}")
    wants = root.path("/etc/systemd/system/multi-user.target.wants/relayq.service")
    f.check(wants.is_symlink(), "relayq.service is not enabled (multi-user.target.wants)")
    enabled = root.ok("ls /etc/systemd/system/*.wants/ 2>/dev/null || true").split()
    f.check(not [u for u in enabled if u.startswith("relayq-listener")],
            f"the listener is enabled: {enabled}")
    # an upgrade restarts the queue runner (systemd is not running here: read the script)
    postinst = root.path("/var/lib/dpkg/info/relayq.postinst").read_text()
    f.check(re.search(r"_dh_action=restart\n.*deb-systemd-invoke \$_dh_action [^\n]*"
                      r"relayq\.service", postinst, re.S) is not None,
            "the postinst does not restart relayq.service after an upgrade")
    # the system's MTA: a program that needs one (bsd-mailx: default-mta |
    # mail-transport-agent) is content with relayq and pulls in no other
    plan = root.run(["apt-get", "install", "-s", "-y", "bsd-mailx"]).stdout
    f.check("Inst bsd-mailx" in plan or "bsd-mailx is already" in plan,
            f"apt cannot plan bsd-mailx: {plan[-300:]!r}")
    others = [w for w in ("exim4", "postfix", "nullmailer", "Remv relayq") if w in plan]
    f.check(not others, f"installing bsd-mailx would bring {others}")
    for hook in HOOKS:
        st = root.path(hook).stat() if root.path(hook).exists() else None
        f.check(st is not None and st.st_mode & 0o111 and st.st_uid == 0,
                f"{hook}: {'missing' if st is None else oct(st.st_mode)} (want root's, executable)")
    for page in MAN:
        found = root.ok(f"ls /usr/share/man/{page}* 2>/dev/null || true").strip()
        f.check(found, f"no man page /usr/share/man/{page}")
    check_user_and_spool(root, f)


def check_user_and_spool(root: DebRoot, f: Findings) -> None:
    """The relayq system user, and the spool as the package's tmpfiles.d file says."""
    entry = root.run(["getent", "passwd", "relayq"]).stdout.strip().split(":")
    if not f.check(len(entry) == 7, "no relayq user"):
        return
    f.check(int(entry[2]) < 1000, f"relayq's uid {entry[2]} is not a system uid")
    f.check(entry[6] in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"),
            f"relayq's shell is {entry[6]}")
    tmpfiles = root.path("/usr/lib/tmpfiles.d/relayq.conf")
    if not f.check(tmpfiles.exists(), "no /usr/lib/tmpfiles.d/relayq.conf"):
        return
    dirs = [line.split() for line in tmpfiles.read_text().splitlines() if line.startswith("d ")]
    f.check("/var/spool/relayq" in [d[1] for d in dirs], "tmpfiles.d makes no /var/spool/relayq")
    for _, path, mode, user, group, *_ in dirs:
        got = root.run(["stat", "-c", "%a %U %G", path]).stdout.split()
        want = [mode.lstrip("0") or "0", user, group]
        f.check(got == want, f"{path}: {' '.join(got) or 'missing'}, not {' '.join(want)}")
    spool = root.run(["stat", "-c", "%U", "/var/spool/relayq/queue"]).stdout.strip()
    f.check(spool == "relayq", f"/var/spool/relayq/queue belongs to {spool!r}, not relayq")


def check_commands(root: DebRoot, f: Findings, host: Smarthost, mailname: str) -> None:
    """Mail from root and from an ordinary user reaches the smarthost; mailq, newaliases
    and man sendmail answer as relayq's."""
    submit(root, "root-rcpt@example.org", "from root")  # delivered by sendmail itself
    wait_for(lambda: received(host, "from root"), 120, "root's message at the smarthost")
    # a user's mail waits in maildrop/ for the queue's owner: relayq.service
    service = start_service(root)
    root.ok(["useradd", "--create-home", "--shell", "/bin/sh", USER])
    submit(root, "user-rcpt@example.org", "from a user", user=USER)
    try:
        wait_for(lambda: received(host, "from a user"), 120, "the user's message at the smarthost")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{root.run('mailq; ls -lR /var/spool/relayq').stdout}"
                             f"{root.run(['cat', SERVICE_LOG]).stdout}") from None
    f.check(received(host, "from root") == [["root-rcpt@example.org"]],
            f"root's message arrived as {received(host, 'from root')}")
    f.check(received(host, "from a user") == [["user-rcpt@example.org"]],
            f"the user's message arrived as {received(host, 'from a user')}")
    senders = sorted(t.mail_from for t in host.transactions)
    f.check(senders == sorted([f"root@{mailname}", f"{USER}@{mailname}"]),
            f"envelope senders {senders}: not from /etc/mailname's {mailname}")
    wait_for(lambda: "empty" in root.run(["mailq"]).stdout.lower() or
             "total requests: 0" in root.run(["mailq"]).stdout.lower(), 60, "an empty queue")
    q = root.run(["mailq"])
    f.check(q.returncode == 0, f"mailq exited {q.returncode}: {q.stderr.strip()}")
    q = root.run(["mailq"], user=USER)
    f.check(q.returncode == 0, f"mailq as a user exited {q.returncode}: {q.stderr.strip()}")
    n = root.run(["newaliases"])
    f.check(n.returncode == 0, f"newaliases exited {n.returncode}: {n.stderr.strip()}")
    page = root.run(["man", "-P", "cat", "sendmail"], env={"MANPAGER": "cat", "COLUMNS": "80"})
    f.check(page.returncode == 0 and "relayq" in page.stdout,
            f"man sendmail: exit {page.returncode}, {page.stdout[:200]!r} {page.stderr[:200]!r}")
    stop_service(root, service)


SERVICE_LOG = "/run/relayq-service.log"


def start_service(root: DebRoot) -> int:
    """Start relayq.service as systemd would (no systemd runs in the root): the
    installed unit's ExecStart, User, Group, Environment and RuntimeDirectory, in
    the background. Its pid inside the root."""
    unit = next(root.path(f"{d}/relayq.service") for d in ("/usr/lib/systemd/system",
                "/lib/systemd/system") if root.path(f"{d}/relayq.service").exists())
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), []).append(value.strip())
    user, group = keys.get("User", ["root"])[0], keys.get("Group", ["root"])[0]
    env = " ".join(keys.get("Environment", []))
    for runtime in " ".join(keys.get("RuntimeDirectory", [])).split():
        root.ok(["install", "-d", "-o", user, "-g", group, "-m", "0755", f"/run/{runtime}"])
    cmd = (f"env {env} setpriv --reuid={user} --regid={group} --init-groups "
           f"{keys['ExecStart'][0]} > {SERVICE_LOG} 2>&1 < /dev/null & echo $!")
    return int(root.ok(cmd).strip())


def stop_service(root: DebRoot, pid: int) -> None:
    """systemctl stop: SIGTERM, then wait (bounded) for it to end, as prerm's stop would."""
    root.run(["kill", str(pid)])
    root.ok(f"for i in $(seq 300); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.1; done; "
            f"echo relayq.service did not stop >&2; exit 1")


# --- the scenarios -----------------------------------------------------------------------


def test_fresh_install_mail_remove_and_purge(root: DebRoot, deb: Path,
                                             smarthost_factory: SmarthostFactory) -> None:
    host = smarthost_factory()
    f = Findings()
    prepare(root, None, host.smarthost)
    before = root.changes()
    baseline_packages = installed_packages(root)
    out = install(root, deb)
    f.check("needs a look" not in out and "no smarthost" not in out,
            f"postinst complains about the preseeded configuration: {out[-600:]!r}")
    check_installed(root, f, "host.example.org", host.smarthost)
    check_commands(root, f, host, "host.example.org")

    root.ok(["dpkg", "--remove", "relayq"])
    f.check(root.path("/etc/relayq/relayq.toml").exists(), "remove took /etc/relayq/relayq.toml")
    f.check(root.path("/var/spool/relayq/queue").is_dir(), "remove took /var/spool/relayq")
    f.check(not root.path("/usr/sbin/sendmail").exists(), "remove left /usr/sbin/sendmail")
    # the hooks are conffiles and stay until purge: with relayq gone they do nothing
    for hook, args, env in (("/etc/network/if-up.d/relayq", [], IFUP_ENV),
                            ("/etc/NetworkManager/dispatcher.d/relayq", ["eth0", "up"], {})):
        res = root.run([hook, *args], env=env, timeout=60)
        f.check((res.returncode, res.stdout, res.stderr) == (0, "", ""),
                f"{hook} after remove: exit {res.returncode} {res.stdout!r} {res.stderr!r}")

    purge = root.run(["dpkg", "--purge", "relayq"])
    assert purge.returncode == 0, purge.stdout + purge.stderr
    for gone in ("/etc/relayq", "/var/spool/relayq", *COMMANDS, "/usr/share/relayq",
                 *HOOKS, "/etc/systemd/system/multi-user.target.wants/relayq.service"):
        f.check(not root.path(gone).exists() and not root.path(gone).is_symlink(),
                f"purge left {gone}")
    f.check(root.path("/etc/mailname").exists(), "purge took /etc/mailname")
    f.check(root.run(["getent", "passwd", "relayq"]).returncode == 0, "purge took the user")
    f.check(not root.known("relayq"), "dpkg still knows relayq after purge")
    f.check(root.run("debconf-show relayq").stdout.strip() == "",
            f"debconf still has: {root.run('debconf-show relayq').stdout.strip()!r}")
    check_nothing_left(root, f, before, baseline_packages)

    # installed again over what purge leaves (the user, /etc/mailname): as good as new
    root.preseed([f"relayq relayq/smarthost string {host.smarthost}"])
    install(root, deb)
    check_user_and_spool(root, f)
    submit(root, "again@example.org", "after a reinstall")
    wait_for(lambda: received(host, "after a reinstall"), 120, "mail after the reinstall")
    f.assert_none()


def installed_packages(root: DebRoot) -> set[str]:
    return set(root.ok(["dpkg-query", "-W", "-f=${Package}\\n"]).split())


def check_nothing_left(root: DebRoot, f: Findings, before: dict[str, Entry],
                       baseline_packages: set[str], also: str = "") -> None:
    """After the purge the root differs from before the install only in what
    ALLOWED_AFTER_PURGE (and the pattern `also`) names and in the packages apt
    pulled in (their files)."""
    allowed = [*ALLOWED_AFTER_PURGE, *([re.compile(also)] if also else [])]
    pulled = installed_packages(root) - baseline_packages
    owned: set[str] = set()
    for pkg in pulled:
        owned.update(root.ok(["dpkg-query", "-L", pkg]).split("\n"))
    owned.update({"/usr" + p for p in owned if p.startswith(("/lib/", "/bin/", "/sbin/"))})
    # what a pulled-in package's maintainer scripts enable (cron: rc links, wants)
    units = {Path(p).name for p in owned if "/systemd/system/" in p}
    scripts = {Path(p).name for p in owned if p.startswith("/etc/init.d/")}
    enabled = [re.compile(rf"/etc/rc[0-6S]\.d/[SK]\d\d{re.escape(n)}") for n in scripts] + [
        re.compile(rf"/(etc/systemd/system|var/lib/systemd/deb-systemd-helper-enabled)/"
                   rf"(.*/)?{re.escape(u)}(\.dsh-also)?") for u in units]
    left = []
    for path in changed_since(before, root.changes()):
        if any(rx.fullmatch(path) for rx in allowed + enabled) or path in owned:
            continue
        if "/__pycache__" in path and path.split("/__pycache__")[0] in owned:
            continue  # py3compile's bytecode of a pulled-in package
        was = before.get(path)
        if (was is None or was.kind != "whiteout") and Path(path).is_dir() and \
                root.path(path).is_dir() and not root.path(path).is_symlink():
            continue  # a directory of the machine's, copied up on the way
        left.append(path)
    f.check(not left, f"after purge the root still has (or lost) {left}")


def test_kept_mailname_upgrade_keeps_queued_mail_purge_keeps_queue(
        root: DebRoot, deb: Path, smarthost_factory: SmarthostFactory) -> None:
    try:
        newer = newer_package()
    except BuildFailed as e:
        pytest.fail(str(e), pytrace=False)
    port = free_port()  # nothing listens there until the upgrade is done
    smarthost = f"[127.0.0.1]:{port}"
    f = Findings()
    prepare(root, "kept.example.net", smarthost)
    root.preseed(["relayq shared/mailname string asked.example.org"])
    before = root.changes()
    baseline_packages = installed_packages(root)
    out = install(root, deb)
    f.check("needs a look" not in out and "no smarthost" not in out,
            f"postinst complains about the preseeded configuration: {out[-600:]!r}")
    f.check(root.path("/etc/mailname").read_text() == "kept.example.net\n",
            f"/etc/mailname was changed to {root.path('/etc/mailname').read_text()!r}")

    submit(root, "queued@example.org", "across the upgrade", "-odq")
    files = queue_files(root)
    listed = root.ok(["mailq"])
    assert "queued@example.org" in listed, listed
    config = root.path("/etc/relayq/relayq.toml").read_text()
    old_version = root.ok(["dpkg-query", "-W", "-f=${Version}", "relayq"])

    install(root, newer)
    new_version = root.ok(["dpkg-query", "-W", "-f=${Version}", "relayq"])
    assert new_version != old_version, f"the upgrade left version {new_version}"
    f.check(queue_files(root) == files, f"the upgrade changed the queue: {files} -> "
            f"{queue_files(root)}")
    f.check("queued@example.org" in root.ok(["mailq"]), "mailq lost the message")
    f.check(root.path("/etc/relayq/relayq.toml").read_text() == config,
            "the upgrade changed relayq.toml")
    f.check(root.path("/etc/mailname").read_text() == "kept.example.net\n",
            "the upgrade changed /etc/mailname")

    with Smarthost(port=port) as host:
        # the link comes up: the installed ifupdown hook, as ifupdown runs it, flushes
        root.ok(["/etc/network/if-up.d/relayq"], env=IFUP_ENV, timeout=60)
        try:
            wait_for(lambda: received(host, "across the upgrade"), 60, "the hook's flush")
        except AssertionError:
            f.check(False, "the installed ifupdown hook did not flush the queue")
        root.ok(["relayq", "flush"], timeout=120)
        wait_for(lambda: received(host, "across the upgrade"), 120, "the queued message")
        wait_for(lambda: "queued@example.org" not in root.ok(["mailq"]), 60, "an empty queue")
        root.ok(["sendmail", "-q"], timeout=120)  # another queue run finds nothing to send
        root.ok("for i in $(seq 600); do pgrep -x timeout >/dev/null || exit 0; sleep 0.1; "
                "done; exit 1", timeout=120)  # the hook's flush has ended
        f.check(received(host, "across the upgrade") == [["queued@example.org"]],
                f"delivered as {received(host, 'across the upgrade')}, not once")

    submit(root, "left@example.org", "left at purge", "-odq")
    # a damaged message is mail too: purge counts what quarantine/ holds
    root.ok("echo damaged > /var/spool/relayq/quarantine/x.e && chown relayq: "
            "/var/spool/relayq/quarantine/x.e")
    left = queue_files(root)
    f.check(left, "the message for the purge did not queue")
    purge = root.run(["dpkg", "--purge", "relayq"])
    assert purge.returncode == 0, purge.stdout + purge.stderr
    f.check(not root.path("/etc/relayq").exists(), "purge left /etc/relayq")
    f.check(queue_files(root) == left, "purge with mail queued did not keep the queue as it was")
    said = purge.stdout + purge.stderr
    f.check("/var/spool/relayq kept" in said and "queued: 1," in said
            and "quarantine/: 1)" in said, f"purge kept the queue silently: {said!r}")
    check_nothing_left(root, f, before, baseline_packages, also=r"/var/spool/relayq(/.*)?")
    f.assert_none()


def reconfigure(root: DebRoot, answer: str) -> str:
    """dpkg-reconfigure relayq answering the smarthost question (the teletype frontend
    reads the answer from stdin as a terminal user would type it)."""
    res = root.run(["dpkg-reconfigure", "-fteletype", "relayq"], input=answer + "\n",
                   env={"DEBIAN_FRONTEND": "teletype"}, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def test_debconf_answers_and_the_administrators_file(root: DebRoot, deb: Path,
                                                    tmp_path: Path) -> None:
    """An answer that is not a host list is refused; the configuration is the
    administrator's: its mode, owner, symlink, other lines and own edits survive
    reinstalls and answers, and only a changed answer rewrites the smarthost line."""
    f = Findings()
    config = "/etc/relayq/relayq.toml"
    prepare(root, "host.example.org", 'evil.example.org" \\n password = "x')
    # a queue an earlier pip install left: root's, with a message in it
    (tmp_path / "pip-era").mkdir()
    pip_era = Relayq(tmp_path / "pip-era")
    sent = subprocess.run([str(BIN / "sendmail"), "-odq", "old@example.org"], env=pip_era.env,
                          input=b"Subject: from the pip days\n\nhi\n", capture_output=True)
    assert sent.returncode == 0, sent.stderr
    shutil.copytree(pip_era.queue_dir, root.path("/var/spool/relayq"), symlinks=True)
    said = install(root, deb)
    listing = root.ok(["mailq"])
    f.check("old@example.org" in listing and "damaged" not in listing
            and "Permission denied" not in listing,
            f"the pip-era message is not the service's after install: {listing!r}")
    owners = root.ok("stat -c %U /var/spool/relayq/queue/*").split()
    f.check(owners and set(owners) == {"relayq"}, f"queue files owned by {owners}")
    f.check("not host[:port]" in said, f"a hostile answer was not refused aloud: {said[-400:]!r}")
    text = root.path(config).read_text()
    f.check("evil" not in text and not re.search(r"^smarthost", text, re.M),
            f"the refused answer reached the file: {text!r}")
    f.check("no smarthost" in said, "install without a smarthost did not say so")

    # the administrator's file: a password (mode 0640 root:relayq), a comment on the line
    mine = ('# mine\nuser = "bob"\npassword = "s3cret"\n'
            'smarthost = "old.example.org:587"   # the relay\n')
    root.ok(["sh", "-c", f'printf "%s" "$1" > {config} && chown root:relayq {config} && '
             f"chmod 0640 {config} && chgrp relayq /etc/relayq && chmod 0750 /etc/relayq",
             "sh", mine])
    reconfigure(root, "new.example.org:587")
    st = root.path("/etc/relayq").stat()
    f.check(st.st_mode & 0o777 == 0o750, f"/etc/relayq became {oct(st.st_mode)}")
    text = root.path(config).read_text()
    f.check(text == mine.replace('smarthost = "old.example.org:587"   # the relay',
                                 'smarthost = "new.example.org:587"'),
            f"a new answer did more than change the smarthost line: {text!r}")
    st = root.path(config).stat()
    f.check((st.st_mode & 0o777, st.st_uid) == (0o640, 0) and st.st_gid != 0,
            f"the file's mode/owner changed: {oct(st.st_mode)} {st.st_uid}:{st.st_gid}")
    before = root.path(config).read_bytes()
    reinstall = root.run(["dpkg", "-i", f"/tmp/{deb.name}"], timeout=300)
    f.check(reinstall.returncode == 0, reinstall.stdout + reinstall.stderr)
    f.check(root.path(config).read_bytes() == before, "a reinstall rewrote the file")

    # commented out by the administrator: a reinstall does not bring it back
    root.ok(["sed", "-i", "s/^smarthost/# smarthost/", config])
    root.ok(["dpkg", "-i", f"/tmp/{deb.name}"], timeout=300)
    f.check(not re.search(r"^smarthost", root.path(config).read_text(), re.M),
            "a reinstall put back the smarthost line the administrator commented out")

    # a file without a newline at its end, behind a symlink: an answer appends a line
    root.ok(["sh", "-c", f'mkdir -p /srv && printf "user = \\"bob\\"" > /srv/relayq.toml && '
             f"rm {config} && ln -s /srv/relayq.toml {config}"])
    reconfigure(root, "[192.0.2.7]:2525, b.example.org")
    f.check(root.path(config).is_symlink(), "the symlink became a file")
    try:
        values = tomllib.loads(root.path("/srv/relayq.toml").read_text())
    except tomllib.TOMLDecodeError as e:
        values = {"error": str(e)}
    f.check(values == {"user": "bob", "smarthost": ["[192.0.2.7]:2525", "b.example.org"]},
            f"after the answer the file says {values}")
    f.check(not root.ok("ls /etc/relayq /srv").count(".relayq-new"), "a temporary file is left")

    # a link to nothing: said and left alone, the package still configured
    root.ok(f"rm /srv/relayq.toml && ls -l {config}")
    said = reconfigure(root, "c.example.org")
    f.check("link to nothing" in said and root.path(config).is_symlink()
            and not root.path("/srv/relayq.toml").exists(), f"a dangling link: {said[-300:]!r}")
    f.assert_none()
