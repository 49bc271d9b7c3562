"""sendmail's command line, parsed with getopt's rules (peers.md 1a, 6)."""

import pytest

from relayq.cli.flags import parse
from relayq.core.errors import EX_NOPERM, EX_USAGE, RelayqError


def test_cron_command_line() -> None:
    a = parse(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert a.full_name == "CronDaemon" and a.ignore_dots and a.body == "8BITMIME"
    assert a.error_mode == "m" and a.recipients == ["root"]


def test_seed_queue_run() -> None:
    a = parse(["-L", "sm-msp-queue", "-Ac", "-q"])
    assert a.queue_run and a.tag == "sm-msp-queue" and a.queue_group == "c"
    assert not a.queue_interval and not a.recipients


@pytest.mark.parametrize("argv", [["-fuser@example.org"], ["-f", "user@example.org"],
                                  ["-ruser@example.org"], ["-r", "user@example.org"]])
def test_sender_attached_or_separate(argv: list[str]) -> None:
    assert parse(argv).sender == "user@example.org"


def test_clustering() -> None:
    a = parse(["-tiv", "-odq", "-oi"])
    assert a.extract and a.ignore_dots and a.verbose and a.delivery == "q"
    assert parse(["-tfa@example.org"]).sender == "a@example.org"


@pytest.mark.parametrize(("flag", "mode"), [("-odb", "b"), ("-odi", "i"), ("-odq", "q"),
                                            ("-odd", "d"), ("-ODeliveryMode=deferred", "d"),
                                            ("-O DeliveryMode=b", "b")])
def test_delivery_modes(flag: str, mode: str) -> None:
    assert parse(flag.split()).delivery == mode


@pytest.mark.parametrize("mode", "pqmwe")
def test_error_modes(mode: str) -> None:
    assert parse([f"-oe{mode}"]).error_mode == mode
    assert parse([f"-e{mode}"]).error_mode == mode


def test_queue_selectors_and_interval() -> None:
    a = parse(["-qIabc", "-qR@example.org", "-q!Sroot"])
    assert a.queue_run and a.selectors == ["Iabc", "R@example.org", "!Sroot"]
    assert parse(["-q30m"]).queue_interval == "30m"
    assert parse(["-q1h30m"]).queue_interval == "1h30m"


def test_double_dash_ends_options() -> None:
    a = parse(["-i", "--", "-notanoption@example.org"])
    assert a.recipients == ["-notanoption@example.org"]


def test_options_after_recipients_are_still_options() -> None:
    a = parse(["user@example.org", "-oi"])
    assert a.recipients == ["user@example.org"] and a.ignore_dots


def test_dsn_flags() -> None:
    a = parse(["-N", "success,failure", "-R", "hdrs", "-V", "ENVID123"])
    assert (a.notify, a.ret, a.envid) == ("SUCCESS,FAILURE", "HDRS", "ENVID123")
    assert parse(["-Nnever"]).notify == "NEVER"


def test_harmless_flags_are_accepted() -> None:
    a = parse(["-G", "-U", "-m", "-n", "-c", "-s", "-h", "12", "-Mrfoo", "-pESMTP", "-d0",
               "-oL9", "-Om", "-OEightBitMode=pass8", "x@example.org"])
    assert a.hops == 12 and a.recipients == ["x@example.org"]
    assert "-Mrfoo" in a.ignored


@pytest.mark.parametrize(
    "argv",
    [["-X", "/var/www/shell.php"], ["-X/tmp/log"], ["-oQ/tmp/"], ["-O", "QueueDirectory=/tmp"],
     ["-OQueueDirectory=/tmp"], ["-oA/etc/aliases"], ["-D/tmp/debug"],
     # CVE-2016-10033: a sender that smuggles flags is split by the shell into these
     ["-f", '"attacker\\"', "-oQ/tmp/", "-X/var/www/cache/phpcode.php"]],
)
def test_dangerous_flags_refused(argv: list[str]) -> None:
    with pytest.raises(RelayqError) as info:
        parse(argv)
    assert info.value.code == EX_NOPERM


@pytest.mark.parametrize(
    "argv",
    [["-Z"], ["-f"], ["-bz"], ["-B", "9BIT"], ["-N", "sometimes"], ["-R", "all"], ["-h", "x"],
     ["-Ax"], ["-f", "a@x", "-f", "b@x"], ["-odz"], ["-oez"], ["-L", "bad tag"], ["-qZ"]],
)
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(RelayqError) as info:
        parse(argv)
    assert info.value.code == EX_USAGE


def test_modes() -> None:
    assert parse(["-bp"]).mode == "p"
    assert parse(["-bm", "a@example.org"]).mode == "m"
    assert parse(["-bi"]).mode == "i"
    assert parse(["-I"]).mode == "i"
    assert parse(["-bv", "a@example.org"]).mode == "v"
