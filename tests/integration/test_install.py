"""relayq install: links into a directory tree, refusal, --force keeps the original; a
staging root (packaging) that names only target paths and runs under Debian's python3."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.relayq_env import BIN, Relayq

from relayq.cli import manpages
from relayq.cli.install import _man_pages, install, uninstall
from relayq.core.errors import EX_CANTCREAT, EX_NOINPUT, RelayqError


def search_path(launcher: Path) -> list[str]:
    """The sys.path a launcher runs with: its own lines up to the first import of relayq,
    run by its interpreter."""
    lines = launcher.read_text().splitlines()
    python = lines[0].removeprefix("#!").split()[0]
    head = lines[1:next(i for i, line in enumerate(lines) if line.startswith("from relayq"))]
    r = subprocess.run([python, "-IS", "-c", "\n".join([*head, "print(*sys.path, sep='\\n')"])],
                       capture_output=True, text=True, timeout=60, check=True)
    return r.stdout.splitlines()


def plain_path(python: str) -> list[str]:
    """The standard library's places: sys.path of `python -I -S` with nothing added."""
    r = subprocess.run([python, "-IS", "-c", "import sys; print(*sys.path, sep='\\n')"],
                       capture_output=True, text=True, timeout=60, check=True)
    return r.stdout.splitlines()


def test_install_writes_launchers_and_links(tmp_path: Path) -> None:
    lines = install(str(tmp_path), str(BIN), force=False)
    assert len(lines) == 5 + len(manpages.PAGES)
    assert os.readlink(tmp_path / "usr/bin/relayq") == str(BIN / "relayq")
    for rel in ("usr/sbin/sendmail", "usr/lib/sendmail", "usr/bin/mailq", "usr/bin/newaliases"):
        head = (tmp_path / rel).read_text().splitlines()[0]
        assert head.endswith(" -IS") and head.startswith("#!/")
    # idempotent
    assert len(install(str(tmp_path), str(BIN), force=False)) == 5 + len(manpages.PAGES)


def test_host_install_writes_and_removes_its_man_pages_only(tmp_path: Path) -> None:
    install(str(tmp_path), str(BIN), force=False)
    man8 = tmp_path / "usr/local/share/man/man8"
    for page in manpages.PAGES:
        section = page.rsplit(".", 1)[1]
        text = (tmp_path / f"usr/local/share/man/man{section}/{page}").read_text()
        assert text.startswith(".TH ") and "relayq" in text.splitlines()[0]
    (man8 / "newaliases.8").write_text(".TH NEWALIASES 8 \"\" \"other MTA\"\n")  # not ours
    uninstall(str(tmp_path), str(BIN))
    assert not (man8 / "sendmail.8").exists()
    assert (man8 / "newaliases.8").read_text().startswith(".TH NEWALIASES 8")


