"""The listener names the local user who connected (issue 12 defect 15).

Old main recorded every loopback client as `smtp` with the daemon's uid and
never warned about the sender it chose. The kernel's socket table
(/proc/net/tcp, tcp6) names the owner of the client's socket, as identd
answers: that user's MAIL FROM is then treated as that user's `sendmail -f`
(the same X-Authentication-Warning rule), and the envelope, the log and the
Received field name the user. Real users, a real daemon, real SMTP clients.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from email import message_from_bytes
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.helpers.users import ensure_users
from tests.integration.test_daemon import DaemonProcess, free_port, wait_for

from relayq.system import hostname

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

ALICE = "rqtest-alice"


def _fqdn() -> str:
    name = hostname.fqdn()
    return name if "." in name else "host.example.org"


# -- the pure part: the table ----------------------------------------------------------


def test_the_table_row_of_the_client_socket_gives_its_uid() -> None:
    from relayq.server.sockets import _proc_hex, find_socket_uid

    client, server = _proc_hex("127.0.0.1", 40000), _proc_hex("127.0.0.1", 2525)
    table = (
        b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
        b"   uid  timeout inode\n"
        # the server's own accepted socket (the reverse direction): the daemon's uid
        + f"   0: {server} {client} 01 00000000:00000000 00:00000000 00000000     0        0 "
          "111 1 0000000000000000 20 4 30 10 -1\n".encode()
        # an earlier connection on the same ports, in TIME_WAIT: no inode, "uid 0"
        + f"   1: {client} {server} 06 00000000:00000000 03:00000DA7 00000000     0        0 "
          "0 3 0000000000000000\n".encode()
        + f"   2: {client} {server} 01 00000000:00000000 00:00000000 00000000  1001        0 "
          "222 1 0000000000000000 20 4 30 10 -1\n".encode())
    assert client == ("0100007F" if socket.htonl(1) != 1 else "7F000001") + ":9C40"
    assert find_socket_uid(table, client, server) == 1001
    assert find_socket_uid(table, server, client) == 0
    assert find_socket_uid(table.replace(b"  1001 ", b"     7 ").replace(b" 222 ", b" 0 "),
                           client, server) is None  # only rows without an owner
    assert find_socket_uid(b"", client, server) is None


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_peer_uid_of_a_real_loopback_connection(ip: str) -> None:
    from relayq.server.sockets import peer_uid

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as lsock:
        lsock.bind((ip, 0))
        lsock.listen(1)
        with socket.create_connection(lsock.getsockname()[:2], timeout=10) as c:
            s, peer = lsock.accept()
            with s:
                assert peer_uid(peer[:2], s.getsockname()[:2]) == os.getuid()
                # the /proc/net/tcp{,6} way (where sock_diag is not available)
                assert peer_uid(peer[:2], s.getsockname()[:2], netlink=False) == os.getuid()
                assert peer_uid(peer[:2], s.getsockname()[:2], proc="/nonexistent",
                                netlink=False) is None
                assert peer_uid((peer[0], 1), s.getsockname()[:2]) is None  # no such socket
            assert c  # the client socket exists while we look


# -- a real user, a real daemon -----------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Relayq, int, int]]:
    if os.geteuid() != 0:
        pytest.skip("creates users: needs root")
    ensure_users()
    os.chmod(tmp_path, 0o755)
    port4, port6 = free_port(), free_port()
    rq = Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                listen=[f"127.0.0.1:{port4}", f"[::1]:{port6}"], delivery_mode="deferred")
    d = DaemonProcess(rq, "--listen").wait_ready()
    yield rq, port4, port6
    d.stop()


CLIENT = """
import smtplib, sys
host, port, sender, subject = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with smtplib.SMTP(host, port, local_hostname="client.example.org", timeout=30) as c:
    c.sendmail(sender, ["carol@example.org"], f"Subject: {subject}\\r\\n\\r\\nhi\\r\\n")
"""


def as_user(name: str, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    pw = pwd.getpwnam(name)
    return subprocess.run(argv, user=pw.pw_uid, group=pw.pw_gid, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir},
                          capture_output=True, timeout=60, check=False)


def by_subject(rq: Relayq, n: int) -> dict[str, tuple[object, bytes]]:
    wait_for(lambda: len(rq.spool.ids()) == n, what=f"{n} queued messages")
    out = {}
    for env, data in rq.queued():
        out[str(message_from_bytes(data)["Subject"])] = (env, data)
    return out


def test_a_local_users_smtp_sender_is_that_users_f(daemon: tuple[Relayq, int, int]) -> None:
    """Old main: user `smtp`, the daemon's uid, no warning, Received without the user."""
    rq, port4, port6 = daemon
    uid = pwd.getpwnam(ALICE).pw_uid
    for host, port, sender, subject in (
            ("127.0.0.1", port4, "boss@example.org", "spoof4"),
            ("::1", port6, "ceo@example.org", "spoof6"),
            ("127.0.0.1", port4, f"{ALICE}@host.example.org", "own")):
        r = as_user(ALICE, ["/usr/bin/python3", "-c", CLIENT, host, str(port), sender, subject])
        assert r.returncode == 0, r.stderr
    got = by_subject(rq, 3)
    for subject, sender, ip in (("spoof4", "boss@example.org", "127.0.0.1"),
                                ("spoof6", "ceo@example.org", "::1")):
        env, data = got[subject]
        assert (env.user, env.uid) == (ALICE, uid)  # type: ignore[attr-defined]
        msg = message_from_bytes(data)
        assert msg["X-Authentication-Warning"] == (
            f"{_fqdn()}: {ALICE} set sender to {sender} using SMTP")
        assert msg["Received"].startswith(
            f"from client.example.org ({ALICE}@localhost [{ip}])")
        assert f"set sender to {sender} using SMTP (uid {uid})" in rq.log()
    env, data = got["own"]
    assert (env.user, env.uid) == (ALICE, uid)  # type: ignore[attr-defined]
    assert message_from_bytes(data)["X-Authentication-Warning"] is None
    assert f"relay={ALICE}@localhost" in rq.log()


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks is not installed")
def test_swaks_from_a_user_and_root_is_trusted(daemon: tuple[Relayq, int, int]) -> None:
    rq, port4, _ = daemon
    r = as_user(ALICE, ["swaks", "--server", f"127.0.0.1:{port4}", "--from", "x@example.org",
                        "--to", "carol@example.org", "--header", "Subject: swaks",
                        "--helo", "client.example.org"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["/usr/bin/python3", "-c", CLIENT, "127.0.0.1", str(port4),
                        "x@example.org", "root"], capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    got = by_subject(rq, 2)
    env, data = got["swaks"]
    assert env.user == ALICE  # type: ignore[attr-defined]
    assert message_from_bytes(data)["X-Authentication-Warning"] == (
        f"{_fqdn()}: {ALICE} set sender to x@example.org using SMTP")
    env, data = got["root"]
    assert (env.user, env.uid) == ("root", 0)  # type: ignore[attr-defined]
    assert message_from_bytes(data)["X-Authentication-Warning"] is None
