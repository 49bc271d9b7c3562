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

`--root DIR` is a staging root for a package (DESTDIR): every path written
inside the files is where it will be on the target, never one of this build.
All five commands are launchers for the target's interpreter (--python,
/usr/bin/python3), whose module path is --libdir (/usr/share/relayq, Debian's
place for a program's private modules) and that interpreter's own site
directories (python3-aiosmtpd, python3-dnspython); the man pages go in too.
`--root DIR --venv` writes launchers under DIR that run this installation
(tests and benchmarks), as the host install does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from relayq.core.errors import EX_CANTCREAT, EX_NOINPUT, EX_OK, EX_USAGE, RelayqError

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
SAVED = ".relayq-saved"
TARGET_PYTHON = "/usr/bin/python3"
TARGET_LIBDIR = "/usr/share/relayq"  # Debian Python policy: a program's private modules
MANDIR = "usr/share/man"
LOCAL_MANDIR = "usr/local/share/man"  # a host install: not a package's


def _owner(path: str) -> str:
    """The Debian package that ships `path`, or a plain description."""
    if shutil.which("dpkg-query"):
        r = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True,
                           check=False)
        if r.returncode == 0 and r.stdout:
            return "package " + r.stdout.split(":", 1)[0]
    return "another program"


def _ours(path: str, bindir: str | None) -> bool:
    """A link into this installation, or a launcher we wrote (any installation).
    A staging root (bindir None) links nothing, so no link there is ours."""
    try:
        if os.path.islink(path):
            return bindir is not None and \
                os.path.realpath(path).startswith(os.path.realpath(bindir) + os.sep)
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


def this_path() -> list[str]:
    """The module path of this installation: relayq's own directory and the one
    holding its dependencies (aiosmtpd, dnspython)."""
    import sysconfig

    import relayq

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(relayq.__file__)))]
    purelib = sysconfig.get_path("purelib")
    if purelib not in paths:
        paths.append(purelib)
    return paths


def site_dirs(python: str) -> list[str]:
    """Where the target interpreter's own packages live (Debian's python3-aiosmtpd and
    python3-dnspython: /usr/lib/python3/dist-packages), asked of it with site on:
    the launchers run with -S, so they must name them. -I keeps this environment's
    PYTHONPATH and user site out of the answer."""
    code = "import site; print(*site.getsitepackages(), sep='\\n')"
    r = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    if r.returncode != 0:
        raise RelayqError(f"--python {python}: cannot list its site directories: "
                          f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}", EX_USAGE)
    return [line for line in r.stdout.splitlines() if line]


def launcher(command: str, python: str | None = None, paths: list[str] | None = None) -> bytes:
    """The text of a -I -S launcher for one command: of this installation, or of a
    staged one when `paths` (its module path on the target) is given."""
    note = "(run it again after moving or upgrading relayq)" if paths is None else \
        f"for a package: relayq in {paths[0]}"
    if command in LAUNCHED:  # the fast exit: sendmail runs once per message
        ending = (f"from relayq.cli._exit import leave\nfrom {LAUNCHED[command]} import main\n"
                  "leave(main())\n")
    else:  # relayq as its console script: the daemon's threads and atexit end normally
        ending = f"from {STAGED[command]} import main\nsys.exit(main())\n"
    return (
        f"#!{python or interpreter(None)} -IS\n"  # one shebang argument: -I and -S
        f"{MARK.decode()} {note}\n"
        "import sys\n"
        f"sys.path[:0] = {this_path() if paths is None else paths!r}\n"
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
        _refuse(path, _ours(path, bindir), force)
        plan.append((path, source, command))
    done = []
    for path, source, command in plan:
        done += _make_room(path, _ours(path, bindir), root)
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
    paths = [libdir, *(d for d in site_dirs(python) if d != libdir)]
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


def _man_pages() -> dict[str, str]:
    """The man pages (cli/manpages renders them from the tables the commands run on),
    with the prose of the source tree's docs/: beside the running package (a
    checkout), installed with the wheel (share/relayq/docs), or in the current
    directory (a package build runs in the source tree)."""
    from pathlib import Path

    import relayq
    from relayq.cli import manpages

    here = Path(os.path.abspath(relayq.__file__)).parent.parent.parent / "docs"
    wheel = Path(sys.prefix) / "share" / "relayq" / "docs"  # pyproject's data-files
    for docs in (here, wheel, Path.cwd() / "docs"):
        if all((docs / name).is_file() for name in manpages.DOCS):
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
        if os.path.lexists(path) and _ours(path, bindir):
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
