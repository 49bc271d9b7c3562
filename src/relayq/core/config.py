"""relayq.toml: every key, its default and its check, in one table.

A wrong key or value raises ConfigError naming it (exit 78). The file is
optional: with none, every default applies. Pure: `parse()` turns text into a
Config; finding and reading the file (with the secret check and the cache) is
relayq.system.configfile's.
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
AUTH_MECHANISMS = ("", "PLAIN", "LOGIN", "XOAUTH2")
SECRET_KEYS = ("password",)

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


class Smarthost:
    """One relay: `host`, `host:port`, `[host]` (no MX lookup), `[::1]:2525`."""

    __slots__ = ("host", "mx", "port")

    def __init__(self, host: str, port: int, mx: bool) -> None:
        self.host = host
        self.port = port
        self.mx = mx

    def __repr__(self) -> str:
        name = self.host if self.mx else f"[{self.host}]"
        return f"{name}:{self.port}"

    @classmethod
    def parse(cls, spec: str, default_port: int, key: str = "smarthost") -> Smarthost:
        spec = spec.strip()
        port = default_port
        if not spec or any(c.isspace() or ord(c) < 32 for c in spec):
            raise ConfigError(f"{key}: bad host {spec!r}")
        if spec.startswith("["):
            end = spec.find("]")
            if end < 0:
                raise ConfigError(f"{key}: unbalanced [ in {spec!r}")
            host, rest, mx = spec[1:end], spec[end + 1 :], False
            if host.lower().startswith("ipv6:"):
                host = host[5:]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(f"{key}: bad host {spec!r}")
                port = _port(rest[1:], key)
        else:
            host, mx = spec, True
            if spec.count(":") == 1:
                host, p = spec.split(":")
                port = _port(p, key)
            elif ":" in spec:
                raise ConfigError(f"{key}: write IPv6 addresses in brackets: [{spec}]")
        if not host:
            raise ConfigError(f"{key}: empty host in {spec!r}")
        return cls(host, port, mx)


def parse_listen(spec: str) -> tuple[str, int]:
    """`127.0.0.1:25`, `[::1]:25`, `127.0.0.1` (port 25) -> (ip, port)."""
    import ipaddress

    text, port = spec.strip(), "25"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"listen: bad address {spec!r}")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"listen: {spec!r} is not an IP address (write [::1]:25)") from None
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"listen: bad port in {spec!r}")
    return str(ip), int(port)


def own_listener(host: str, port: int, listen: list[str]) -> str:
    """The listen address (as written) whose socket a connection to host:port
    reaches, or "": the one rule of a relay loop by address, asked by
    check-config, the daemon's start and the transport (with the address it
    connected to).

    `host` is an IP address or a name. Of names only localhost (and
    *.localhost, RFC 6761) is known without DNS; a wildcard listener (0.0.0.0,
    ::) is known to receive the loopback addresses and itself. The listener
    binds IPv6 with IPV6_V6ONLY: `::` never takes IPv4.
    """
    import ipaddress

    def plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        mapped = getattr(ip, "ipv4_mapped", None)
        return mapped if mapped is not None else ip

    name = host.strip().rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        targets = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    else:
        try:
            targets = [plain(ipaddress.ip_address(name.split("%", 1)[0]))]
        except ValueError:
            return ""
    for spec in listen:
        try:
            lhost, lport = parse_listen(spec)
        except ConfigError:
            continue  # the listener's check_config names it
        mine = plain(ipaddress.ip_address(lhost))
        if lport != port:
            continue
        for ip in targets:
            if ip.version == mine.version and (
                ip == mine or (mine.is_unspecified and (ip.is_loopback or ip.is_unspecified))
            ):
                return spec.strip()
    return ""


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
    raise ConfigError(f"{key}: expected one of 'plain' | 'login' | 'xoauth2', got {v!r}")


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
    "auth_mechanism": ("", _auth, "PLAIN | LOGIN | XOAUTH2 (default: best offered)"),
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


class Config:
    """The effective configuration; attributes are the keys of SCHEMA."""

    smarthost: list[str]
    port: int
    tls: str
    tls_verify: bool
    ca_file: str
    client_cert: str
    client_key: str
    user: str
    password: str
    password_file: str
    password_command: str
    password_command_max_age: float
    auth_mechanism: str
    ehlo_name: str
    connect_timeout: float
    timeout: float
    session_deadline: float
    message_deadline: float
    min_data_rate: int
    dns_servers: list[str]
    domain: str
    masquerade_as: str
    delivery_mode: str
    queue_dir: str
    max_queue_age: float
    delay_warning: float
    postmaster: str
    retry_min: float
    retry_max: float
    max_message_size: int
    max_recipients: int
    trusted_users: list[str]
    auth_warnings: bool
    admin_group: str
    log_file: str
    syslog: bool
    values: dict[str, Any]
    queue_interval: float
    concurrency: int
    pid_file: str
    listen: list[str]
    listen_nonloopback: bool
    daemon_user: str
    smtp_max_connections: int
    smtp_processes: int
    smtp_max_recipients: int
    smtp_max_line: int
    smtp_timeout: float
    smtp_data_timeout: float
    metrics_file: str
    metrics_interval: float
    local_delivery: bool
    local_domains: list[str]
    aliases_file: str
    mailbox_format: str
    mail_spool: str
    allow_file_targets: bool
    allow_pipe_targets: bool
    local_forward: str
    local_forward_users: str
    generics_file: str
    generics_apply: str
    all_mail_from: str
    path: str

    def __init__(self, values: dict[str, Any], path: str = "") -> None:
        for key, (default, _, _) in SCHEMA.items():
            value = values.get(key, default)
            setattr(self, key, list(value) if isinstance(value, list) else value)
        if "tls" not in values and self.has_secret():
            self.tls = "required"  # a password never travels in clear unless asked to
        self.path = path
        self.values = values  # what the file set, checked (cached by system.configfile)

    def has_secret(self) -> bool:
        return bool(self.password or self.password_file or self.password_command)

    def smarthosts(self) -> list[Smarthost]:
        default = self.port or (465 if self.tls == "implicit" else 25)
        return [Smarthost.parse(s, default) for s in self.smarthost]

    def loop_reason(self, listen: list[str] | None = None) -> str:
        """Why a smarthost is this relayq's own listener (own_listener), or ""."""
        for sh in self.smarthosts():
            spec = own_listener(sh.host, sh.port, self.listen if listen is None else listen)
            if spec:
                return f"smarthost {sh!r} is this relayq's own listener (listen {spec})"
        return ""

    def check_no_loop(self, listen: list[str] | None = None) -> None:
        """ConfigError (78) for a configuration that relays to its own listener."""
        reason = self.loop_reason(listen)
        if reason:
            raise ConfigError(f"{self.path}: {reason}: mail would loop back to me; set "
                              "smarthost to your relay (or listen to other addresses)")

    def effective(self) -> dict[str, Any]:
        """Every key and value, secrets masked (for check-config)."""
        out = {}
        for key in SCHEMA:
            value = getattr(self, key)
            if key in SECRET_KEYS and value:
                value = "********"
            elif key == "password_command" and len(value.split()) > 1:
                value = f"{value.split()[0]} ********"  # its arguments often hold a token
            if key == "delivery_mode":
                value = {v: k for k, v in DELIVERY_MODES.items()}[value]
            out[key] = value
        return out


