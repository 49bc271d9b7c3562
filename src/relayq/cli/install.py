"""`relayq install`: put relayq's commands where programs look for sendmail.

Links /usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq,
/usr/bin/newaliases and /usr/bin/relayq to this installation's commands. A path that another MTA
owns is left alone with a clear refusal, unless --force: then the original
is kept aside (dpkg-divert on Debian, so package upgrades respect it; a
`.relayq-saved` copy elsewhere) and `relayq install --uninstall` puts it back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from relayq.errors import EX_CANTCREAT, EX_OK, RelayqError

LINKS = {
    "usr/sbin/sendmail": "sendmail",
    "usr/lib/sendmail": "sendmail",
    "usr/bin/mailq": "mailq",
    "usr/bin/newaliases": "newaliases",
    "usr/bin/relayq": "relayq",  # the systemd units run /usr/bin/relayq
}
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
    try:
        return os.path.realpath(path).startswith(os.path.realpath(bindir) + os.sep)
    except OSError:
        return False


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


def install(root: str, bindir: str, force: bool) -> list[str]:
    """Create the links; returns one line per action. Refuses before changing anything."""
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
        plan.append((path, source))
    done = []
    for path, source in plan:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            if _ours(path, bindir):
                os.unlink(path)
            else:
                _divert(path, root)
                done.append(f"kept the original {path} as {path}{SAVED}")
        os.symlink(source, path)
        done.append(f"{path} -> {source}")
    return done


def uninstall(root: str, bindir: str) -> list[str]:
    done = []
    for rel in LINKS:
        path = os.path.join(root, rel)
        if os.path.islink(path) and _ours(path, bindir):
            os.unlink(path)
            done.append(f"removed {path}")
            _undivert(path, root)
            if os.path.lexists(path):
                done.append(f"restored the original {path}")
    return done


def run_install(root: str, force: bool, remove: bool) -> int:
    """`relayq install [--force] [--uninstall] [--root DIR]`."""
    bindir = os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv[0] else sys.executable))
    if not os.path.exists(os.path.join(bindir, "sendmail")):
        bindir = os.path.dirname(sys.executable)
    try:
        lines = uninstall(root, bindir) if remove else install(root, bindir, force)
    except OSError as exc:
        raise RelayqError(f"{exc.filename}: {exc.strerror}", EX_CANTCREAT) from None
    for line in lines:
        print(line)
    return EX_OK
