"""`relayq install`: put relayq's commands where programs look for sendmail.

/usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq and /usr/bin/newaliases
are written as small launchers that start Python the cheap and safe way
(`python -I -S`: no site processing, no PYTHONPATH or user site from the
caller's environment) with this installation's library paths filled in; that
saves a third of sendmail's start-up, which every cron job and web request
waits for. Only relayq's own folder goes ahead of the standard library; the
site directories its dependencies come from go after it, as plain python3
orders them, so an `enum/` or `typing.py` someone's pip left there cannot
replace the standard one. /usr/bin/relayq is a link to the console script.
A path that another MTA owns is left alone with a clear refusal, unless --force: then the
original is kept aside (dpkg-divert on Debian, so package upgrades respect it;
a `.relayq-saved` copy elsewhere) and `relayq install --uninstall` puts it back.
The Debian package relayq counts as another MTA here: its launchers carry our
mark too, but they are dpkg's files.

`--root DIR` is a staging root for a package (DESTDIR): every path written
inside the files is where it will be on the target, never one of this build.
All five commands are launchers for the target's interpreter (--python,
/usr/bin/python3), whose module path is --libdir (/usr/share/relayq, Debian's
place for a program's private modules) and, after the standard library, that
interpreter's own site directories (python3-aiosmtpd, python3-dnspython; never
/usr/local for Debian's python3: a package must not depend on it); the man
pages go in too, their prose from the source tree's docs/ or, run from the
installed package, the copies it ships gzipped in /usr/share/doc/relayq.
`--root DIR --venv` writes launchers under DIR that run this installation
(tests and benchmarks), as the host install does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from relayq.core.errors import EX_CANTCREAT, EX_NOINPUT, EX_OK, EX_USAGE, RelayqError

TYPE_CHECKING = False

if TYPE_CHECKING:
    from pathlib import Path

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
STAGED = {**LAUNCHED, "relayq": "relayq.cli.main"}  # a staging root has no console script
MARK = b"# written by relayq install"
FOR_PACKAGE = b" for a package: "  # after MARK in a staged launcher: dpkg's, not ours
PACKAGE = "relayq"
SAVED = ".relayq-saved"
TARGET_PYTHON = "/usr/bin/python3"
TARGET_LIBDIR = "/usr/share/relayq"  # Debian Python policy: a program's private modules
MANDIR = "usr/share/man"
LOCAL_MANDIR = "usr/local/share/man"  # a host install: not a package's
PACKAGE_DOCS = "/usr/share/doc/relayq"  # the package's docs/, gzipped (dh_installdocs)


def _dpkg_package(path: str) -> str | None:
    """The Debian package whose file is at `path`: none when a local diversion (ours,
    the admin's) has put the package's file aside and something else there."""
    if not shutil.which("dpkg-query"):
        return None
    r = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True,
                       env=dict(os.environ, LC_ALL="C"), check=False)  # untranslated lines
    if r.returncode != 0 or f"local diversion from: {path}\n" in r.stdout:
        return None
    for line in r.stdout.splitlines():  # "pkg[, pkg]: path", after any diversion lines
        names, _, where = line.partition(": ")
        if where == path and not names.startswith("diversion by "):
            return names.split(",", 1)[0]
    return None


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except OSError:
        return b""


def _owner(path: str) -> str:
    """The package `path` is a file of (a staged launcher's mark names it, or dpkg
    does), or a plain description."""
    head = b"" if os.path.islink(path) else _head(path)
    if MARK + FOR_PACKAGE in head:
        return "package " + head.split(FOR_PACKAGE, 1)[1].split(b" ", 1)[0].decode(
            errors="replace")
    return f"package {name}" if (name := _dpkg_package(path)) else "another program"


def _ours(path: str, bindir: str | None, root: str = "/") -> bool:
    """Is `path` ours to replace or remove? For a staging root (bindir None) any
    launcher we wrote there; it links nothing, so no link is ours. For a host
    install a link into this installation or its own launchers, never a package's:
    one staged for a package, or on the host a file dpkg says a package owns."""
    if os.path.islink(path):
        looks_ours = bindir is not None and \
            os.path.realpath(path).startswith(os.path.realpath(bindir) + os.sep)
    else:
        head = _head(path)
        looks_ours = MARK in head and (bindir is None or MARK + FOR_PACKAGE not in head)
    if not looks_ours or bindir is None:
        return looks_ours
    return root != "/" or _dpkg_package(path) is None


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


Search = tuple[list[str], list[str]]  # (ahead of the standard library, after it)


def this_path() -> Search:
    """The module path of this installation: relayq's own directory ahead of the
    standard library (an editable checkout's src/), the site directory holding its
    dependencies (aiosmtpd, dnspython) after it, where plain python puts it. A
    relayq installed into that site directory needs nothing ahead."""
    import sysconfig

    import relayq

    own = os.path.dirname(os.path.dirname(os.path.abspath(relayq.__file__)))
    site = list(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))
    inside = os.path.realpath(own) in {os.path.realpath(d) for d in site}
    return ([] if inside else [own]), site


def site_dirs(python: str) -> list[str]:
    """Where the target interpreter's own packages live (Debian's python3-aiosmtpd and
    python3-dnspython: /usr/lib/python3/dist-packages), asked of it with site on:
    the launchers run with -S, so they must name them. -I keeps this environment's
    PYTHONPATH and user site out of the answer. For Debian's python3 (prefix /usr)
    /usr/local is left out: a package must not load what a local pip put there."""
    code = "import site, sys; print(sys.prefix, *site.getsitepackages(), sep='\\n')"
    r = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    if r.returncode != 0:
        raise RelayqError(f"--python {python}: cannot list its site directories: "
                          f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}", EX_USAGE)
    prefix, *dirs = [line for line in r.stdout.splitlines() if line] or [""]
    if prefix == "/usr":
        dirs = [d for d in dirs if not (d + "/").startswith("/usr/local/")]
    return dirs


def launcher(command: str, python: str | None = None, paths: Search | None = None) -> bytes:
    """The text of a -I -S launcher for one command: of this installation, or of a
    staged one when `paths` (its module path on the target, relayq's folder first)
    is given."""
    note = "(run it again after moving or upgrading relayq)" if paths is None else \
        f"{FOR_PACKAGE.decode().strip()} {PACKAGE} in {paths[0][0]}"
    ahead, after = this_path() if paths is None else paths
    if command in LAUNCHED:  # the fast exit: sendmail runs once per message
        ending = (f"from relayq.cli._exit import leave\nfrom {LAUNCHED[command]} import main\n"
                  "leave(main())\n")
    else:  # relayq as its console script: the daemon's threads and atexit end normally
        ending = f"from {STAGED[command]} import main\nsys.exit(main())\n"
    return (
        f"#!{python or interpreter(None)} -IS\n"  # one shebang argument: -I and -S
        f"{MARK.decode()} {note}\n"
        "import sys\n"
        + (f"sys.path[:0] = {ahead!r}\n" if ahead else "")
        + (f"sys.path += {after!r}\n" if after else "")
        + ending
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


def _refuse(path: str, ours: bool, force: bool) -> None:
    """Another MTA's command stays unless --force: checked for every path before any write."""
    if os.path.lexists(path) and not ours and not force:
        raise RelayqError(
            f"{path} belongs to {_owner(path)}; remove that MTA or run "
            "`relayq install --force` (the original is kept and can be restored)",
            EX_CANTCREAT,
        )


def _make_room(path: str, ours: bool, root: str) -> list[str]:
    """Clear `path` for our file: ours goes, another MTA's is kept aside."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        return []
    if ours:
        os.unlink(path)
        return []
    _divert(path, root)
    return [f"kept the original {path} as {path}{SAVED}"]


def _write(path: str, data: bytes, mode: int) -> None:
    """Replace `path` whole: a command is never seen half-written."""
    tmp = f"{path}.relayq-new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install(root: str, bindir: str, force: bool, python: str | None = None) -> list[str]:
    """Write the launchers and links of this installation; one line per action.
    Refuses before changing anything."""
    python = interpreter(python)
    plan = []
    for rel, command in LINKS.items():
        path = os.path.join(root, rel)
        source = os.path.join(bindir, command)
        if not os.path.exists(source):
            raise RelayqError(f"{source} is missing: install relayq first", EX_CANTCREAT)
        ours = _ours(path, bindir, root)
        _refuse(path, ours, force)
        plan.append((path, source, command, ours))
    done = []
    for path, source, command, ours in plan:
        done += _make_room(path, ours, root)
        if command in LAUNCHED:
            _write(path, launcher(command, python), 0o755)
            done.append(f"{path}: launcher for {source}")
        else:
            os.symlink(source, path)
            done.append(f"{path} -> {source}")
    try:
        done += _write_pages(os.path.join(root, LOCAL_MANDIR), _man_pages())
    except RelayqError as exc:  # a wheel without its docs: the commands still work
        done.append(f"man pages not written: {exc}")
    if root == "/" and os.geteuid() == 0:
        done.append(_make_system_queue())
    return done


def _write_pages(mandir: str, pages: dict[str, str]) -> list[str]:
    done = []
    for page, text in pages.items():
        path = os.path.join(mandir, "man" + page.rsplit(".", 1)[1], page)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write(path, text.encode(), 0o644)
        done.append(f"{path}: man page")
    return done


def _remove_pages(mandir: str) -> list[str]:
    """The pages install wrote (their .TH line names relayq), none another program's."""
    from relayq.cli import manpages

    done = []
    for page in manpages.PAGES:
        path = os.path.join(mandir, "man" + page.rsplit(".", 1)[1], page)
        try:
            with open(path, "rb") as f:
                first = f.readline(200)
        except OSError:
            continue
        if first.startswith(b".TH ") and b'"relayq' in first:
            os.unlink(path)
            done.append(f"removed {path}")
    return done


def stage(root: str, force: bool, python: str | None = None,
          libdir: str | None = None) -> list[str]:
    """A staging root: the five launchers, relayq's modules if the package build has
    not put them there, and the man pages, all naming target paths only (DESTDIR).
    No queue and no diversion: those are the target's, made when the package is
    installed. Refuses before changing anything; one line per action."""
    python = interpreter(python or TARGET_PYTHON)
    libdir = libdir or TARGET_LIBDIR
    if not os.path.isabs(libdir):
        raise RelayqError(f"--libdir {libdir}: not an absolute path (where relayq's modules "
                          "are on the target)", EX_USAGE)
    paths = [libdir], [d for d in site_dirs(python) if d != libdir]
    pages = _man_pages()
    for rel in LINKS:
        _refuse(os.path.join(root, rel), _ours(os.path.join(root, rel), None), force)
    done = []
    package = os.path.join(root, libdir.lstrip("/"), "relayq")
    if not os.path.exists(package):
        done.append(_copy_package(package))
    for rel, command in LINKS.items():
        path = os.path.join(root, rel)
        done += _make_room(path, _ours(path, None), root)
        _write(path, launcher(command, python, paths), 0o755)
        done.append(f"{path}: launcher, {python} -IS running {STAGED[command]} from {libdir}")
    return done + _write_pages(os.path.join(root, MANDIR), pages)


def _copy_package(dest: str) -> str:
    """The running relayq package as the target imports it: sources only (the
    target's Python compiles its own bytecode)."""
    import relayq

    source = os.path.dirname(os.path.abspath(relayq.__file__))
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return f"{dest}: relayq's modules, copied from {source}"


def _man_pages(places: list[Path] | None = None) -> dict[str, str]:
    """The man pages (cli/manpages renders them from the tables the commands run on),
    with the prose of the source tree's docs/ from the first of `places` that has
    it: beside the running package (a checkout), installed with the wheel
    (share/relayq/docs), in the current directory (a package build runs in the
    source tree), or the Debian package's gzipped copies (so it can stage a root)."""
    from pathlib import Path

    import relayq
    from relayq.cli import manpages

    if places is None:
        places = [Path(os.path.abspath(relayq.__file__)).parent.parent.parent / "docs",
                  Path(sys.prefix) / "share" / "relayq" / "docs",  # pyproject's data-files
                  Path.cwd() / "docs", Path(PACKAGE_DOCS)]
    for docs in places:
        if manpages.has_docs(docs):
            texts = manpages.read_docs(docs)
            return {page: manpages.render(page, texts) for page in manpages.PAGES}
    raise RelayqError("the man pages need relayq's docs/" + " and docs/".join(manpages.DOCS)
                      + ": run from its source tree", EX_NOINPUT)


def _make_system_queue() -> str:
    """Users hand mail to the system queue from the first message on (SECURITY.md)."""
    from relayq.queue.spool import Spool
    from relayq.system import configfile, privilege

    cfg = configfile.load()  # the service user's queue when there is one (queue_owner)
    Spool(cfg.queue_dir).ensure(privilege.queue_owner(cfg.queue_dir, cfg.daemon_user))
    return f"{cfg.queue_dir}: the queue, with maildrop/ for users' mail"


def uninstall(root: str, bindir: str | None) -> list[str]:
    """Remove what install (or stage: bindir None) wrote and put the originals back."""
    done = []
    for rel in LINKS:
        path = os.path.join(root, rel)
        if os.path.lexists(path) and _ours(path, bindir, root):
            os.unlink(path)
            done.append(f"removed {path}")
            _undivert(path, root)
            if os.path.lexists(path):
                done.append(f"restored the original {path}")
    return done + _remove_pages(os.path.join(root, MANDIR if bindir is None else LOCAL_MANDIR))


def _packaged() -> bool:
    """Is this relayq the Debian package's (its modules in TARGET_LIBDIR)?"""
    import relayq

    return os.path.realpath(relayq.__file__).startswith(TARGET_LIBDIR + os.sep)


def run_install(root: str, force: bool, remove: bool, python: str | None = None, *,
                venv: bool = False, libdir: str | None = None) -> int:
    """`relayq install [--force] [--uninstall] [--root DIR [--venv]] [--python PATH]
    [--libdir LIBDIR]`: the host (root /), a staging root, or launchers under DIR
    that run this installation (--venv)."""
    if os.path.realpath(root) == "/":
        root = "/"
    if venv and root == "/":
        raise RelayqError("--venv: only with --root DIR (launchers under DIR that run this "
                          "installation)", EX_USAGE)
    staging = root != "/" and not venv
    if libdir is not None and not staging:
        raise RelayqError("--libdir: only for a staging root (--root DIR without --venv)",
                          EX_USAGE)
    if root == "/" and _packaged():
        if remove:
            raise RelayqError("installed by the Debian package relayq: remove it with "
                              "`apt remove relayq`", EX_USAGE)
        print("relayq: the Debian package relayq already installs sendmail, mailq, "
              "newaliases and relayq (dpkg -L relayq); nothing to do")
        return EX_OK
    bindir = os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv[0] else sys.executable))
    if not os.path.exists(os.path.join(bindir, "sendmail")):
        bindir = os.path.dirname(sys.executable)
    try:
        if remove:
            lines = uninstall(root, None if staging else bindir)
        elif staging:
            lines = stage(root, force, python, libdir)
        else:
            lines = install(root, bindir, force, python)
    except OSError as exc:
        raise RelayqError(f"{exc.filename}: {exc.strerror}", EX_CANTCREAT) from None
    for line in lines:
        print(line)
    return EX_OK
