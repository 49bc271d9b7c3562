"""A throwaway Debian root for package tests that leaves the test machine untouched.

The root is an overlay over the machine's own `/` (the lower layer, read only) with
an upper directory in the test's tmp_path, mounted in a private mount namespace:
every write a package installation makes (dpkg's database, /etc, /usr, users in
/etc/passwd) lands in the upper directory and nowhere else.

One holder process per root keeps the namespaces alive: `unshare` makes a private
mount namespace and a PID namespace, mounts the overlay, a fresh /proc, /dev and
/sys from the machine, fresh tmpfs on /run, /tmp and /dev/shm, this checkout
read-only at its own path (a CI clone may live under /tmp), then chroots and
waits as the PID namespace's init (reaping orphans). Each `run()` enters those
namespaces with `nsenter`. One mount (not one per call) because a process a command
leaves behind (a background delivery, a detached flush) keeps its mount namespace
alive, and two overlay mounts over one upper directory are undefined behaviour.
`close()` kills the holder, and with it, by the kernel's rule for a PID namespace's
init, everything still running inside.

The network namespace is the machine's: a test smarthost on 127.0.0.1 in the test
process is reachable from inside. No systemd runs inside (/run is empty), so
maintainer scripts enable units (symlinks) but start nothing, as in a chroot.

Files inside are readable from the test through `path()` (/proc/PID/root).
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

CHECKOUT = Path(__file__).resolve().parents[2]  # bound into every root (its venv runs there)
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}

_SETUP = r"""
set -e
M=$1
mount -t overlay overlay -o "lowerdir=/,upperdir=$2,workdir=$3" "$M"
mount -t proc proc "$M/proc"
mount --rbind /dev "$M/dev"
mount -t tmpfs -o mode=1777 tmpfs "$M/dev/shm"
mount --rbind /sys "$M/sys"
mount -t tmpfs -o mode=755 tmpfs "$M/run"
mount -t tmpfs -o mode=1777 tmpfs "$M/tmp"
# this checkout (its venv included) at its own path, read-only, even under /tmp
mkdir -p "$M$5"
mount --bind "$5" "$M$5"
mount -o remount,bind,ro "$M$5"
exec chroot "$M" /usr/bin/python3 -c "$4"
"""

_INIT = r"""
import os, sys, time
print("ready", flush=True)
sys.stdout.close()
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.2)
"""


@functools.cache
def why_not() -> str:
    """Why this machine cannot make a root ("" when it can): the reason a test skips with."""
    if os.geteuid() != 0:
        return "a Debian root needs root (mount namespaces, overlayfs)"
    for tool in ("unshare", "nsenter", "mount", "chroot", "dpkg"):
        if not shutil.which(tool):
            return f"a Debian root needs {tool}"
    if not Path("/usr/bin/python3").exists():
        return "a Debian root needs /usr/bin/python3 (its init)"
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="relayq-ovl-probe.") as d:
        for sub in ("u", "w", "m"):
            os.mkdir(os.path.join(d, sub))
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"mount -t overlay overlay -o lowerdir=/,upperdir={d}/u,workdir={d}/w {d}/m"],
            capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode != 0:
            return "no overlay over / in a private mount namespace here: " + (
                probe.stderr.strip().splitlines() or ["?"])[-1]
    return ""


def skip_unless_possible() -> None:
    reason = why_not()
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class Entry:
    """One path of the upper directory: what the root changed."""

    kind: str  # "file", "dir", "link", "whiteout" (a deletion), "other"
    mode: int
    size: int
    mtime_ns: int


class DebRoot:
    """A Debian root over this machine's `/` whose writes stay in `base/upper`."""

    def __init__(self, base: Path, *, start_timeout: float = 30) -> None:
        self.base = base
        self.upper = base / "upper"
        self.work = base / "work"
        self.mnt = base / "mnt"
        for d in (self.upper, self.work, self.mnt):
            d.mkdir(parents=True, exist_ok=True)
        self._holder: subprocess.Popen[str] | None = None
        self.pid = 0  # the root's init, as this machine sees it
        self._start(start_timeout)

    def _start(self, timeout: float) -> None:
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "--kill-child=SIGKILL", "sh", "-c", _SETUP, "setup",
             str(self.mnt), str(self.upper), str(self.work), _INIT, str(CHECKOUT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(ENV), preexec_fn=_die_with_parent)
        self._holder = holder
        assert holder.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(holder.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        line = holder.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.close()
            err = holder.stderr.read() if holder.stderr else ""
            raise RuntimeError(f"the Debian root did not start: {err.strip() or line!r}")
        children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
        self.pid = int(children[0])

    def close(self) -> None:
        """Kill everything inside; the mounts go with the namespace."""
        holder, self._holder = self._holder, None
        if holder is None:
            return
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        holder.kill()
        holder.communicate(timeout=30)

    def processes(self) -> list[int]:
        """This machine's ids of the processes running inside (the init included)."""
        try:
            ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        except FileNotFoundError:
            return []
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                        out.append(int(entry))
                except OSError:  # gone, or not ours to look at
                    pass
        return out

    def __enter__(self) -> DebRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside the root --------------------------------------------------------------

    def run(self, cmd: list[str] | str, *, input: bytes | str | None = None,
            env: Mapping[str, str] | None = None, user: str = "",
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `cmd` (a list, or a string for `sh -c`) inside the root, as root or as
        `user` (setpriv: that user's uid, gid and groups), with a clean environment
        (ENV, then `env`); output decoded as text."""
        assert self._holder is not None, "the root is closed"
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = dict(ENV)
        if user:
            home = self.run(["sh", "-c", f"getent passwd {user} | cut -d: -f6"]).stdout.strip()
            full_env.update(HOME=home or "/", USER=user, LOGNAME=user)
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        full_env.update(env or {})
        data = input.encode() if isinstance(input, str) else input
        # output into files, not pipes: a process the command leaves running in the
        # background (a detached delivery) may hold them open long after it is done
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                ["nsenter", f"--target={self.pid}", "--mount", "--pid", "--root", "--wd",
                 "--", *argv], stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                stdout=out, stderr=err, env=full_env)
            try:
                if data is not None:
                    assert proc.stdin is not None
                    with proc.stdin:
                        proc.stdin.write(data)
                proc.wait(timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(
                proc.args, proc.returncode, out.read().decode("utf-8", "replace"),
                err.read().decode("utf-8", "replace"))

    def ok(self, cmd: list[str] | str, *, input: bytes | str | None = None,
           env: Mapping[str, str] | None = None, user: str = "", timeout: float = 300) -> str:
        """run() that must succeed: its stdout, or an assertion error with both outputs."""
        res = self.run(cmd, input=input, env=env, user=user, timeout=timeout)
        assert res.returncode == 0, (
            f"{cmd!r} exited {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}")
        return res.stdout

    def path(self, inside: str) -> Path:
        """The root's file at `inside` as this process can open it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def put(self, src: Path, inside: str) -> str:
        """Copy a file of this machine into the root (e.g. a .deb into /tmp)."""
        shutil.copyfile(src, self.path(inside))
        return inside

    # --- packages ---------------------------------------------------------------------

    def installed(self, package: str) -> bool:
        res = self.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package])
        return res.returncode == 0 and res.stdout.startswith("ii")

    def known(self, package: str) -> bool:
        """dpkg knows the package in any state but not-installed (config-files, half...)."""
        res = self.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package])
        return res.returncode == 0 and not res.stdout.startswith("un")

    def purge(self, *packages: str) -> None:
        """dpkg --purge whichever of `packages` the root has in any state."""
        present = [p for p in packages if self.known(p)]
        if present:
            self.ok(["dpkg", "--purge", "--force-depends", *present])

    def preseed(self, selections: Iterable[str]) -> None:
        """debconf-set-selections lines: 'owner question type value'."""
        self.ok(["debconf-set-selections"], input="".join(f"{s}\n" for s in selections))

    def apt_install(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """apt-get install -y ARGS (a .deb by its absolute path inside the root). apt takes
        what /var/cache/apt/archives holds and downloads only what it lacks; not
        --no-download, with which apt 2.6 cannot install a local .deb ("Pathname to
        install is not absolute")."""
        return self.run(["apt-get", "install", "-y", *args], timeout=timeout)

    # --- what the root changed ----------------------------------------------------------

    def changes(self) -> dict[str, Entry]:
        """Every path in the upper directory ('/etc/passwd': Entry): what the root wrote,
        made or deleted (a whiteout) relative to this machine."""
        out: dict[str, Entry] = {}
        for dirpath, dirnames, filenames in os.walk(self.upper):
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                rel = "/" + os.path.relpath(p, self.upper)
                out[rel] = Entry(_kind(st), st.st_mode & 0o7777, st.st_size, st.st_mtime_ns)
        return out


def _die_with_parent() -> None:
    """The holder goes when the test process does, however it ends (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _kind(st: os.stat_result) -> str:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "whiteout"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "link"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "other"


def changed_since(before: Mapping[str, Entry], after: Mapping[str, Entry]) -> list[str]:
    """Paths new in `after`, or changed (a file's kind, mode, size or mtime; a directory
    only if new or its mode changed), or gone from the upper directory."""
    out = []
    for path, entry in after.items():
        old = before.get(path)
        if old is None or old.kind != entry.kind or old.mode != entry.mode or (
                entry.kind != "dir" and (old.size, old.mtime_ns) != (entry.size, entry.mtime_ns)):
            out.append(path)
    out.extend(p for p in before if p not in after)
    return sorted(out)
