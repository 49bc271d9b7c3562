"""cli/flags (argv -> Args), cli/submission (Args -> Request, the mode after the commit)
and the one Request constructor every way in uses."""

from __future__ import annotations

import pytest

from relayq.cli import flags, submission
from relayq.core import config
from relayq.core.errors import UsageError
from relayq.queue.submit import Request


def test_request_defaults_are_a_plain_submission_by_the_user() -> None:
    req = Request(user="alice", uid=1000)
    assert (req.sender, req.full_name, req.recipients, req.rcpt_params) == (None, "", [], {})
    assert (req.notify, req.ret, req.envid, req.body, req.hops) == ("", "", "", "", None)
    assert not (req.extract or req.ignore_dots or req.identified or req.bs)
    assert (req.received_from, req.drop) == ("", "")
    other = Request(user="bob", uid=1001)
    other.recipients.append("x")
    other.rcpt_params["x"] = ("NEVER", "")
    assert req.recipients == [] and req.rcpt_params == {}  # no shared default


def test_request_for_carries_every_flag_of_the_command_line() -> None:
    args = flags.parse(["-t", "-i", "-f", "bob@example.org", "-F", "Bob", "-N", "never",
                        "-R", "hdrs", "-V", "q1", "-B", "8bitmime", "-h", "3", "carol"])
    req = submission.request_for(args, "alice", 1000, "Alice Gecos")
    assert (req.user, req.uid, req.sender, req.full_name) == (
        "alice", 1000, "bob@example.org", "Bob")
    assert req.extract and req.ignore_dots and req.recipients == ["carol"]
    assert (req.notify, req.ret, req.envid, req.body, req.hops) == (
        "NEVER", "HDRS", "q1", "8BITMIME", 3)
    assert submission.request_for(flags.parse(["carol"]), "a", 1, "Gecos").full_name == "Gecos"
    assert submission.request_for(flags.parse(["-F", "", "c"]), "a", 1, "Gecos").full_name == ""
    assert submission.request_for(flags.parse(["c"]), "a", 1, "").sender is None


@pytest.mark.parametrize(("argv", "configured", "mode"), [
    ([], "background", "b"), (["-odq"], "background", "q"), (["-v"], "background", "i"),
    (["-v", "-odb"], "queue", "i"), (["-v"], "queue", "q"), (["-odd"], "interactive", "d"),
    ([], "deferred", "d"), (["-odi"], "queue", "i")])
def test_the_delivery_mode_after_the_commit(argv: list[str], configured: str,
                                            mode: str) -> None:
    cfg = config.parse(f'delivery_mode = "{configured}"')
    assert submission.delivery_mode(flags.parse([*argv, "bob"]), cfg) == mode


def test_a_cluster_may_take_the_next_argument() -> None:
    args = flags.Args()
    assert flags._cluster(args, "-tf", ["-tf", "a@example.org", "bob"], 1) == 2
    assert args.extract and args.sender == "a@example.org"
    assert flags._cluster(args, "-odq", ["-odq"], 1) == 1 and args.delivery == "q"
    with pytest.raises(UsageError, match="requires an argument"):
        flags._cluster(flags.Args(), "-f", ["-f"], 1)


def test_one_from_person_even_when_the_first_was_empty() -> None:
    assert flags.parse(["-f", "", "bob"]).sender == ""
    with pytest.raises(UsageError, match="More than one"):
        flags.parse(["-f", "", "-r", "a@example.org", "bob"])


def test_the_front_door_parses_with_flags() -> None:
    from relayq.cli import sendmail

    assert sendmail.parse is flags.parse and sendmail.Args is flags.Args
