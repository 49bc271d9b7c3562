"""The network-up hooks in contrib/network/, run as each network system runs them.

Each test runs the real script (as NetworkManager-dispatcher, networkd-dispatcher,
ifupdown's run-parts or pppd's ip-up would: the same arguments, environment and a
minimal PATH) against a private relayq config and queue (tests.helpers.relayq_env)
and a recording smarthost on 127.0.0.1. The only thing the real systems do not
pass is RELAYQ_BIN, the documented test override of /usr/bin/relayq.

"Nothing happened" is checked without waiting: a flush the hook started is a
process carrying the test's own RELAYQ_CONFIG in its environment from the moment
the hook returns until it has delivered, so no such process, no smarthost
connection and the message still queued mean the hook started nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq
from tests.integration.test_daemon import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.testing.smarthost import SmarthostFactory

HOOKS = Path(__file__).resolve().parents[2] / "contrib" / "network"
COMMON = "# --- below this line every relayq network hook is the same (a test checks) ---"

# what each system passes when a link comes up: (arguments, environment)
UP: dict[str, tuple[list[str], dict[str, str]]] = {
    "networkmanager": (["wlp2s0", "up"], {"CONNECTION_ID": "home", "DEVICE_IFACE": "wlp2s0"}),
    "networkd-dispatcher": ([], {"IFACE": "enp0s3", "STATE": "routable",
                                 "OperationalState": "routable",
                                 "AdministrativeState": "configured"}),
    "ifupdown": ([], {"IFACE": "eth0", "LOGICAL": "eth0", "ADDRFAM": "inet", "METHOD": "dhcp",
                      "MODE": "start", "PHASE": "post-up", "VERBOSITY": "0"}),
    "ppp": (["ppp0", "/dev/ttyUSB0", "115200", "10.64.64.64", "10.112.112.112", ""],
            {"PPP_IFACE": "ppp0", "PPP_TTY": "/dev/ttyUSB0", "PPP_SPEED": "115200",
             "PPP_LOCAL": "10.64.64.64", "PPP_REMOTE": "10.112.112.112", "PPP_IPPARAM": ""}),
}

# events that must not flush: loopback, the ifup -a summary run, and actions that are not "up"
NOT_UP: list[tuple[str, list[str], dict[str, str]]] = [
    ("networkmanager", ["lo", "up"], {}),
    ("networkmanager", ["wlp2s0", "down"], {}),
    ("networkmanager", ["wlp2s0", "pre-up"], {}),
    ("networkmanager", ["wlp2s0", "dhcp4-change"], {}),
    ("networkmanager", ["", "connectivity-change"], {"CONNECTIVITY_STATE": "FULL"}),
    ("networkmanager", ["none", "hostname"], {}),
    ("networkmanager", ["tun0", "vpn-down"], {}),
    ("networkd-dispatcher", [], {"IFACE": "lo", "STATE": "routable"}),
    ("networkd-dispatcher", [], {"IFACE": "enp0s3", "STATE": "degraded"}),
    ("ifupdown", [], {"IFACE": "lo", "LOGICAL": "lo", "ADDRFAM": "inet", "METHOD": "loopback",
                      "MODE": "start", "PHASE": "post-up"}),
    ("ifupdown", [], {"IFACE": "--all", "LOGICAL": "auto", "ADDRFAM": "meta", "METHOD": "none",
                      "MODE": "start", "PHASE": "post-up"}),
    ("ifupdown", [], {"IFACE": "eth0", "MODE": "stop", "PHASE": "post-down"}),
    ("ifupdown", [], {"IFACE": "eth0", "MODE": "start", "PHASE": "pre-up"}),
]




def hook_env(rq: Relayq, extra: dict[str, str], relayq_bin: str | None = None) -> dict[str, str]:
    """The environment a dispatcher gives its scripts: almost nothing, no venv on PATH."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C",
           "RELAYQ_CONFIG": str(rq.config), "RELAYQ_CACHE_DIR": str(rq.root / "cache"),
           "RELAYQ_BIN": relayq_bin or str(BIN / "relayq")}
    env.update(extra)
    return env


