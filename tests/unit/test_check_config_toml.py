"""check-config's printout over generated valid configurations: it is TOML, every key
shows the value relayq uses, and fed back it gives the same printout (a round trip).

The values are generated from core.config.SCHEMA itself (a strategy per default's
type, kept when the key's own check accepts it), so a key added there is covered
without a change here.
"""

from __future__ import annotations

import tomllib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayq.cli.checkconfig import derived, render, toml_value
from relayq.core.config import DELIVERY_MODES, SCHEMA, TLS_MODES, Config, parse
from relayq.core.errors import ConfigError

NAMES = st.sampled_from(["example.org", "mail.example.org", "vm", "a-b.example.net"])
KNOWN: dict[str, st.SearchStrategy[Any]] = {
    "smarthost": st.lists(st.sampled_from(["mail.example.org", "relay.example.net:587",
                                           "[192.0.2.1]", "[::1]:2525", "[IPv6:2001:db8::1]",
                                           "[localhost]:26"]), min_size=1, max_size=3),
    "tls": st.sampled_from(TLS_MODES),
    "delivery_mode": st.sampled_from(sorted(DELIVERY_MODES) + sorted(DELIVERY_MODES.values())),
    "auth_mechanism": st.sampled_from(["", "plain", "LOGIN", "xoauth2"]),
    "mailbox_format": st.sampled_from(["mbox", "maildir"]),
    "domain": NAMES, "masquerade_as": NAMES, "ehlo_name": NAMES,
    "queue_dir": st.sampled_from(["/var/spool/relayq", "/tmp/q", "rel/q"]),
    "listen": st.lists(st.sampled_from(["127.0.0.1:25", "[::1]:2525", "127.0.0.1"])),
}
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


def by_type(default: object) -> st.SearchStrategy[Any]:
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(0, 2**40)
    if isinstance(default, float):
        return st.one_of(st.integers(0, 10**7), st.floats(0, 1e9),
                         st.sampled_from(["90", "30m", "1h30m", "5d"]))
    if isinstance(default, list):
        return st.lists(TEXT, max_size=3)
    return TEXT


def values() -> st.SearchStrategy[dict[str, Any]]:
    keys = {k: KNOWN.get(k, by_type(d)) for k, (d, _, _) in SCHEMA.items()}
    return st.dictionaries(st.sampled_from(sorted(keys)), st.none(), max_size=12).flatmap(
        lambda chosen: st.fixed_dictionaries({k: keys[k] for k in chosen}))


def config_text(raw: dict[str, Any]) -> str:
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in raw.items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(values())
def test_the_printout_round_trips(raw: dict[str, Any]) -> None:
    try:
        cfg = parse(config_text(raw), "gen.toml")
    except ConfigError:
        return  # not a valid configuration: the loader's tests cover those
    cfg.queue_dir = cfg.queue_dir or "/var/spool/relayq"  # as system.configfile does
    shown = render(cfg)
    printed = tomllib.loads(shown)
    assert list(printed) == list(SCHEMA)
    plain = cfg.effective()
    worked_out = derived(cfg)
    for key, value in printed.items():
        expect = worked_out[key][0] if key in worked_out else plain[key]
        assert value == expect, key
    again = parse(shown, "gen.toml")
    assert tomllib.loads(render(again)) == printed


ACCOUNTS = """smarthost = "relay.example.org"
user = "host"
password = "top-Secret1"
timeout = 30
[account.shop]
senders = ["noreply@shop.example", "@shop.example"]
smarthost = "smtp.gmail.com:587"
user = "noreply@shop.example"
password_command = "/usr/bin/pass shop-Secret2"
timeout = 90
[account.cron]
senders = ["root@host.example"]
smarthost = "[192.0.2.7]"
tls = "implicit"
"""


def test_accounts_print_as_tables_that_read_back_the_same() -> None:
    cfg = parse(ACCOUNTS, "gen.toml")
    cfg.queue_dir = "/var/spool/relayq"
    shown = render(cfg)
    assert "top-Secret1" not in shown and "shop-Secret2" not in shown
    printed = tomllib.loads(shown)
    assert list(printed) == [*SCHEMA, "account"]
    shop, cron = printed["account"]["shop"], printed["account"]["cron"]
    assert shop["senders"] == ["noreply@shop.example", "@shop.example"]
    assert shop["password_command"] == "/usr/bin/pass ********"
    assert shop["timeout"] == 90.0 and "timeout" not in cron  # inherited unless set
    assert cron["smarthost"] == ["[192.0.2.7]:465"] and cron["user"] == ""  # never the top's
    again = parse(shown, "gen.toml")
    assert tomllib.loads(render(again)) == printed
    def seen(c: Config) -> dict[str, tuple[object, ...]]:
        return {n: (list(map(repr, a.smarthosts())), a.tls, a.user, a.timeout, a.senders)
                for n, a in c.accounts().items()}

    assert seen(again) == seen(cfg)
