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


def test_check_names_each_rule_by_its_smtp_keyword() -> None:
    assert dsnparams.check("NOTIFY", "delay") == "DELAY"
    assert dsnparams.check("RET", "full") == "FULL"
    assert dsnparams.check("ENVID", "a+2b") == "a+2B"
    assert dsnparams.check("BODY", "7bit") == "7BIT"
    assert dsnparams.check("ORCPT", "rfc822;j\u00f6rg@x", utf8=True) == "rfc822;j+C3+B6rg@x"
    with pytest.raises(dsnparams.BadParam):
        dsnparams.check("ORCPT", "rfc822;j\u00f6rg@x")  # not xtext without SMTPUTF8


def test_given_checks_what_a_command_carried_and_refuses_an_empty_one() -> None:
    assert dsnparams.given({"RET": "hdrs"}, ("RET", "ENVID")) == {"RET": "HDRS", "ENVID": ""}
    with pytest.raises(dsnparams.BadParam):
        dsnparams.given({"NOTIFY": ""}, ("NOTIFY", "ORCPT"))  # `NOTIFY=` is no value


def test_envelope_checks_the_request_set_and_leaves_the_absent_empty() -> None:
    assert dsnparams.envelope("", "", "", "") == ("", "", "", "")
    assert dsnparams.envelope("never", "hdrs", "q+2b", "8bitmime") == (
        "NEVER", "HDRS", "q+2B", "8BITMIME")
    with pytest.raises(dsnparams.BadParam):
        dsnparams.envelope("", "", "a=b", "")


def test_recorded_envid_tolerates_an_older_relayqs_printable_envid_only() -> None:
    assert dsnparams.recorded_envid("ok+2b") == ("ok+2B", "")
    value, note = dsnparams.recorded_envid("a=b")
    assert value == "a+3Db" and "sent xtext-encoded as a+3Db" in note
    assert dsnparams.recorded_envid("=" * 40)[0] == ""  # too long encoded: left out
    assert "left out" in dsnparams.recorded_envid("=" * 40)[1]
    for damaged in ("has space", "\u00e9t\u00e9", "tab\there", ""):
        with pytest.raises(dsnparams.BadParam):
            dsnparams.recorded_envid(damaged)


# a bad value of each parameter, as SMTP writes it (keyword=value) and the sendmail flag
BAD = [("NOTIFY", "NEVER,DELAY", "-N"), ("NOTIFY", "ALWAYS", "-N"), ("RET", "NONE", "-R"),
       ("BODY", "BINARYMIME", "-B"), ("ENVID", "a+zz", "-V"), ("ENVID", "x" * 101, "-V"),
       ("ENVID", "has space", "-V"), ("ENVID", "\u00e9t\u00e9", "-V")]


@pytest.mark.parametrize(("name", "value", "flag"), BAD)
def test_every_way_in_refuses_the_same_value(name: str, value: str, flag: str) -> None:
    """sendmail's flags, a Request at enqueue(), a maildrop file and the SMTP client
    apply the one rule (the listener's 501 is in tests/integration/test_dsn_params.py).
    The one tolerance: a printable-ASCII ENVID read back from a record relayq wrote
    (maildrop file, queue) goes out xtext-encoded, as recorded_envid says."""
    from relayq.cli import flags
    from relayq.core.errors import DataError
    from relayq.delivery import intake
    from relayq.queue import submit

    with pytest.raises(UsageError):
        flags.parse([flag, value, "bob@example.org"])
    req = submit.Request(user="alice", uid=1000, **{name.lower(): value})
    with pytest.raises(DataError):
        submit._check_dsn(req)
    drop = submit.Request(user="alice", uid=1000, **{name.lower(): value})
    legacy = name == "ENVID" and all(33 <= ord(c) <= 126 for c in value)
    if legacy:
        assert intake.check_dsn(drop) and dsnparams.is_xtext(drop.envid)
    else:
        with pytest.raises(intake.Malformed):
            intake.check_dsn(drop)
    built = {"NOTIFY": lambda: p.rcpt_params(DSN_CAPS, notify=value),
             "RET": lambda: p.mail_params(DSN_CAPS, ret=value),
             "ENVID": lambda: p.mail_params(DSN_CAPS, envid=value)}
    if name in built and not legacy:
        with pytest.raises(p.CommandError):
            built[name]()


def test_a_bad_orcpt_is_refused_by_enqueue_and_the_client() -> None:
    from relayq.core.errors import DataError
    from relayq.queue import submit

    req = submit.Request(user="alice", uid=1000, rcpt_params={"b@x": ("", "rfc822;a=b")})
    with pytest.raises(DataError):
        submit._check_dsn(req)
    with pytest.raises(p.CommandError):
        p.rcpt_params(DSN_CAPS, orcpt="rfc822;a=b")