def run_hook(name: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """Run the script itself (its #! line, its mode bits) with stdio on pipes: a flush
    that kept them open would make this wait until it ends."""
    return subprocess.run([str(HOOKS / name), *args], env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)


def flushes(rq: Relayq) -> list[int]:
    """Processes the hook started: they carry this test's RELAYQ_CONFIG."""
    marker = f"RELAYQ_CONFIG={rq.config}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(pid))
    return found


def queue_one(rq: Relayq) -> str:
    r = rq.sendmail("-t", input=b"To: user@example.org\nSubject: waiting\n\nqueued offline\n")
    assert r.returncode == 0, r.stderr
    ids = rq.spool.ids()
    assert len(ids) == 1
    return ids[0]


def assert_quiet(r: subprocess.CompletedProcess[bytes]) -> None:
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def assert_nothing_started(rq: Relayq, connections: Callable[[], int]) -> None:
    assert flushes(rq) == []
    assert connections() == 0
    assert rq.log() == "" or "flush" not in rq.log()


@pytest.fixture
def laptop(tmp_path: Path) -> Relayq:
    """Laptop mode: sendmail only queues; the network-up hook is what delivers."""
    return Relayq(tmp_path, delivery_mode="deferred")


def test_hooks_are_executable_posix_sh_sharing_one_body() -> None:
    bodies = set()
    for name in UP:
        path = HOOKS / name
        text = path.read_text()
        assert text.startswith("#!/bin/sh\n") and os.access(path, os.X_OK), name
        assert COMMON in text, name
        bodies.add(text.split(COMMON, 1)[1])
        r = subprocess.run(["dash", "-n", str(path)], capture_output=True, check=False)
        assert r.returncode == 0, r.stderr
    assert len(bodies) == 1, "the shared part of the hooks has drifted apart"


@pytest.mark.parametrize("name", list(UP))
def test_link_up_delivers_the_waiting_mail(name: str, laptop: Relayq,
                                           smarthost_factory: SmarthostFactory) -> None:
    host = smarthost_factory()
    laptop.configure(smarthost=host.smarthost)
    queue_one(laptop)
    args, extra = UP[name]
    assert_quiet(run_hook(name, args, hook_env(laptop, extra)))
    wait_for(lambda: len(host.transactions) == 1, 60, "the flush to deliver")
    wait_for(lambda: laptop.spool.ids() == [] and flushes(laptop) == [], 60, "the flush to end")
    assert host.transactions[0].rcpt_tos == ["user@example.org"]


def test_vpn_up_flushes_too(laptop: Relayq, smarthost_factory: SmarthostFactory) -> None:
    host = smarthost_factory()
    laptop.configure(smarthost=host.smarthost)
    queue_one(laptop)
    assert_quiet(run_hook("networkmanager", ["tun0", "vpn-up"], hook_env(laptop, {})))
    wait_for(lambda: len(host.transactions) == 1, 60, "the flush to deliver")
    wait_for(lambda: flushes(laptop) == [], 60, "the flush to end")


def _event_id(name: str, args: list[str], env: dict[str, str]) -> str:
    return "-".join([name, " ".join(args) or env.get("IFACE", ""),
                     env.get("STATE") or env.get("PHASE", "")])


@pytest.mark.parametrize(("name", "args", "extra"), NOT_UP,
                         ids=[_event_id(*event) for event in NOT_UP])
def test_other_events_do_nothing(name: str, args: list[str], extra: dict[str, str],
                                 laptop: Relayq, smarthost_factory: SmarthostFactory) -> None:
    host = smarthost_factory()
    laptop.configure(smarthost=host.smarthost)
    queue_one(laptop)
    assert_quiet(run_hook(name, args, hook_env(laptop, extra)))
    assert_nothing_started(laptop, lambda: host.connections)
    assert len(laptop.spool.ids()) == 1


@pytest.mark.parametrize("name", list(UP))
@pytest.mark.parametrize("queue", ["never made", "empty"])
def test_no_mail_waiting_starts_nothing(name: str, queue: str, laptop: Relayq,
                                        smarthost_factory: SmarthostFactory) -> None:
    host = smarthost_factory()
    laptop.configure(smarthost=host.smarthost)
    if queue == "empty":
        laptop.spool.ensure()
    args, extra = UP[name]
    assert_quiet(run_hook(name, args, hook_env(laptop, extra)))
    assert_nothing_started(laptop, lambda: host.connections)


@pytest.mark.parametrize("name", list(UP))
def test_relayq_missing_is_silent_success(name: str, laptop: Relayq, tmp_path: Path) -> None:
    queue_one(laptop)
    args, extra = UP[name]
    r = run_hook(name, args, hook_env(laptop, extra, str(tmp_path / "removed" / "relayq")))
    assert_quiet(r)
    assert flushes(laptop) == []
    assert len(laptop.spool.ids()) == 1


@pytest.mark.parametrize("name", list(UP))
def test_hook_returns_while_the_flush_still_waits(name: str, laptop: Relayq,
                                                  smarthost_factory: SmarthostFactory) -> None:
    """A smarthost that never greets: the flush hangs on its connection (timeouts of
    minutes), yet the hook has already returned, with its output pipes closed."""
    host = smarthost_factory(stall="greeting")
    laptop.configure(smarthost=host.smarthost, connect_timeout=300, timeout=300)
    qid = queue_one(laptop)
    args, extra = UP[name]
    assert_quiet(run_hook(name, args, hook_env(laptop, extra)))
    wait_for(lambda: host.connections >= 1, 60, "the flush to connect")
    pids = flushes(laptop)
    assert pids, "the flush should still be running"
    assert laptop.spool.is_locked(qid) and host.transactions == []
    for pid in pids:  # the processes this test's hook started, by id
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    wait_for(lambda: flushes(laptop) == [], 60, "the stopped flush to exit")
    assert laptop.spool.ids() == [qid]  # a stopped flush leaves the message queued


def test_two_links_up_at_once_deliver_once(laptop: Relayq,
                                           smarthost_factory: SmarthostFactory) -> None:
    """Wi-Fi and a VPN come up together: two flushes race; the message's lock lets
    one of them deliver it, once."""
    host = smarthost_factory()
    laptop.configure(smarthost=host.smarthost)
    queue_one(laptop)
    assert_quiet(run_hook("networkmanager", ["wlp2s0", "up"], hook_env(laptop, {})))
    assert_quiet(run_hook("networkmanager", ["tun0", "vpn-up"], hook_env(laptop, {})))
    wait_for(lambda: laptop.spool.ids() == [] and flushes(laptop) == [], 60, "both flushes to end")
    assert len(host.transactions) == 1


@pytest.mark.parametrize("line", ["queue_dir = '{q}'  # a TOML literal string",
                                  'queue_dir="{q}"'])
def test_queue_dir_spellings_are_read(line: str, laptop: Relayq,
                                      smarthost_factory: SmarthostFactory) -> None:
    """The hooks find the queue in the configuration however the key is spelt."""
    host = smarthost_factory()
    laptop.configure(smarthost=host.smarthost)
    text = laptop.config.read_text()
    queue_line = next(x for x in text.splitlines() if x.startswith("queue_dir"))
    laptop.write_config(text.replace(queue_line, line.format(q=laptop.queue_dir)))
    assert_quiet(run_hook("ifupdown", [], hook_env(laptop, UP["ifupdown"][1])))
    assert_nothing_started(laptop, lambda: host.connections)  # empty: nothing to do
    queue_one(laptop)
    assert_quiet(run_hook("ifupdown", [], hook_env(laptop, UP["ifupdown"][1])))
    wait_for(lambda: len(host.transactions) == 1, 60, "the flush to deliver")
    wait_for(lambda: flushes(laptop) == [], 60, "the flush to end")


def test_unreadable_queue_dir_value_lets_relayq_decide(laptop: Relayq,
                                                       smarthost_factory: SmarthostFactory) -> None:
    """A value the hook's sed cannot read (an escape) is not taken for "no mail": it
    flushes, and relayq, which reads TOML properly, finds the queue."""
    host = smarthost_factory()
    laptop.configure(smarthost=host.smarthost)
    text = laptop.config.read_text()
    queue_line = next(x for x in text.splitlines() if x.startswith("queue_dir"))
    escaped = str(laptop.queue_dir).replace("/", "\\u002F")
    laptop.write_config(text.replace(queue_line, f'queue_dir = "{escaped}"'))
    queue_one(laptop)
    assert_quiet(run_hook("ppp", UP["ppp"][0], hook_env(laptop, UP["ppp"][1])))
    wait_for(lambda: len(host.transactions) == 1, 60, "the flush to deliver")
    wait_for(lambda: flushes(laptop) == [], 60, "the flush to end")
