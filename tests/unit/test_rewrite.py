"""core/rewrite: local_forward, the generics map, all_mail_from (pure rules)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core import rewrite
from relayq.core.errors import ConfigError

LOCAL = frozenset({"host.example.org", "host", "localhost"})
locals_ = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)
domains = st.sampled_from(["", "host.example.org", "HOST.example.org.", "localhost",
                           "example.net", "other.example.org"])


def addr(local: str, domain: str) -> str:
    return f"{local}@{domain}" if domain else local


@given(locals_, domains)
def test_forward_only_local_and_idempotent(local: str, domain: str) -> None:
    a = addr(local, domain)
    out = rewrite.forward(a, "admin@example.org", LOCAL)
    is_local = not domain or domain.lower().rstrip(".") in LOCAL
    assert (out is not None) == is_local
    if out is not None:
        assert rewrite.valid_target(out)
        assert rewrite.forward(out, "admin@example.org", LOCAL) is None


def test_forward_system_accounts_only() -> None:
    uids = {"root": 0, "daemon": 1, "alice": 1000}.get
    assert rewrite.forward("root", "a@example.org", LOCAL, uids) == "a@example.org"
    assert rewrite.forward("daemon@localhost", "a@example.org", LOCAL, uids) == "a@example.org"
    assert rewrite.forward("alice@host", "a@example.org", LOCAL, uids) is None
    assert rewrite.forward("nosuch", "a@example.org", LOCAL, uids) is None
    assert rewrite.forward("Root@host", "root@host", LOCAL) is None  # never to itself


TABLE = ("# genericstable\nroot  alerts@example.org\n"
         "alice@host.example.org alice.smith@example.com\n@localhost  nobody@example.org\n\n")


def test_generics_parse_and_lookup() -> None:
    t = rewrite.parse_generics(TABLE, "g")
    assert rewrite.generic("root", t, LOCAL) == "alerts@example.org"
    assert rewrite.generic("ROOT@host", t, LOCAL) == "alerts@example.org"
    assert rewrite.generic("alice@host.example.org", t, LOCAL) == "alice.smith@example.com"
    assert rewrite.generic("alice@host", t, LOCAL) is None
    assert rewrite.generic("bob@localhost", t, LOCAL) == "nobody@example.org"
    assert rewrite.generic("root@example.net", t, LOCAL) is None  # not local: untouched
    assert rewrite.generic("", t, LOCAL) is None


def test_an_unqualified_sender_is_looked_up_as_qualified_first() -> None:
    """Postfix qualifies with $myorigin, Sendmail's MSP with $j, before the lookup:
    a table keyed root@example.org maps cron's bare `root`."""
    t = rewrite.parse_generics("root@host.example.org a@example.org\nroot b@example.org\n"
                               "@host.example.org c@example.org\n", "g")
    assert rewrite.generic("root", t, LOCAL, "host.example.org") == "a@example.org"
    assert rewrite.generic("bob", t, LOCAL, "host.example.org") == "c@example.org"
    assert rewrite.generic("root", t, LOCAL) == "b@example.org"  # no domain: the user key


@pytest.mark.parametrize(("text", "line"), [("root\n", 1), ("# x\nroot a b\n", 2),
                                             ("root notanaddress\n", 1), ("a@ b@example.org", 1)])
def test_generics_bad_line_names_file_and_line(text: str, line: int) -> None:
    with pytest.raises(ConfigError, match=f"^/etc/g:{line}: ") as exc:
        rewrite.parse_generics(text, "/etc/g")
    assert exc.value.code == 78


@given(st.dictionaries(locals_, st.sampled_from(["a@example.org", "b.c@example.com"]),
                       max_size=5), locals_, domains)
def test_generic_output_is_a_full_address_and_non_local_untouched(
        table: dict[str, str], local: str, domain: str) -> None:
    text = "".join(f"{k} {v}\n" for k, v in table.items())
    t = rewrite.parse_generics(text, "g")
    out = rewrite.generic(addr(local, domain), t, LOCAL)
    if domain in ("example.net", "other.example.org"):
        assert out is None
    if out is not None:
        assert rewrite.valid_target(out)
        assert rewrite.generic(out, t, LOCAL) is None  # a full remote address: fixed point


@given(st.sampled_from(["", "alice@host", "x@example.net"]))
def test_all_mail_from_keeps_null_sender(sender: str) -> None:
    out = rewrite.all_mail_from(sender, "alerts@example.org")
    assert out == ("alerts@example.org" if sender else "")
    assert rewrite.all_mail_from(out, "alerts@example.org") == out
    assert rewrite.all_mail_from(sender, "") == sender
