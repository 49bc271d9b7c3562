"""The throwaway Debian root (tests.helpers.debroot) itself, with a tiny real package.

The package tests trust the root to keep the machine untouched, to keep its state
between commands, to resolve dependencies from apt's cache and to reach a smarthost
on the machine's loopback; this proves each with a .deb made here by dpkg-deb.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.debroot import DebRoot, changed_since, skip_unless_possible
from tests.integration.test_daemon import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.testing.smarthost import SmarthostFactory

PROBE = "relayq-debroot-probe"


@pytest.fixture
def root(tmp_path: Path) -> Iterator[DebRoot]:
    skip_unless_possible()
    with DebRoot(tmp_path / "root") as r:
        yield r


def tiny_deb(where: Path, depends: str) -> Path:
    """A real package: one file, a postinst that writes to /etc, a dependency."""
    tree = where / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/share" / PROBE).mkdir(parents=True)
    (tree / "usr/share" / PROBE / "hello").write_text("hello\n")
    (tree / "DEBIAN/control").write_text(
        f"Package: {PROBE}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        f"Depends: {depends}\nDescription: relayq's Debian-root probe\n")
    postinst = tree / "DEBIAN/postinst"
    postinst.write_text("#!/bin/sh\nset -e\necho installed > /etc/" + PROBE + "\n")
    postinst.chmod(0o755)
    deb = where / f"{PROBE}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)],
                   check=True, capture_output=True, timeout=60)
    return deb


def test_a_package_installs_in_the_root_only(root: DebRoot, tmp_path: Path) -> None:
    root.purge("python3-dnspython")  # installed here: the root must resolve it itself
    assert not root.installed("python3-dnspython")
    before = root.changes()
    deb = root.put(tiny_deb(tmp_path, "python3-dnspython"), f"/tmp/{PROBE}.deb")

    res = root.apt_install(deb)
    assert res.returncode == 0, res.stdout + res.stderr

    assert root.installed(PROBE) and root.installed("python3-dnspython")
    assert root.path("/etc/" + PROBE).read_text() == "installed\n"
    assert root.ok(["cat", f"/usr/share/{PROBE}/hello"]) == "hello\n"
    new = changed_since(before, root.changes())
    assert f"/usr/share/{PROBE}/hello" in new and f"/etc/{PROBE}" in new
    # the machine itself has none of it
    assert not Path(f"/etc/{PROBE}").exists() and not Path(f"/usr/share/{PROBE}").exists()
    host = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PROBE],
                          capture_output=True, text=True, check=False)
    assert not host.stdout.startswith("ii")


def test_the_root_keeps_state_reaches_loopback_and_ends_clean(
        root: DebRoot, smarthost_factory: SmarthostFactory) -> None:
    host = smarthost_factory()
    root.ok("useradd --create-home rqroot-user && echo kept > /etc/rqroot-state; sleep 600 &")
    # a second command sees the first one's writes; the background sleep blocked nothing
    assert root.ok(["cat", "/etc/rqroot-state"]) == "kept\n"
    assert root.ok(["id", "-un"], user="rqroot-user") == "rqroot-user\n"
    assert root.ok("echo $HOME", user="rqroot-user") == "/home/rqroot-user\n"
    assert not Path("/etc/rqroot-state").exists()
    # the smarthost in this process, from inside
    script = (f"import smtplib; s = smtplib.SMTP('127.0.0.1', {host.port}, timeout=30); "
              "s.sendmail('a@example.org', ['b@example.org'], 'Subject: x\\r\\n\\r\\nhi\\r\\n'); "
              "s.quit()")
    root.ok(["python3", "-c", script])
    assert [t.rcpt_tos for t in host.transactions] == [["b@example.org"]]
    # /tmp and /run inside are the root's own
    root.ok("touch /tmp/rqroot-tmp /run/rqroot-run")
    assert not Path("/tmp/rqroot-tmp").exists() and not Path("/run/rqroot-run").exists()
    assert "/tmp/rqroot-tmp" not in root.changes()

    inside = root.processes()
    assert any(Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00600\x00"
               for pid in inside), "the background sleep runs inside"
    root.close()
    assert str(root.mnt) not in Path("/proc/self/mountinfo").read_text()
    # the PID namespace's init went and took the sleep with it
    wait_for(lambda: not [pid for pid in inside if alive(pid)], 30, "the root's processes to go")


def alive(pid: int) -> bool:
    """Running, not a zombie (this machine's init may be slow to reap, or not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
