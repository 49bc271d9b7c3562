"""relayq.core.dsnparams: the one DSN parameter rule (issue 12 defect 14), and the places
that must agree with it: sendmail's flags, the maildrop taker, enqueue() and the
SMTP client's command builder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.cli import sendmail
from relayq.core import dsn, dsnparams
from relayq.core.errors import UsageError
from relayq.delivery import local_transport as local
from relayq.smtp import protocol as p

DSN_CAPS = p.Capabilities(esmtp=True, dsn=True)

# anything printable, any UTF-8, the characters xtext must escape
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
xtexts = st.lists(st.sampled_from([chr(c) for c in range(33, 127) if chr(c) not in "+="]
                                  + ["+2B", "+3D", "+20", "+c3", "+A9"]), min_size=1,
                  max_size=30).map("".join)
words = st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "success", " delay"]),
                 min_size=1, max_size=4).map(",".join)


@given(texts)
def test_xtext_round_trip(text: str) -> None:
    encoded = dsnparams.xtext_encode(text)
    assert dsnparams.is_xtext(encoded) or not encoded
    assert dsnparams.xtext_decode(encoded) == text


def test_xtext_is_decoded_one_way_everywhere() -> None:
    """dsn.py and transport/local.py decoded differently (UTF-8 octets vs one char each)."""
    value = "rfc822;" + dsnparams.xtext_encode("j\u00f6rg+x=y@example.org")
    assert value == "rfc822;j+C3+B6rg+2Bx+3Dy@example.org"
    assert dsn._original_recipient(value) == "rfc822;j\u00f6rg+x=y@example.org"
    assert dsnparams.xtext_decode("+c3+b6") == "\u00f6" == dsnparams.xtext_decode("+C3+B6")
    assert dsnparams.orcpt_address(value) == ("rfc822", "j\u00f6rg+x=y@example.org")
    assert dsnparams.orcpt_address("x-other; a+2Bb ") == ("x-other", "a+2Bb")  # kept as is
    assert dsnparams.orcpt_address("no-semicolon") is None
    assert local.orcpt_for("j\u00f6rg@example.org") == "rfc822;j+C3+B6rg@example.org"
    assert dsnparams.xtext_decode("a+zz+2") == "a+zz+2"  # kept as written, never an error


@pytest.mark.parametrize("bad", ["a=b", "has space", "tab\there", "\u00e9t\u00e9", "+", "+4",
                                 "+GG", "", "x" * 101])
def test_envid_refusals(bad: str) -> None:
    with pytest.raises(dsnparams.BadParam):
        dsnparams.envid(bad)


def test_canonical_forms() -> None:
    assert dsnparams.envid("Q1+2b") == "Q1+2B"
    assert dsnparams.envid("x" * 100) == "x" * 100
    assert dsnparams.notify("success, Failure,success") == "SUCCESS,FAILURE"
    assert dsnparams.notify("never") == "NEVER"
    assert dsnparams.ret("hdrs") == "HDRS" and dsnparams.body("8bitmime") == "8BITMIME"
    assert dsnparams.orcpt("rfc822;B+2bob@example.org") == "rfc822;B+2Bob@example.org"
    assert dsnparams.orcpt("rfc822;j\u00f6rg@example.org", utf8=True) == (
        "rfc822;j+C3+B6rg@example.org")
    for bad in ("NEVER,SUCCESS", "", "ALWAYS", "SUCCESS,"):
        with pytest.raises(dsnparams.BadParam):
            dsnparams.notify(bad)
    for bad in ("rfc822", ";a@b", "rfc822;", "rfc 822;a@b", "rfc822;a=b",
                "rfc822;j\u00f6rg@example.org", "rfc822;" + "a" * 494):
        with pytest.raises(dsnparams.BadParam):
            dsnparams.orcpt(bad)


@settings(max_examples=300)
@given(xtexts, xtexts, words, st.sampled_from(["FULL", "hdrs"]))
def test_what_the_validator_accepts_the_command_builder_sends(
        envid: str, orcpt: str, notify: str, ret: str) -> None:
    """The promise: accepted on the way in means sent as is on the way out."""
    try:
        e = dsnparams.envid(envid)
    except dsnparams.BadParam:
        e = ""
    o = dsnparams.orcpt("rfc822;" + orcpt) if len(orcpt) < 490 else ""
    n, r = dsnparams.notify(notify), dsnparams.ret(ret)
    mail = p.mail("a@example.org", p.mail_params(DSN_CAPS, ret=r, envid=e))
    rcpt = p.rcpt("b@example.org", p.rcpt_params(DSN_CAPS, notify=n, orcpt=o))
    assert mail.split()[2:] == [f"RET={r}".encode()] + ([f"ENVID={e}".encode()] if e else [])
    assert rcpt.split()[2:] == [f"NOTIFY={n}".encode()] + ([f"ORCPT={o}".encode()] if o else [])


@pytest.mark.parametrize("value", ["a=b", "with space", "+zz", "x" * 101])
def test_sendmail_V_refuses_what_a_relay_would_refuse(value: str) -> None:
    """Old main took `-V a=b` (exit 0), and the relay then answered 553 to every RCPT."""
    with pytest.raises(UsageError) as info:
        sendmail.parse(["-V", value, "bob@example.org"])
    assert info.value.code == 64 and "-V" in info.value.message


def test_sendmail_dsn_flags_are_canonical() -> None:
    args = sendmail.parse(["-V", "id+2b1", "-N", "delay, failure", "-R", "hdrs",
                           "-B", "8bitmime", "bob@example.org"])
    assert (args.envid, args.notify, args.ret, args.body) == (
        "id+2B1", "DELAY,FAILURE", "HDRS", "8BITMIME")
    for flag in ("-N", "-R", "-B"):
        with pytest.raises(UsageError):
            sendmail.parse([flag, "bogus", "bob@example.org"])
