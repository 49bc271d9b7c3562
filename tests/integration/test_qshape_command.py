"""`relayq qshape` on a queue built by real submissions (sendmail -odq; issue 15 §3).
The messages are minutes old at most, so they all sit in the first bucket: the ages
themselves are relayq.core.qshape's unit tests, with a fixed clock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.helpers.relayq_env import Relayq, assert_one_line_error

from relayq.core.errors import EX_OK, EX_USAGE

if TYPE_CHECKING:
    from pathlib import Path

MSG = b"Subject: shape\n\nhello\n"


def table(rq: Relayq, *args: str) -> list[list[str]]:
    r = rq.run("relayq", "qshape", *args)
    assert (r.returncode, r.stderr) == (EX_OK, b""), r.stderr
    return [line.split() for line in r.stdout.decode().splitlines()]


def queue(rq: Relayq) -> None:
    for sender, rcpts in (("a@one.example", ["x@example.org", "y@example.org", "z@b.example.net"]),
                          ("b@one.example", ["w@example.org"]),
                          ("c@two.example", ["v@example.com"])):
        assert rq.sendmail("-odq", "-f", sender, *rcpts, input=MSG).returncode == EX_OK


def test_recipient_domains(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    queue(rq)
    rows = table(rq)
    assert rows[0] == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert rows[1] == ["TOTAL", "5", "5", *["0"] * 9]
    assert rows[2] == ["example.org", "3", "3", *["0"] * 9]
    assert sorted(r[0] for r in rows[3:]) == ["b.example.net", "example.com"]


def test_sender_domains_and_buckets(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    queue(rq)
    rows = table(rq, "-s", "-b", "3", "-t", "60")
    assert rows == [["T", "60", "120", "120+"], ["TOTAL", "3", "3", "0", "0"],
                    ["one.example", "2", "2", "0", "0"], ["two.example", "1", "1", "0", "0"]]
    assert table(rq, "-b", "3", "-t", "60", "-l")[0] == ["T", "60", "120", "120+"]
    assert table(rq, "-b", "4", "-t", "60", "-l")[0] == ["T", "60", "120", "180", "180+"]


def test_parent_domains(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    queue(rq)
    rows = table(rq, "-p", "-m", "1", "-b", "1")
    assert [".example.net", "1", "1"] in rows and ["TOTAL", "5", "5"] in rows


def test_queue_names_select(tmp_path: Path) -> None:
    """mailq --json-lines' queue names: a held message is in "hold" only."""
    rq = Relayq(tmp_path)
    queue(rq)
    held = rq.spool.ids()[0]  # the first: three recipients
    assert rq.run("relayq", "hold", held).returncode == EX_OK
    assert table(rq, "-b", "1", "hold")[1:] == [
        ["TOTAL", "3", "3"], ["example.org", "2", "2"], ["b.example.net", "1", "1"]]
    assert table(rq, "-b", "1", "incoming", "deferred")[1] == ["TOTAL", "2", "2"]


def test_empty_queue(tmp_path: Path) -> None:
    assert table(Relayq(tmp_path))[1] == ["TOTAL", *["0"] * 11]


def test_usage_errors_are_64_in_one_line(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    for args in (["-b", "0"], ["-t", "0"], ["-m", "0"], ["corrupt"]):  # argparse's own errors: §4
        r = rq.run("relayq", "qshape", *args)
        assert r.returncode == EX_USAGE, (args, r)
        assert_one_line_error(r)


def test_help_describes_it(tmp_path: Path) -> None:
    r = Relayq(tmp_path).run("relayq", "--help")
    assert b"qshape" in r.stdout
