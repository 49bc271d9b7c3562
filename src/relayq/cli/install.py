"""`relayq install`: put relayq's commands where programs look for sendmail.

/usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq and /usr/bin/newaliases
are written as small launchers that start Python the cheap and safe way
(`python -I -S`: no site processing, no PYTHONPATH or user site from the
caller's environment) with this installation's library paths filled in; that
saves a third of sendmail's start-up, which every cron job and web request
waits for. /usr/bin/relayq is a link to the console script. A path that
another MTA owns is left alone with a clear refusal, unless --force: then the
original is kept aside (dpkg-divert on Debian, so package upgrades respect it;
a `.relayq-saved` copy elsewhere) and `relayq install --uninstall` puts it back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from relayq.core.errors import EX_CANTCREAT, EX_OK, EX_USAGE, RelayqError

LINKS = {
    "usr/sbin/sendmail": "sendmail",
    "usr/lib/sendmail": "sendmail",
    "usr/bin/mailq": "mailq",
    "usr/bin/newaliases": "newaliases",
    "usr/bin/relayq": "relayq",  # the systemd units run /usr/bin/relayq
}
LAUNCHED = {  # command -> module whose main() it runs
    "sendmail": "relayq.cli.sendmail",
    "mailq": "relayq.cli.mailq",
    "newaliases": "relayq.cli.newaliases",
}
MARK = b"# written by relayq install"
SAVED = ".relayq-saved"


def _owner(path: str) -> str:
    """The Debian package that ships `path`, or a plain description."""
    if shutil.which("dpkg-query"):
        r = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True,
                           check=False)
        if r.returncode == 0 and r.stdout:
            return "package " + r.stdout.split(":", 1)[0]
    return "another program"


def _ours(path: str, bindir: str) -> bool:
    """A link into this installation, or a launcher we wrote (any installation)."""
    try:
        if os.path.islink(path):
            return os.path.realpath(path).startswith(os.path.realpath(bindir) + os.sep)
        with open(path, "rb") as f:
            return MARK in f.read(512)
    except OSError:
        return False


def interpreter(choice: str | None) -> str:
    """The Python the launchers start: the base interpreter (with -S a venv's
    own shim adds nothing), or `choice` if it is the same Python version,
    since it will import the dependencies installed for this one.

    A statically linked build (Debian's /usr/bin/python3) starts ~1 ms faster
    than one with a shared libpython (pyenv's), and sendmail pays it per message.
    """
    if choice is None:
        base = getattr(sys, "_base_executable", "") or sys.executable
        return base if os.access(base, os.X_OK) else sys.executable
    want = f"{sys.version_info[0]} {sys.version_info[1]}"
    got = ""
    if os.path.isabs(choice) and os.access(choice, os.X_OK):
        code = "import sys; print(*sys.version_info[:2])"
        probe = subprocess.run([choice, "-I", "-S", "-c", code],
                               capture_output=True, text=True, check=False)
        got = probe.stdout.strip() if probe.returncode == 0 else ""
    if got != want:
        raise RelayqError(f"--python {choice}: not an absolute path to Python "
                          f"{want.replace(' ', '.')} (relayq's own version)", EX_USAGE)
    return choice


def launcher(command: str, python: str | None = None) -> bytes:
    """The text of a -I -S launcher for one command of this installation."""
    import sysconfig

    import relayq

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(relayq.__file__)))]
    purelib = sysconfig.get_path("purelib")  # dependencies (aiosmtpd, dnspython)
    if purelib not in paths:
        paths.append(purelib)
    return (
        f"#!{python or interpreter(None)} -IS\n"  # one shebang argument: -I and -S
        f"{MARK.decode()} (run it again after moving or upgrading relayq)\n"
        "import sys\n"
        f"sys.path[:0] = {paths!r}\n"
        "from relayq.cli._exit import leave\n"
        f"from {LAUNCHED[command]} import main\n"
        "leave(main())\n"
    ).encode()


def _divert(path: str, root: str) -> None:
    """Keep another MTA's file aside, the Debian way when we can."""
    if root == "/" and shutil.which("dpkg-divert") and _owner(path).startswith("package "):
        r = subprocess.run(["dpkg-divert", "--local", "--rename", "--divert",
                            path + SAVED, "--add", path], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            raise RelayqError(f"dpkg-divert {path}: {r.stderr.strip()}", EX_CANTCREAT)
        return
    os.rename(path, path + SAVED)


def _undivert(path: str, root: str) -> None:
    if root == "/" and shutil.which("dpkg-divert"):
        r = subprocess.run(["dpkg-divert", "--listpackage", path], capture_output=True,
                           text=True, check=False)
        if r.stdout.strip() == "LOCAL":
            subprocess.run(["dpkg-divert", "--local", "--rename", "--divert", path + SAVED,
                            "--remove", path], capture_output=True, check=False)
            return
    if os.path.lexists(path + SAVED):
        os.rename(path + SAVED, path)


def install(root: str, bindir: str, force: bool, python: str | None = None) -> list[str]:
    """Write the launchers and links; one line per action. Refuses before changing anything."""
    python = interpreter(python)
    plan = []
    for rel, command in LINKS.items():
        path = os.path.join(root, rel)
        source = os.path.join(bindir, command)
        if not os.path.exists(source):
            raise RelayqError(f"{source} is missing: install relayq first", EX_CANTCREAT)
        if os.path.lexists(path) and not _ours(path, bindir) and not force:
            raise RelayqError(
                f"{path} belongs to {_owner(path)}; remove that MTA or run "
                "`relayq install --force` (the original is kept and can be restored)",
                EX_CANTCREAT,
            )
        plan.append((path, source, command))
    done = []
    for path, source, command in plan:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            if _ours(path, bindir):
                os.unlink(path)
            else:
                _divert(path, root)
                done.append(f"kept the original {path} as {path}{SAVED}")
        if command in LAUNCHED:
            tmp = f"{path}.relayq-new"
            with open(tmp, "wb") as f:
                f.write(launcher(command, python))
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
            done.append(f"{path}: launcher for {source}")
        else:
            os.symlink(source, path)
            done.append(f"{path} -> {source}")
    if root == "/" and os.geteuid() == 0:
        done.append(_make_system_queue())
    return done


def _make_system_queue() -> str:
    """Users hand mail to the system queue from the first message on (SECURITY.md)."""
    from relayq.queue.spool import Spool
    from relayq.system import configfile

    cfg = configfile.load()
    Spool(cfg.queue_dir).ensure()
    return f"{cfg.queue_dir}: the queue, with maildrop/ for users' mail"


def uninstall(root: str, bindir: str) -> list[str]:
    done = []
    for rel in LINKS:
        path = os.path.join(root, rel)
        if os.path.lexists(path) and _ours(path, bindir):
            os.unlink(path)
            done.append(f"removed {path}")
            _undivert(path, root)
            if os.path.lexists(path):
                done.append(f"restored the original {path}")
    return done


def run_install(root: str, force: bool, remove: bool, python: str | None = None) -> int:
    """`relayq install [--force] [--uninstall] [--root DIR] [--python PATH]`."""
    bindir = os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv[0] else sys.executable))
    if not os.path.exists(os.path.join(bindir, "sendmail")):
        bindir = os.path.dirname(sys.executable)
    try:
        lines = uninstall(root, bindir) if remove else install(root, bindir, force, python)
    except OSError as exc:
        raise RelayqError(f"{exc.filename}: {exc.strerror}", EX_CANTCREAT) from None
    for line in lines:
        print(line)
    return EX_OK
