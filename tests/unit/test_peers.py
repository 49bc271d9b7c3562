"""The peers' parsers take whatever a file holds: they never raise, and what they
render is TOML (relayq import then checks it against the schema)."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.cli.peerimport import KINDS
from relayq.core.peers import render

LINE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
WORDS = st.sampled_from(["smtp", "--pass=x", "account", "defaults", "host", "port", "tls",
                         "SMARTHOST", "PORT", "STARTTLS", "mailhub=", "relayhost =",
                         "myorigin = $mydomain", "|", ":", "=", "[", "]", "\t", " "])
TEXT = st.lists(st.one_of(LINE, st.lists(WORDS, max_size=6).map(" ".join)), max_size=12).map(
    "\n".join)


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=150, deadline=None)
@given(names=st.sampled_from(["remotes", "me", "ssmtp.conf", "revaliases", "dma.conf",
                              "auth.conf", "msmtprc", "main.cf", "sasl_passwd", "other"]),
       text=TEXT)
def test_any_text_converts_and_renders_as_toml(kind: str, names: str, text: str) -> None:
    result = KINDS[kind].convert([(names, text)])
    for secrets in (False, True):
        tomllib.loads(render([result], secrets=secrets))
