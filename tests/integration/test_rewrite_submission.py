"""local_forward, the generics map and all_mail_from, end to end to a real smarthost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.helpers.relayq_env import Relayq

from relayq.core.errors import EX_OK

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory


def test_cron_mail_to_root_reaches_the_forward_address(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    generics = tmp_path / "generics"
    generics.write_text("# local user -> address\nroot alerts@example.org\n")
    rq = Relayq(tmp_path, smarthost=sh.smarthost, local_forward="admin@example.org",
                generics_file=str(generics), all_mail_from="bounces@example.org")
    r = rq.sendmail("-i", "root", "x@example.net",
                    input=b"Subject: cron\n\nout\n")
    assert r.returncode == EX_OK, r.stderr
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert t.rcpt_tos == ["admin@example.org", "x@example.net"]
    assert t.mail_from == "bounces@example.org"
    assert "forwarded to <admin@example.org>" in rq.log()
