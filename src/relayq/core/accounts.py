"""Accounts: which smarthost and credentials serve which envelope sender.

A host that sends as several identities (a shop's noreply@ through one
provider, cron's root@ through another) names each in an `[account.NAME]`
table of relayq.toml, as msmtp's accounts or Postfix's
sender_dependent_relayhost_maps do:

    [account.shop]
    senders = ["noreply@shop.example", "@shop.example"]
    smarthost = "smtp.gmail.com:587"
    user = "noreply@shop.example"
    oauth2_provider = "google"

The top level is the account "default"; it serves every sender no account
names. An account never inherits the top level's relay, port, TLS mode,
certificates, credentials, OAuth2 settings or limits (one account's password
must never reach another's relay); it does inherit what describes this host
and how patient to be: timeouts, certificate verification and its CA file,
the EHLO name, name servers and max_recipients. Pure: parse() checks the
tables; Config.accounts() builds them.
"""

from __future__ import annotations

from relayq.core.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from relayq.core.config import Config

DEFAULT = "default"

# keys an account table may set: its own (never the top level's), and a few the top
# level gives it unless it sets them; every other key describes the whole host
OWN = ("smarthost", "port", "tls", "client_cert", "client_key", "user", "password",
       "password_file", "password_command", "password_command_max_age", "auth_mechanism",
       "oauth2_provider", "oauth2_tenant", "oauth2_client_id", "oauth2_client_secret",
       "oauth2_client_secret_file", "oauth2_flow", "oauth2_scopes", "oauth2_token_url",
       "oauth2_device_url", "oauth2_authorize_url", "oauth2_token_file", "oauth2_ca_file",
       "oauth2_proxy", "oauth2_timeout", "oauth2_idle_refresh", "messages_per_minute",
       "recipients_per_day", "max_connections", "from_address", "rewrite_from")
INHERITED = ("tls_verify", "ca_file", "ehlo_name", "connect_timeout", "timeout",
             "session_deadline", "message_deadline", "min_data_rate", "dns_servers",
             "max_recipients")


def valid_name(name: str) -> bool:
    """Names go into file names (the token cache) and the envelope: keep them plain."""
    return 0 < len(name) <= 64 and name.isascii() and \
        all(c.isalnum() or c in "-_" for c in name) and name[0].isalnum()


def check_tables(value: object, path: str) -> dict[str, dict[str, Any]]:
    """The `account` key as parsed TOML -> {name: checked values}; ConfigError (78)."""
    from relayq.core.schema import SCHEMA, _nearest

    if not isinstance(value, dict):
        raise ConfigError(f"{path}: account: expected tables [account.NAME]")
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for name, table in value.items():
        where = f"{path}: account {name}"
        if not valid_name(name) or name == DEFAULT:
            raise ConfigError(f"{where}: a name is letters, digits, - and _ "
                              f"(at most 64, not {DEFAULT!r}, the top level's)")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table [account.{name}]")
        checked: dict[str, Any] = {}
        for key, v in table.items():
            if key == "senders":
                checked[key] = _senders(v, where, seen, name)
            elif key in OWN or key in INHERITED:
                checked[key] = SCHEMA[key][1](v, f"account {name}: {key}")
            elif key in SCHEMA:
                raise ConfigError(f"{where}: {key} is set for the whole host, not per account")
            else:
                raise ConfigError(f"{where}: unknown key {key!r}{_nearest(key)}")
        if "smarthost" not in checked:
            raise ConfigError(f"{where}: smarthost: an account names its own relay")
        if not checked.get("senders"):
            raise ConfigError(f"{where}: senders: list the addresses or @domains it serves")
        out[name] = checked
    return out


def _senders(v: object, where: str, seen: dict[str, str], name: str) -> list[str]:
    from relayq.core.address import parse_mailbox

    if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
        raise ConfigError(f"{where}: senders: expected a list of addresses and @domains")
    out = []
    for item in v:
        key = item.strip().lower()
        probe = "x" + key if key.startswith("@") else key
        if "@" not in key or parse_mailbox(probe) is None:
            raise ConfigError(f"{where}: senders: {item!r} is neither user@domain nor @domain")
        if key in seen:
            raise ConfigError(f"{where}: senders: {item!r} is already account {seen[key]}'s")
        seen[key] = name
        out.append(key)
    return out


def build(top: Config) -> dict[str, Config]:
    """{name: Config}: the top level as DEFAULT, then each table over the top level's
    values less the keys an account owns."""
    from relayq.core.schema import SCHEMA

    out = {DEFAULT: top}
    host = {k: getattr(top, k) for k in SCHEMA if k not in OWN}  # as set after parse
    for name, own in top.values.get("account", {}).items():
        out[name] = type(top)({**host, **own}, top.path, name)
    return out


def for_sender(cfg: Config, sender: str) -> str:
    """The account serving an envelope sender: its exact address, else its @domain,
    else DEFAULT. Compared without case: providers' mailboxes ignore it. An account
    with rewrite_from serves its own address too (the sender it writes), so the
    choice made before rewrite_from and one made again after it (requeue --reroute)
    agree."""
    from relayq.core.rewrite import own_address

    accounts = cfg.accounts()
    if len(accounts) == 1 or not sender:
        return DEFAULT
    addr = sender.lower()
    domain = "@" + addr.rpartition("@")[2] if "@" in addr else ""
    by_domain = DEFAULT
    for name, acc in accounts.items():
        if addr in acc.senders:
            return name
        if acc.rewrite_from and addr == own_address(acc.from_address, acc.user).lower():
            return name
        if domain and domain in acc.senders:
            by_domain = name
    return by_domain