def _nearest(key: str) -> str:
    """' (did you mean 'smarthost'?)' for 'smarthots': a typo's fix in its error line."""
    import difflib

    close = difflib.get_close_matches(key.lower(), SCHEMA, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse(text: str, path: str = "relayq.toml") -> Config:
    if not text.strip():
        raw: dict[str, Any] = {}
    else:
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SCHEMA:
            raise ConfigError(f"{path}: unknown key {key!r}{_nearest(key)}")
        values[key] = SCHEMA[key][1](value, key)
    cfg = Config(values, path)
    if cfg.password and sum(bool(x) for x in (cfg.password_file, cfg.password_command)):
        raise ConfigError(f"{path}: password: give only one of password, password_file, "
                          "password_command")
    if cfg.password_file and cfg.password_command:
        raise ConfigError(f"{path}: password_file: give only one of password_file, "
                          "password_command")
    if cfg.min_data_rate < 1:
        raise ConfigError(f"{path}: min_data_rate: must be at least 1 (bytes per second)")
    if cfg.port > 65535:
        raise ConfigError(f"{path}: port: must be at most 65535, got {cfg.port}")
    if cfg.retry_max < cfg.retry_min:
        raise ConfigError(f"{path}: retry_max: must not be less than retry_min")
    for spec in cfg.smarthost:
        Smarthost.parse(spec, 25)
    for key in ("domain", "masquerade_as", "ehlo_name"):
        value = getattr(cfg, key)
        if value and (not all(c.isalnum() or c in "-._" for c in value) or value.startswith(".")):
            raise ConfigError(f"{path}: {key}: bad domain name {value!r}")
    _check_rewrite(cfg, path)
    return cfg


def _check_rewrite(cfg: Config, path: str) -> None:
    """local_forward and all_mail_from must be full addresses (core/rewrite.valid_target)."""
    from relayq.core.rewrite import valid_target

    for key in ("local_forward", "all_mail_from"):
        value = getattr(cfg, key)
        if value and not valid_target(value):
            raise ConfigError(f"{path}: {key}: {value!r} is not a full address (user@domain)")


def toml_value(value: object) -> str:
    """One TOML value: strings, booleans, numbers, lists and tables; what check-config
    prints and `relayq import` writes, read back by parse() unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 300.0, inf, nan: all TOML
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    return _toml_string(str(value))


def toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else _toml_string(key)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'
