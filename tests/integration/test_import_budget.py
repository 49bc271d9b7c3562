"""The submission path stays lean: no delivery machinery before the commit point."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import Relayq

if TYPE_CHECKING:
    from pathlib import Path

HEAVY = ("asyncio", "ssl", "smtplib", "email", "aiosmtpd", "socket", "dns", "json",
         "argparse", "logging", "dataclasses", "subprocess")

PROBE = f"""
import sys
from relayq.cli import sendmail
code = sendmail.main(sys.argv[1:])
print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_queue_only_submission_imports_nothing_heavy(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    r = subprocess.run([sys.executable, "-I", "-c", PROBE, "-odq", "-t", "-i"],
                       input=b"To: a@example.org\nSubject: x\n\nbody\n", env=rq.env,
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split(" ", 1) == ["0", "[]\n"]
    assert len(rq.queued()) == 1


def test_mailq_listing_imports_nothing_heavy(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    rq.sendmail("a@example.org", input=b"\nx\n")
    probe = PROBE.replace("sendmail.main(sys.argv[1:])", "sendmail.main(['-bp'])")
    r = subprocess.run([sys.executable, "-I", "-c", probe], env=rq.env, capture_output=True,
                       timeout=30, check=False)
    assert r.stdout.decode().splitlines()[-1] == "0 []"


def test_config_cache_spares_the_toml_parser_and_follows_changes(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    probe = PROBE.replace(f"{HEAVY!r}", repr(("tomllib",)))

    def submit() -> str:
        r = subprocess.run([sys.executable, "-I", "-c", probe, "-odq", "a@example.org"],
                           input=b"\nx\n", env=rq.env, capture_output=True, timeout=30,
                           check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout.decode().strip()

    assert submit() == "0 ['tomllib']"  # first run parses and caches
    assert submit() == "0 []"  # then the checked settings come from the cache
    rq.configure(domain="other.example.org")  # a change is seen at once
    assert submit() == "0 ['tomllib']"
    [cache] = (tmp_path / "cache").iterdir()
    cache.chmod(0o666)  # a cache others could have written is not trusted
    assert submit() == "0 ['tomllib']"
    domains = [env.sender.split("@")[1] for env, _ in rq.queued()]
    assert domains == ["host.example.org"] * 2 + ["other.example.org"] * 2


def test_background_submission_leaves_delivery_imports_to_the_child(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)  # smarthost [127.0.0.1]:9: the child's attempt just fails
    probe = PROBE.replace(f"{HEAVY!r}", repr((*HEAVY, "relayq.delivery.runner",
                                              "relayq.delivery.smtp_transport")))
    r = subprocess.run([sys.executable, "-I", "-c", probe, "-odb", "a@example.org"],
                       input=b"\nx\n", env=rq.env, capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split(" ", 1) == ["0", "[]\n"]


def test_a_config_holding_a_password_is_never_cached(tmp_path: Path) -> None:
    rq = Relayq(tmp_path, user="alerts", password="s3cret-in-the-file")
    for _ in range(2):
        assert rq.sendmail("-odq", "a@example.org", input=b"\nx\n").returncode == 0
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(
        b"s3cret" in f.read_bytes() for f in cache.iterdir())
    assert not cache.exists() or list(cache.iterdir()) == []
