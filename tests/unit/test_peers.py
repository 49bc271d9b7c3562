"""The peers' parsers take whatever a file holds: they never raise, and what they
render is TOML (relayq import then checks it against the schema)."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.cli.peerimport import KINDS
from relayq.core.peers import generics_text, render
from relayq.core.rewrite import parse_generics

LINE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
WORDS = st.sampled_from(["smtp", "--pass=x", "account", "defaults", "host", "port", "tls",
                         "SMARTHOST", "PORT", "STARTTLS", "mailhub=", "relayhost =",
                         "myorigin = $mydomain", "|", ":", "=", "[", "]", "\t", " "])
TEXT = st.lists(st.one_of(LINE, st.lists(WORDS, max_size=6).map(" ".join)), max_size=12).map(
    "\n".join)


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=150, deadline=None)
@given(names=st.sampled_from(["remotes", "me", "ssmtp.conf", "revaliases", "dma.conf",
                              "auth.conf", "msmtprc", "main.cf", "sasl_passwd", "email-addresses",
                              "other"]),
       text=TEXT)
def test_any_text_converts_and_renders_as_toml(kind: str, names: str, text: str) -> None:
    result = KINDS[kind].convert([(names, text)])
    for secrets in (False, True):
        tomllib.loads(render([result], secrets=secrets, generics_at="/etc/relayq/generics"))
    parse_generics(generics_text([result]), "generics")  # what --write writes, relayq reads


def _values(kind: str, name: str, text: str) -> tuple[dict[str, object], list[str]]:
    r = KINDS[kind].convert([(name, text)])
    return {s.key: s.value for s in r.settings}, [n.why for n in r.notes]


@pytest.mark.parametrize(("value", "key", "expect"), [
    ("herb@ert.example", "all_mail_from", "herb@ert.example"),  # dma(8): every mail as herb@ert
    ("percolator.example", "masquerade_as", "percolator.example"),  # username@percolator
    ("@percolator.example", "masquerade_as", "percolator.example"),
    ("john@", None, None)])  # john@THIS-HOST: relayq needs the whole address
def test_dma_masquerade_forms(value: str, key: str | None, expect: str | None) -> None:
    values, notes = _values("dma", "dma.conf", f"SMARTHOST s.example\nMASQUERADE {value}\n")
    if key is None:
        assert "all_mail_from" not in values and "masquerade_as" not in values
        assert any("THIS-HOST" in n for n in notes)
    else:
        assert values[key] == expect


def test_msmtp_from_with_substitutions_is_a_note_not_a_fixed_sender() -> None:
    text = "account default\nhost s.example\nfrom %U@%H\n"
    values, notes = _values("msmtp", "msmtprc", text)
    assert "all_mail_from" not in values and any("%U" in n for n in notes)


def test_nullmailer_adminaddr_list_cannot_be_one_forward() -> None:
    values, notes = _values("nullmailer", "adminaddr", "a@example.org, b@example.org\n")
    assert "local_forward" not in values and any("one full address" in n for n in notes)


def test_ssmtp_empty_root_forwards_nothing_and_a_bad_revalias_is_named() -> None:
    r = KINDS["ssmtp"].convert([("ssmtp.conf", "mailhub=s.example\nroot=\n"),
                                ("revaliases", "root\nbob:bob@example.org\n")])
    assert r.get("local_forward") is None and r.get("generics_apply") == "both"
    assert [line for _, line in r.generics] == ["bob bob@example.org"]
    assert [n.origin.line for n in r.notes] == [1]


@pytest.mark.parametrize(("value", "path"), [
    ("hash:/etc/postfix/generic", "/etc/postfix/generic"),
    ("lmdb:/etc/postfix/generic, pcre:/etc/postfix/generic.pcre", "/etc/postfix/generic"),
    ("pcre:/etc/postfix/generic.pcre", None)])
def test_postfix_generic_maps_take_a_text_source_only(value: str, path: str | None) -> None:
    values, notes = _values("postfix", "main.cf", f"relayhost = s\nsmtp_generic_maps = {value}\n")
    assert values.get("generics_file") == path
    assert any("recipients" in n for n in notes) == (path is not None)


@pytest.mark.parametrize(("mc", "apply"), [
    ("FEATURE(`genericstable')dnl\n", "header"),
    ("FEATURE(`genericstable', `hash /etc/mail/gt.db')dnl\nFEATURE(`masquerade_envelope')dnl\n",
     "both")])
def test_sendmail_genericstable_is_its_text_source(mc: str, apply: str) -> None:
    values, _ = _values("sendmail", "submit.mc", "FEATURE(`msp', `s.example')dnl\n" + mc)
    assert str(values["generics_file"]).startswith("/etc/mail/g")
    assert not str(values["generics_file"]).endswith(".db")
    assert values["generics_apply"] == apply


def test_a_built_submit_cf_names_its_genericstable_and_class_g() -> None:
    cf = "DSmail.example.org\nKgenerics hash -o /etc/mail/genericstable.db\nCGexample.org\n"
    values, notes = _values("sendmail", "submit.cf", cf)
    assert values["generics_file"] == "/etc/mail/genericstable"
    assert values["generics_apply"] == "header"  # the .mc's masquerade_envelope is not seen
    assert any("local_domains" in n for n in notes)


def test_postfix_second_sender_map_is_one_note() -> None:
    text = ("relayhost = s\nsmtp_generic_maps = hash:/etc/postfix/generic\n"
            "sender_canonical_maps = hash:/etc/postfix/canonical\n")
    values, notes = _values("postfix", "main.cf", text)
    assert values["generics_file"] == "/etc/postfix/generic"
    assert len([n for n in notes if "generics_file is already" in n]) == 1
    assert not any("every sender as mail arrives" in n for n in notes)
