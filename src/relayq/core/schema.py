"""relayq.toml's keys: every key, its default, its check and its help, in one table.

SCHEMA is the one place a key is defined: core.config builds the Config from
it, core.accounts checks an account's table with it, and the man page and
check-config print it. Pure and cheap to import (sendmail reads it per message).
"""

from __future__ import annotations

from relayq.core import policy
from relayq.core.errors import ConfigError

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from typing import Any

SYSTEM_CONFIG = "/etc/relayq/relayq.toml"
SYSTEM_QUEUE = "/var/spool/relayq"

TLS_MODES = ("required", "opportunistic", "none", "implicit")
DELIVERY_MODES = policy.MODE_NAMES
AUTH_MECHANISMS = ("", "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")
SECRET_KEYS = ("password", "oauth2_client_secret")
OAUTH2_PROVIDERS = ("", "microsoft", "google", "generic")
OAUTH2_FLOWS = ("refresh_token", "client_credentials")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object, key: str) -> float:
    """'90', 90, '30m', '1h30m', '5d' -> seconds (sendmail's interval syntax)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 30m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a duration like 30m, got {value!r}")
    total, num = 0.0, ""
    for ch in value.strip():
        if ch.isdigit():
            num += ch
        elif ch in _UNITS and num:
            total += int(num) * _UNITS[ch]
            num = ""
        else:
            raise ConfigError(f"{key}: expected a duration like 30m, got {value!r}")
    if num:
        total += int(num)  # trailing bare number: seconds... sendmail says minutes for -q
    return total


def _port(text: str, key: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{key}: bad port {text!r}")
    return int(text)


def _str(v: object, key: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {v!r}")
    if any(c in v for c in "\r\n\0"):
        raise ConfigError(f"{key}: must not contain CR, LF or NUL")
    return v


def _bool(v: object, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _int(v: object, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{key}: expected a non-negative integer, got {v!r}")
    return v


def _choice(choices: tuple[str, ...]) -> Any:
    def check(v: object, key: str) -> str:
        if not isinstance(v, str) or v not in choices:
            shown = " | ".join(repr(c) for c in choices if c)
            raise ConfigError(f"{key}: expected one of {shown}, got {v!r}")
        return v

    return check


def _mode(v: object, key: str) -> str:
    if isinstance(v, str):
        if v in DELIVERY_MODES:
            return DELIVERY_MODES[v]
        if v in DELIVERY_MODES.values():
            return v
    raise ConfigError(
        f"{key}: expected one of 'background' | 'interactive' | 'queue' | 'deferred', got {v!r}"
    )


def _auth(v: object, key: str) -> str:
    if isinstance(v, str) and v.upper() in AUTH_MECHANISMS:
        return v.upper()
    raise ConfigError(f"{key}: expected one of 'plain' | 'login' | 'xoauth2' | 'oauthbearer', "
                      f"got {v!r}")


def _hosts(v: object, key: str) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{key}: expected a host or a list of hosts, got {v!r}")
    return list(items)


def _strlist(v: object, key: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
        raise ConfigError(f"{key}: expected a list of strings, got {v!r}")
    return list(v)


def _duration(v: object, key: str) -> float:
    return parse_duration(v, key)


# key: (default, checker, help)
SCHEMA: dict[str, tuple[Any, Any, str]] = {
    "smarthost": (["[127.0.0.1]"], _hosts, "relay host(s), tried in order; [host] = no MX"),
    "port": (0, _int, "port for hosts given without one (0: 465 for implicit TLS, else 25)"),
    "tls": ("opportunistic", _choice(TLS_MODES),
            "required | opportunistic | none | implicit (required when a password is set)"),
    "tls_verify": (True, _bool, "verify the relay's certificate and name"),
    "ca_file": ("", _str, "CA bundle for the relay's certificate (default: system store)"),
    "client_cert": ("", _str, "client certificate (PEM)"),
    "client_key": ("", _str, "client key (PEM; default: in client_cert)"),
    "user": ("", _str, "AUTH user name"),
    "password": ("", _str, "AUTH password (prefer password_file or password_command)"),
    "password_file": ("", _str, "file holding the AUTH password"),
    "password_command": ("", _str, "command printing the password or OAuth2 token"),
    "password_command_max_age": (300.0, _duration, "run password_command again for a new "
                                 "connection when its output is older (0: every connection)"),
    "auth_mechanism": ("", _auth, "PLAIN | LOGIN | XOAUTH2 | OAUTHBEARER (default: the best "
                       "offered for the secret: XOAUTH2 or OAUTHBEARER for a token, else PLAIN "
                       "or LOGIN)"),
    # OAuth2 (delivery/oauth2): relayq gets and refreshes the access token itself
    "oauth2_provider": ("", _choice(OAUTH2_PROVIDERS), "microsoft | google | generic: get "
                        "the AUTH token by OAuth2 (empty: off)"),
    "oauth2_tenant": ("organizations", _str, "microsoft: the tenant (a domain or id; "
                      "client_credentials needs it)"),
    "oauth2_client_id": ("", _str, "the OAuth2 application (client) id"),
    "oauth2_client_secret": ("", _str, "the client secret (prefer oauth2_client_secret_file)"),
    "oauth2_client_secret_file": ("", _str, "file holding the client secret"),
    "oauth2_flow": ("refresh_token", _choice(OAUTH2_FLOWS), "refresh_token (a mailbox's "
                    "consent, relayq oauth2 login) | client_credentials (app-only)"),
    "oauth2_scopes": ([], _strlist, "scopes asked for (default: the provider's for SMTP)"),
    "oauth2_token_url": ("", _str, "token endpoint (default: the provider's)"),
    "oauth2_device_url": ("", _str, "device authorization endpoint (default: the provider's)"),
    "oauth2_authorize_url": ("", _str, "authorization endpoint for the browser login "
                             "(default: the provider's)"),
    "oauth2_token_file": ("", _str, "token cache (default: oauth2/ACCOUNT.json in queue_dir)"),
    "oauth2_ca_file": ("", _str, "CA bundle for the token endpoint (default: system store)"),
    "oauth2_proxy": ("", _str, "HTTP(S) proxy for the token endpoint (http://host:port)"),
    "oauth2_timeout": (30.0, _duration, "time allowed for one token request"),
    "oauth2_idle_refresh": (7 * 86400.0, _duration, "relayq daemon: refresh an unused "
                            "refresh token this often (Microsoft's die after 90 days idle)"),
    # what the provider enforces, per account (delivery/limits)
    "messages_per_minute": (0, _int, "send at most this many messages a minute (0: no limit; "
                            "Exchange Online: 30)"),
    "recipients_per_day": (0, _int, "send to at most this many recipients in 24 hours "
                           "(0: no limit; Exchange Online: 10000)"),
    "max_connections": (0, _int, "connections open at once to this account's smarthost "
                        "(0: concurrency)"),
    "from_address": ("", _str, "this account's own address (default: user, if an address)"),
    "rewrite_from": (False, _bool, "rewrite the header From and the envelope sender to "
                     "from_address, keeping the original in Reply-To"),
    "ehlo_name": ("", _str, "name sent in EHLO (default: domain)"),
    "connect_timeout": (30.0, _duration, "TCP and TLS connect timeout"),
    "timeout": (300.0, _duration, "timeout for each SMTP reply"),
    "session_deadline": (600.0, _duration, "connect, greeting, EHLO, STARTTLS and AUTH "
                         "together (0: no limit)"),
    "message_deadline": (600.0, _duration, "one message transaction, MAIL to the reply to "
                         "the final dot, plus size / min_data_rate (0: no limit)"),
    "min_data_rate": (2048, _int, "bytes per second the message deadline allows for the data"),
    "dns_servers": ([], _strlist, "name servers for MX lookups (default: resolv.conf)"),
    "domain": ("", _str, "this host's mail domain (default: /etc/mailname or the FQDN)"),
    "masquerade_as": ("", _str, "rewrite local senders' domain to this"),
    "delivery_mode": ("b", _mode, "background | interactive | queue | deferred"),
    "queue_dir": ("", _str, "queue directory"),
    "max_queue_age": (5 * 86400.0, _duration, "bounce what is still queued after this"),
    "delay_warning": (0.0, _duration, "warn the sender once after this long queued (0: never)"),
    "postmaster": ("postmaster", _str,
                   "told of mail that cannot be returned to its sender (a failed bounce, "
                   "failed mail from <>); unqualified: in `domain`"),
    "retry_min": (300.0, _duration, "first retry delay"),
    "retry_max": (4000.0, _duration, "longest retry delay"),
    "max_message_size": (0, _int, "refuse larger messages (0: no limit)"),
    "max_recipients": (100, _int, "recipients per SMTP transaction"),
    "log_file": ("", _str, "also append log lines to this file"),
    # who may do what (SECURITY.md)
    "trusted_users": (["root", "daemon", "relayq"], _strlist,
                      "may set the envelope sender (-f) without a warning header"),
    "auth_warnings": (True, _bool, "add X-Authentication-Warning when others use -f or -bs"),
    "admin_group": ("relayq", _str, "its members see every user's mail in mailq"),
    "syslog": (True, _bool, "log to syslog (facility mail)"),
    # daemon: periodic queue runs and the loopback SMTP listener
    "queue_interval": (1800.0, _duration, "relayq daemon: time between queue runs"),
    "concurrency": (4, _int, "parallel deliveries in a queue run of the daemon"),
    "pid_file": ("", _str, "pid file of a detached daemon "
                 "(default: in /run/relayq if it is ours, else /run/relayq.pid as root)"),
    "listen": (["127.0.0.1:25", "[::1]:25"], _strlist, "SMTP listener addresses"),
    "listen_nonloopback": (False, _bool, "allow binding a non-loopback listener address"),
    "daemon_user": ("", _str, "user the daemon runs as after binding port 25 as root"),
    "smtp_max_connections": (20, _int, "listener: concurrent SMTP connections"),
    "smtp_processes": (0, _int, "listener processes sharing the sockets (0: one per CPU, "
                                "at most 4)"),
    "smtp_max_recipients": (1000, _int, "listener: recipients per message"),
    "smtp_max_line": (1000, _int, "listener: longest command or data line, in bytes"),
    "smtp_timeout": (300.0, _duration, "listener: idle time allowed between commands"),
    "smtp_data_timeout": (600.0, _duration, "listener: time allowed to send the message data"),
    # monitoring (relayq metrics)
    "metrics_file": ("", _str, "relayq daemon: write Prometheus metrics here (a *.prom file "
                     "for node_exporter's textfile collector; empty: off)"),
    "metrics_interval": (60.0, _duration, "relayq daemon: how often metrics_file is written"),
    # local delivery
    "local_delivery": (False, _bool, "deliver local recipients here (false: relay them)"),
    "local_domains": ([], _strlist, "domains delivered locally (default: this host's names)"),
    "aliases_file": ("/etc/aliases", _str, "aliases for local recipients"),
    "mailbox_format": ("mbox", _choice(("mbox", "maildir")), "mbox | maildir"),
    "mail_spool": ("/var/mail", _str, "directory of mbox mailboxes"),
    "allow_file_targets": (False, _bool, "allow aliases that append to files"),
    "allow_pipe_targets": (False, _bool, "allow aliases that pipe to commands"),
    # address rewriting at submission (core/rewrite)
    "local_forward": ("", _str, "send mail for local recipients to this address when "
                      "local_delivery is off (nullmailer's adminaddr, ssmtp's root=)"),
    "local_forward_users": ("all", _choice(("all", "system")),
                            "all | system: forward every local recipient, or only system "
                            "accounts (uid < 1000, as ssmtp)"),
    "generics_file": ("", _str, "map of local senders to full addresses (genericstable)"),
    "generics_apply": ("both", _choice(("both", "envelope", "header")),
                       "both | envelope | header: where generics_file rewrites the sender"),
    "all_mail_from": ("", _str, "one envelope sender for every message (nullmailer's "
                      "allmailfrom; <> stays <>)"),
}


def _nearest(key: str) -> str:
    """' (did you mean 'smarthost'?)' for 'smarthots': a typo's fix in its error line."""
    import difflib

    close = difflib.get_close_matches(key.lower(), SCHEMA, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""
