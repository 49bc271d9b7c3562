"""relayq's Debian package, built once per source state for the package tests.

`make deb` runs scripts/build-deb.sh (dpkg-buildpackage, then lintian); the tests
call that script with RELAYQ_DEB_OUT pointing into build/deb-test/HASH, HASH being
the sources as build-deb.sh takes them (the files git knows plus new ones not
ignored; tests/ aside). A build for these sources that is already there is used as it is, so a
session builds at most once and an unchanged tree not at all; an flock keeps two
xdist workers from building the same thing twice.

The upgrade test needs a newer package: the same sources in a scratch copy (a git
repository of its own, since build-deb.sh asks git for the file list) with an entry
on top of debian/changelog whose version dpkg orders after this one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "deb-test"
BUILD_TIMEOUT = 900


class BuildFailed(Exception):
    """`make deb`'s script failed; the message carries the end of its output."""


def source_files(repo: Path = REPO) -> list[str]:
    """The files build-deb.sh packs: tracked or new, not ignored, still there."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, capture_output=True, check=True, timeout=60).stdout
    return sorted(n for n in out.decode().split("\0") if n and os.path.lexists(repo / n))


def source_hash(repo: Path = REPO) -> str:
    """Names, modes and contents of the sources: a new hash, a new build. Not tests/:
    the package ships nothing from there, and editing a test should not cost a build."""
    h = hashlib.sha256()
    for name in source_files(repo):
        if name.startswith("tests/"):
            continue
        p = repo / name
        st = os.lstat(p)
        h.update(name.encode() + b"\0" + oct(st.st_mode).encode() + b"\0")
        h.update(os.readlink(p).encode() if os.path.islink(p) else p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def changelog_version(repo: Path = REPO) -> str:
    """The version on debian/changelog's first line: 'relayq (0.1.0) unstable; ...'."""
    first = (repo / "debian" / "changelog").read_text().splitlines()[0]
    return first.split("(", 1)[1].split(")", 1)[0]


def newer_version(version: str) -> str:
    """A version dpkg orders after `version`: the Debian revision + 1 (0.1.0-1 -> 0.1.0-2),
    or for a native version, which cannot take a revision, '+1' (0.1.0 -> 0.1.0+1)."""
    if "-" in version:
        upstream, revision = version.rsplit("-", 1)
        if revision.isdigit():
            return f"{upstream}-{int(revision) + 1}"
        return f"{version}+1"
    return f"{version}+1"


def _later_than(changelog: str) -> str:
    """A trailer date for a new top entry: now, or a minute after the entry below if that
    one is dated later (lintian fails latest-changelog-entry-without-new-date)."""
    import email.utils
    from datetime import UTC, datetime, timedelta

    below = next(line.split("  ", 1)[1] for line in changelog.splitlines()
                 if line.startswith(" -- ") and "  " in line)
    when = max(datetime.now(UTC), email.utils.parsedate_to_datetime(below) + timedelta(minutes=1))
    return email.utils.format_datetime(when)


def _build(top: Path, out: Path) -> Path:
    """Run build-deb.sh of `top` into `out`; the one relayq_*_all.deb it made."""
    out.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
           "RELAYQ_DEB_OUT": str(out)}
    res = subprocess.run(["sh", str(top / "scripts" / "build-deb.sh")], cwd=top, env=env,
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    if res.returncode != 0:
        raise BuildFailed(f"scripts/build-deb.sh (make deb) exited {res.returncode}:\n"
                          + "\n".join((res.stdout + res.stderr).splitlines()[-25:]))
    debs = sorted(out.glob("relayq_*_all.deb"))
    if len(debs) != 1:
        raise BuildFailed(f"make deb left {[d.name for d in debs]} in {out}, not one .deb")
    shutil.rmtree(out / "src", ignore_errors=True)  # the unpacked build tree: 10s of MB
    return debs[0]


def _cached(out: Path, build: object) -> Path:
    """The .deb in `out`, built by `build()` under a lock when it is not there yet."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = out / "done"
        if done.exists():
            return out / done.read_text().strip()
        shutil.rmtree(out, ignore_errors=True)
        deb = build()  # type: ignore[operator]
        done.write_text(deb.name + "\n")
        _prune(keep=out.name.removesuffix("-next"))
        return Path(deb)


def _prune(keep: str) -> None:
    """Builds of earlier sources go: build/deb-test holds this state's two at most."""
    for old in CACHE.iterdir():
        if old.is_dir() and old.name.removesuffix("-next") != keep:
            shutil.rmtree(old, ignore_errors=True)


def package(repo: Path = REPO) -> Path:
    """This tree's relayq_VERSION_all.deb (built now if these sources have none yet)."""
    out = CACHE / source_hash(repo)
    return _cached(out, lambda: _build(repo, out))


def newer_package(repo: Path = REPO) -> Path:
    """The same sources as version newer_version(...): the upgrade's target."""
    out = CACHE / (source_hash(repo) + "-next")

    def build() -> Path:
        with tempfile.TemporaryDirectory(prefix="relayq-deb-next.") as tmp:
            top = Path(tmp) / "relayq"
            top.mkdir()
            for name in source_files(repo):
                dest = top / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / name, dest, follow_symlinks=False)
            log = top / "debian" / "changelog"
            old = log.read_text()
            entry = (f"relayq ({newer_version(changelog_version(repo))}) unstable; "
                     "urgency=medium\n\n  * Test rebuild: the upgrade's newer version.\n\n"
                     f" -- relayq developers <relayq@example.org>  {_later_than(old)}\n\n")
            log.write_text(entry + old)
            git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
            subprocess.run([*git, "init", "-q"], cwd=top, check=True, timeout=60)
            subprocess.run([*git, "add", "-A"], cwd=top, check=True, timeout=60)
            return _build(top, out)

    return _cached(out, build)