def test_launcher_queues_mail_and_ignores_a_hostile_environment(tmp_path: Path) -> None:
    install(str(tmp_path / "root"), str(BIN), force=False)
    rq = Relayq(tmp_path)
    evil = tmp_path / "evil"
    (evil / "relayq").mkdir(parents=True)
    (evil / "relayq" / "__init__.py").write_text("raise SystemExit('hijacked')\n")
    env = dict(rq.env, PYTHONPATH=str(evil), PYTHONSTARTUP=str(evil / "x.py"))
    sendmail = str(tmp_path / "root/usr/sbin/sendmail")
    r = subprocess.run([sendmail, "-odq", "a@example.org"], input=b"Subject: x\n\nx\n",
                       env=env, capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert len(rq.queued()) == 1
    r = subprocess.run([str(tmp_path / "root/usr/bin/mailq")], env=env, capture_output=True,
                       timeout=30, check=False)
    assert b"Total requests: 1" in r.stdout


def test_a_host_launcher_puts_only_relayq_ahead_of_the_standard_library(
        tmp_path: Path) -> None:
    """The venv's site-packages come after the standard library: a `typing.py` or an
    `enum/` there must not replace the standard one under sendmail."""
    import sysconfig

    import relayq

    src = os.path.dirname(os.path.dirname(os.path.abspath(relayq.__file__)))
    for python in (None, "/usr/bin/python3"):
        if python and not Path(python).exists():
            continue
        root = tmp_path / str(python is None)
        install(str(root), str(BIN), force=False, python=python)
        for rel in ("usr/sbin/sendmail", "usr/bin/mailq", "usr/bin/newaliases"):
            launcher = root / rel
            interp = launcher.read_text().split()[0].removeprefix("#!")
            assert search_path(launcher) == [src, *plain_path(interp),
                                             sysconfig.get_path("purelib")]


def test_a_host_install_leaves_a_packages_commands_alone_unless_forced(tmp_path: Path) -> None:
    """The Debian package's launchers carry relayq's mark too, but they are dpkg's: a
    pip install neither overwrites nor (--uninstall) deletes them; with --force they
    are kept aside as another MTA's, and --uninstall puts them back."""
    stage(tmp_path)  # the package's five commands, as dpkg unpacked them
    before = {rel: (tmp_path / rel).read_bytes() for rel in COMMANDS}
    assert all(b"for a package: relayq in /usr/share/relayq" in b for b in before.values())
    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(tmp_path), "--venv"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == EX_CANTCREAT, r.stdout + r.stderr
    assert len(r.stderr.splitlines()) == 1 and "package relayq" in r.stderr, r.stderr
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    assert {rel: (tmp_path / rel).read_bytes() for rel in COMMANDS} == before
    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(tmp_path), "--venv",
                        "--uninstall"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert {rel: (tmp_path / rel).read_bytes() for rel in COMMANDS} == before
    install(str(tmp_path), str(BIN), force=True)
    for rel in COMMANDS:
        assert (tmp_path / f"{rel}.relayq-saved").read_bytes() == before[rel]
        assert b"for a package" not in (tmp_path / rel).read_bytes()
    uninstall(str(tmp_path), str(BIN))
    assert {rel: (tmp_path / rel).read_bytes() for rel in COMMANDS} == before
    assert list(tmp_path.rglob("*.relayq-saved")) == []


def test_a_packages_file_is_named_through_its_diversion() -> None:
    """dpkg-query -S lists diversions before the owner: the owner is what is named.
    (A local diversion, as --force makes, means the file there is no package's.)"""
    from relayq.cli.install import _owner

    r = subprocess.run(["dpkg-divert", "--listpackage", "/bin/sh"], capture_output=True,
                       text=True, check=False) if shutil.which("dpkg-divert") else None
    if r is None or r.stdout.strip() != "dash":
        pytest.skip("needs dpkg and /bin/sh diverted by dash (Debian 12)")
    assert _owner("/bin/sh") == "package dash"
    assert _owner(str(BIN / "sendmail")) == "another program"


def test_refuses_another_mta_unless_forced(tmp_path: Path) -> None:
    other = tmp_path / "usr" / "sbin" / "sendmail"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\necho postfix\n")
    try:
        install(str(tmp_path), str(BIN), force=False)
    except RelayqError as exc:
        assert "--force" in exc.message and str(other) in exc.message
    else:
        raise AssertionError("installed over another MTA")
    assert not (tmp_path / "usr" / "bin" / "mailq").exists()  # nothing half-done
    install(str(tmp_path), str(BIN), force=True)
    assert b"written by relayq install" in other.read_bytes()
    assert (tmp_path / "usr/sbin/sendmail.relayq-saved").read_text().endswith("postfix\n")
    uninstall(str(tmp_path), str(BIN))
    assert other.read_text().endswith("postfix\n") and not other.is_symlink()
    assert not (tmp_path / "usr" / "bin" / "mailq").exists()


def test_command_line(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(tmp_path), "--venv"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert b"written by relayq install" in (tmp_path / "usr/sbin/sendmail").read_bytes()
    assert os.readlink(tmp_path / "usr/bin/relayq") == str(BIN / "relayq")


def test_python_choice_must_be_the_same_version(tmp_path: Path) -> None:
    import sys

    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(tmp_path), "--venv",
                        "--python", "/bin/true"], capture_output=True, text=True, check=False)
    assert r.returncode == 64 and "--python /bin/true" in r.stderr, r.stderr
    assert not (tmp_path / "usr").exists()
    install(str(tmp_path), str(BIN), force=False, python=sys.executable)
    head = (tmp_path / "usr/sbin/sendmail").read_text().splitlines()[0]
    assert head == f"#!{sys.executable} -IS"


