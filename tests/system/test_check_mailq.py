"""The monitoring plugins' own check_mailq (Debian's monitoring-plugins-standard)
on relayq's mailq: a queued backlog is reported at its thresholds. check_mailq
runs /usr/bin/mailq with its own PATH, so relayq's mailq is put there inside a
throwaway root (tests.helpers.debroot); the machine's own /usr/bin stays as it is."""

from __future__ import annotations

import re
import shutil
from typing import TYPE_CHECKING

import pytest
from tests.helpers.debroot import DebRoot, skip_unless_possible
from tests.helpers.relayq_env import BIN

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(600)
CHECK_MAILQ = "/usr/lib/nagios/plugins/check_mailq"
CONFIG = 'smarthost = "[127.0.0.1]:9"\ntls = "none"\nsyslog = false\n'


@pytest.mark.skipif(shutil.which(CHECK_MAILQ) is None,
                    reason="monitoring-plugins-standard is not installed (make test-deps)")
def test_check_mailq_reports_relayqs_backlog(tmp_path: Path) -> None:
    skip_unless_possible()
    with DebRoot(tmp_path / "root") as root:
        root.ok("rm -f /usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq /usr/bin/newaliases "
                "/usr/bin/relayq && rm -rf /var/spool/relayq && mkdir -p /etc/relayq")
        root.ok(["sh", "-c", 'printf "%s" "$1" > /etc/relayq/relayq.toml', "sh", CONFIG])
        root.ok([str(BIN / "relayq"), "install"])  # the host's way: /usr/bin/mailq is relayq's

        def check(warn: int, crit: int) -> tuple[int, str]:
            r = root.run([CHECK_MAILQ, "-w", str(warn), "-c", str(crit), "-M", "sendmail"])
            return r.returncode, r.stdout.strip()

        assert check(2, 5)[0] == 0
        for queued, code, word in ((3, 1, "WARNING"), (6, 2, "CRITICAL")):
            while len(re.findall(r"^\w{14}", root.ok(["mailq"]), re.M)) < queued:
                root.ok(["/usr/sbin/sendmail", "-odq", "u@example.org"],
                        input="Subject: backlog\n\nx\n")
            got, said = check(2, 5)
            assert (got, word in said) == (code, True), said
            assert f"unsent={queued};2;5;0" in said, said
