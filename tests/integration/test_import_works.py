"""What `relayq import` makes is a working relayq.toml: for each golden input
(tests/data/import/KIND), the imported settings with only the connection pointed
at a loopback smarthost (and the queue and log in a temporary folder) deliver
cron's mail to root the way the peer would have: the envelope sender, the
recipient and the From: header the smarthost receives."""

from __future__ import annotations

import email.parser
import email.utils
import os
import subprocess
import tomllib
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq
from tests.integration.test_import import DATA, KINDS, inputs

from relayq.core.errors import EX_OK

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

# how relayq reaches the smarthost: the only imported settings the test replaces
CONNECTION = ("smarthost", "port", "tls", "tls_verify", "ca_file", "client_cert", "client_key",
              "user", "password", "password_file", "password_command", "auth_mechanism")
# where the queue and the log live, and no delivery until the test flushes: the test's
PLACES = ("queue_dir", "log_file", "syslog", "delivery_mode")
# the maps the golden configurations name (/etc/postfix/generic, /etc/mail/genericstable),
# as their administrator wrote them; put in the temporary folder in their stead
PEER_MAPS = {
    "postfix": "# /etc/postfix/generic (generic(5))\nroot@example.org alerts@example.org\n",
    "sendmail": "# /etc/mail/genericstable (cf/README)\nroot alerts@example.org\n",
}
CRON = b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts\n\nout\n"

# kind: (MAIL FROM, RCPT TO, From: header address) the smarthost is to see, and why
EXPECTED = {
    # allmailfrom replaces the sender; adminaddr takes mail for root at `me`
    "nullmailer": ("alerts@example.org", ["admin@example.org"], "root@host.example.org"),
    # root= forwards root (uid 0 < 1000); revaliases maps root in the envelope
    # (FromLineOverride=YES keeps the From: header, rewriteDomain masquerades it)
    "ssmtp": ("alerts@example.org", ["postmaster@example.org"], "root@example.org"),
    # smtp_generic_maps: root@$myorigin -> alerts@example.org, envelope and header;
    # Postfix would rewrite the recipient root@example.org too (the import's note says so)
    "postfix": ("alerts@example.org", ["root@example.org"], "alerts@example.org"),
    # genericstable with masquerade_envelope: header and envelope sender mapped
    "sendmail": ("alerts@example.org", ["root@host.example.org"], "alerts@example.org"),
    # the seed: MASQUERADE_AS (DMexample.org) on the sender, the recipient as it is
    "sendmail-seed": ("root@example.org", ["root@host.example.org"], "root@example.org"),
    # msmtp's fixed `from` is the envelope sender; the From: header is kept
    "msmtp": ("alerts@example.org", ["root@host.example.org"], "root@host.example.org"),
    # MASQUERADE alerts@example.org: every message's envelope sender
    "dma": ("alerts@example.org", ["root@host.example.org"], "root@host.example.org"),
    # /etc/email-addresses maps root, envelope and header (dc_readhost is for the others)
    "exim4": ("alerts@example.org", ["root@host.example.org"], "alerts@example.org"),
}


def imported(kind: str, folder: Path) -> dict[str, object]:
    """The real `relayq import --write` of the golden input, as relayq would read it."""
    target = folder / "relayq.toml"
    r = subprocess.run([str(BIN / "relayq"), "import", "--write", *inputs(kind)],
                       cwd=DATA / kind, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RELAYQ_CONFIG": str(target)})
    assert r.returncode == EX_OK, r.stderr
    return tomllib.loads(target.read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_the_imported_configuration_delivers_cron_mail_as_the_peer_did(
        kind: str, tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    assert set(EXPECTED) == set(KINDS)  # a new golden input needs its expectation here
    (tmp_path / "import").mkdir()
    settings = {k: v for k, v in imported(kind, tmp_path / "import").items()
                if k not in CONNECTION + PLACES}
    if kind in PEER_MAPS:
        peer_map = tmp_path / os.path.basename(str(settings["generics_file"]))
        peer_map.write_text(PEER_MAPS[kind])
        settings["generics_file"] = str(peer_map)
    sh = smarthost_factory()
    (tmp_path / "relayq").mkdir()
    rq = Relayq(tmp_path / "relayq", smarthost=sh.smarthost, **settings)
    r = rq.sendmail("-t", "-i", input=CRON)
    assert r.returncode == EX_OK, r.stderr
    flush = rq.run("relayq", "flush")
    assert flush.returncode == EX_OK, flush.stderr
    [t] = sh.transactions
    header = email.parser.BytesParser().parsebytes(t.content, headersonly=True)
    mail_from, rcpts, from_header = EXPECTED[kind]
    assert (t.mail_from, t.rcpt_tos, email.utils.parseaddr(header["From"])[1]) == (
        mail_from, rcpts, from_header), rq.log()