def test_launcher_exit_codes_and_messages_survive_the_fast_exit(tmp_path: Path) -> None:
    """The launchers leave with os._exit: the code and stderr line must still arrive."""
    install(str(tmp_path / "root"), str(BIN), force=False)
    rq = Relayq(tmp_path)
    sendmail = str(tmp_path / "root/usr/sbin/sendmail")
    r = subprocess.run([sendmail, "-odq"], input=b"Subject: x\n\nx\n", env=rq.env,
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 64 and r.stderr == b"sendmail: Recipient names must be specified\n"
    r = subprocess.run(f"{tmp_path}/root/usr/bin/mailq -v | head -c 1", shell=True, env=rq.env,
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0 and b"Traceback" not in r.stderr


# A staging root: `relayq install --root DIR` from a package build (debian/rules)

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("usr/sbin/sendmail", "usr/lib/sendmail", "usr/bin/mailq", "usr/bin/newaliases",
            "usr/bin/relayq")


def stage(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(root), *args],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return r


def test_a_staging_root_names_target_paths_only(tmp_path: Path) -> None:
    r = stage(tmp_path)
    written = [p for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink()]
    leaks = [str(p) for p in written for build in (str(REPO), sys.prefix, sys.base_prefix)
             if build.encode() in p.read_bytes() or build in os.path.realpath(p)]
    assert leaks == []
    for rel in COMMANDS:
        path = tmp_path / rel
        assert path.is_file() and not path.is_symlink() and os.access(path, os.X_OK)
        text = path.read_text()
        assert text.startswith("#!/usr/bin/python3 -IS\n")
        assert "/usr/local" not in text  # a package's commands never look there
        # relayq's modules ahead of the standard library, Debian's python3-* after it
        got = search_path(path)
        stdlib = plain_path("/usr/bin/python3")
        assert got[:len(stdlib) + 1] == ["/usr/share/relayq", *stdlib]
        assert "/usr/lib/python3/dist-packages" in got[len(stdlib) + 1:]
    assert "relayq.cli.main import main" in (tmp_path / "usr/bin/relayq").read_text()
    lib = tmp_path / "usr/share/relayq/relayq"
    assert (lib / "cli" / "sendmail.py").is_file()
    assert [p for p in lib.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"] == []
    pages = sorted(p.name for p in (tmp_path / "usr/share/man").rglob("*.[158]"))
    assert pages == sorted(manpages.PAGES)
    assert (tmp_path / "usr/share/man/man1/mailq.1").is_file()
    assert (tmp_path / "usr/share/man/man5/relayq.toml.5").is_file()
    # one line per action, each naming what it wrote
    out = r.stdout.splitlines()
    assert len(out) == len(COMMANDS) + 1 + len(manpages.PAGES), r.stdout
    assert all(line.startswith(str(tmp_path)) for line in out), r.stdout


def test_a_staging_root_keeps_the_modules_the_package_build_put_there(tmp_path: Path) -> None:
    built = tmp_path / "opt/relayq/lib/relayq"
    built.mkdir(parents=True)
    (built / "__init__.py").write_text("# pybuild's\n")
    r = stage(tmp_path, "--libdir", "/opt/relayq/lib", "--python", "/usr/bin/python3")
    assert (built / "__init__.py").read_text() == "# pybuild's\n"
    assert sorted(p.name for p in built.iterdir()) == ["__init__.py"]
    assert "copied" not in r.stdout and len(r.stdout.splitlines()) == 5 + len(manpages.PAGES)
    head = (tmp_path / "usr/sbin/sendmail").read_text()
    assert "sys.path[:0] = ['/opt/relayq/lib']\nsys.path += ['/usr/lib/python3/dist-pack" in head


def as_installed(tmp_path: Path, script: str, *layers: Path, input: bytes = b"",
                 cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """`script` in a private mount namespace where tmp_path/stage/usr (and `layers`,
    each a tree to lay over /usr) is laid over /usr: as with the package installed."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private mount namespace needs root and unshare")
    rq = Relayq(tmp_path)
    env = dict(rq.env, PATH="/usr/sbin:/usr/bin:/sbin:/bin", PYTHONPATH=str(REPO / "src"))
    lower = ":".join([str(tmp_path / "stage/usr"), *map(str, layers), "/usr"])
    return subprocess.run(["unshare", "-m", "sh", "-c",
                           f"mount -t overlay overlay -o lowerdir={lower} /usr && {script}"],
                          input=input, env=env, cwd=cwd, capture_output=True, timeout=120,
                          check=False)


def test_staged_commands_run_under_debians_python3(tmp_path: Path) -> None:
    """The staged tree laid over /usr in a private mount namespace: as the installed
    package, Debian's python3 importing relayq from /usr/share/relayq and its
    dependencies from python3-* packages."""
    stage(tmp_path / "stage")
    rq = Relayq(tmp_path)
    script = ("/usr/sbin/sendmail -odq a@example.org < /dev/stdin && "
              "/usr/lib/sendmail -odq -oi b@example.org < /dev/null && "
              "/usr/bin/mailq && /usr/bin/relayq version && /usr/bin/relayq check-config && "
              "/usr/bin/newaliases && /usr/bin/python3 -IS -c "
              "\"import sys; sys.path[:0] = ['/usr/share/relayq']; import relayq; "
              "print(relayq.__file__)\"")
    r = as_installed(tmp_path, script, input=b"Subject: x\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert len(rq.queued()) == 2
    out = r.stdout.decode()
    assert "Total requests: 2" in out and "relayq " in out
    assert "/usr/share/relayq/relayq/__init__.py" in out
    assert not Path("/usr/share/relayq").exists()  # only inside the namespace


def test_the_package_ignores_modules_in_usr_local(tmp_path: Path) -> None:
    """A package's commands never import from /usr/local: an `enum/`, a `typing.py` or an
    aiosmtpd a local pip put in /usr/local/lib/python3.X/dist-packages is not seen
    (the standard library's and python3-aiosmtpd are)."""
    stage(tmp_path / "stage")
    rq = Relayq(tmp_path)
    minor = plain_path("/usr/bin/python3")[1].rsplit("python", 1)[1]  # /usr/lib/python3.11
    local = tmp_path / f"local/usr/local/lib/python{minor}/dist-packages"
    trap = (f"open({str(tmp_path / 'shadowed')!r}, 'a').write(__name__ + '\\n')\n"
            "raise ImportError('shadowed ' + __name__)\n")
    for rel in ("enum/__init__.py", "typing.py", "aiosmtpd/__init__.py", "dns/__init__.py"):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(trap)
    session = b"EHLO php.example.org\nMAIL FROM:<a@example.org>\nRCPT TO:<b@example.org>\n" \
        b"DATA\nSubject: bs\n\nx\n.\nQUIT\n"
    script = (f"ls {local}/typing.py >/dev/null && /usr/sbin/sendmail -odq a@example.org "
              f"< /dev/null && /usr/sbin/sendmail -bs < /dev/stdin && /usr/bin/mailq && "
              "/usr/bin/relayq check-config")
    r = as_installed(tmp_path, script, tmp_path / "local/usr", input=session)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "shadowed").exists(), (tmp_path / "shadowed").read_text()
    assert b"221 2.0.0 Bye" in r.stdout and len(rq.queued()) == 2


def test_the_installed_package_can_stage_a_root(tmp_path: Path) -> None:
    """`relayq install --root DIR` run from the package: its man pages take the prose
    from the docs the package ships gzipped in /usr/share/doc/relayq."""
    stage(tmp_path / "stage")
    shipped = tmp_path / "stage/usr/share/doc/relayq"
    shipped.mkdir(parents=True)
    for name in manpages.DOCS:
        (shipped / f"{name}.gz").write_bytes(gzip.compress((REPO / "docs" / name).read_bytes()))
    elsewhere = tmp_path / "cwd"  # not a source tree: no docs/ here
    elsewhere.mkdir()
    r = as_installed(tmp_path, f"/usr/bin/relayq install --root {tmp_path}/again", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    for page in manpages.PAGES:
        rel = f"usr/share/man/man{page.rsplit('.', 1)[1]}/{page}"
        assert (tmp_path / "again" / rel).read_bytes() == (tmp_path / "stage" / rel).read_bytes()
    for rel in COMMANDS:
        assert (tmp_path / "again" / rel).read_bytes() == (tmp_path / "stage" / rel).read_bytes()


def test_man_pages_take_gzipped_docs(tmp_path: Path) -> None:
    for name in manpages.DOCS:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((REPO / "docs" / name).read_bytes()))
    assert _man_pages([tmp_path]) == _man_pages()
    (tmp_path / "configuration.md.gz").unlink()
    with pytest.raises(RelayqError) as caught:
        _man_pages([tmp_path])
    assert caught.value.code == EX_NOINPUT and "docs/configuration.md" in caught.value.message


def test_staged_man_pages_render_without_warnings(tmp_path: Path) -> None:
    if shutil.which("man") is None:
        pytest.fail("man is needed: make test-deps installs man-db")
    stage(tmp_path)
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="", MANPAGER="cat", PAGER="cat")
    for page in manpages.PAGES:
        path = tmp_path / "usr/share/man" / f"man{page.rsplit('.', 1)[1]}" / page
        man = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                             text=True, timeout=60, env=env, check=False)
        assert (man.returncode, man.stderr) == (0, ""), page
        assert man.stdout.startswith(page.rsplit(".", 1)[0].upper() + "(")
    relayq_8 = (tmp_path / "usr/share/man/man8/relayq.8").read_text()
    assert "\\fB\\-\\-libdir\\fR" in relayq_8 and "\\fB\\-\\-venv\\fR" in relayq_8


@pytest.mark.parametrize("args", [["--venv"], ["--libdir", "/usr/share/relayq"],
                                  ["--root", "x", "--venv", "--libdir", "/usr/share/relayq"],
                                  ["--root", "x", "--libdir", "share/relayq"]])
def test_flags_that_do_not_fit_the_root_are_refused(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path / a) if a == "x" else a for a in args]
    r = subprocess.run([str(BIN / "relayq"), "install", *args], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 64 and r.stderr.startswith("relayq: --"), r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_package_builds_call(tmp_path: Path) -> None:
    """debian/rules' call: Debian's python3 runs the modules pybuild put in the staging
    root, from the source tree (where docs/ is); they are left as they are."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3")
    lib = tmp_path / "debian/relayq/usr/share/relayq"
    shutil.copytree(REPO / "src/relayq", lib / "relayq",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(lib), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(["/usr/bin/python3", "-m", "relayq.cli.main", "install", "--root",
                        str(tmp_path / "debian/relayq"), "--python", "/usr/bin/python3",
                        "--libdir", "/usr/share/relayq"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "copied" not in r.stdout
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p for p in written if str(REPO).encode() in p.read_bytes()] == []
    assert [p for p in written if p.suffix == ".pyc"] == []
    assert (tmp_path / "debian/relayq/usr/share/man/man8/relayq.8").is_file()
