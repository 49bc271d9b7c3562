"""relayq.toml read: the Config every module asks, and the rules between keys.

A wrong key or value raises ConfigError naming it (exit 78). The file is
optional: with none, every default applies. Pure: `parse()` turns text into a
Config; finding and reading the file (with the secret check and the cache) is
relayq.system.configfile's.
"""

from __future__ import annotations

from relayq.core.errors import ConfigError

# the keys and their checks, defined once (core.schema); named from here as before
from relayq.core.schema import (  # noqa: F401
    AUTH_MECHANISMS,
    DELIVERY_MODES,
    SCHEMA,
    SECRET_KEYS,
    SYSTEM_CONFIG,
    SYSTEM_QUEUE,
    TLS_MODES,
    _nearest,
    _port,
    parse_duration,
)

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from typing import Any


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


# What a provider enforces on one mailbox, the default of its account's limits
# (docs/configuration.md, "Provider limits"; check-config shows them as derived):
# Exchange Online's sending limits, 30 messages a minute and 10,000 recipients a day.
PROVIDER_LIMITS: dict[str, dict[str, int]] = {
    "microsoft": {"messages_per_minute": 30, "recipients_per_day": 10000},
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
    oauth2_provider: str
    oauth2_tenant: str
    oauth2_client_id: str
    oauth2_client_secret: str
    oauth2_client_secret_file: str
    oauth2_flow: str
    oauth2_scopes: list[str]
    oauth2_token_url: str
    oauth2_device_url: str
    oauth2_authorize_url: str
    oauth2_token_file: str
    oauth2_ca_file: str
    oauth2_proxy: str
    oauth2_timeout: float
    oauth2_idle_refresh: float
    messages_per_minute: int
    recipients_per_day: int
    max_connections: int
    from_address: str
    rewrite_from: bool
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

    account: str  # this account's name (core/accounts): DEFAULT for the top level
    senders: list[str]  # the envelope senders an account serves (none: the default's)

    def __init__(self, values: dict[str, Any], path: str = "", account: str = "") -> None:
        for key, (default, _, _) in SCHEMA.items():
            value = values.get(key, default)
            setattr(self, key, list(value) if isinstance(value, list) else value)
        if "tls" not in values and self.has_secret():
            self.tls = "required"  # a password never travels in clear unless asked to
        for key, value in PROVIDER_LIMITS.get(self.oauth2_provider, {}).items():
            if key not in values:  # the provider's own limit, unless the file sets one
                setattr(self, key, value)
        self.path = path
        self.values = values  # what the file set, checked (cached by system.configfile)
        self.account = account or "default"
        self.senders = list(values.get("senders", []))
        self._accounts: dict[str, Config] | None = None

    def has_secret(self) -> bool:
        return bool(self.password or self.password_file or self.password_command
                    or self.oauth2_provider)

    def accounts(self) -> dict[str, Config]:
        """Every account by name, the top level's as "default" (core/accounts)."""
        if self._accounts is None:
            from relayq.core.accounts import build

            self._accounts = build(self)
        return self._accounts

    def forget_accounts(self) -> None:
        """After a host key changed (queue_dir): accounts() builds them again."""
        self._accounts = None

    def inline_secrets(self) -> bool:
        """Does the file itself hold a secret (never cached; the file must be private)?"""
        return any(a.values.get(k) for a in self.accounts().values() for k in SECRET_KEYS) \
            or any(_proxy_secret(a.oauth2_proxy) for a in self.accounts().values())

    def smarthosts(self) -> list[Smarthost]:
        default = self.port or (465 if self.tls == "implicit" else 25)
        return [Smarthost.parse(s, default) for s in self.smarthost]

    def loop_reason(self, listen: list[str] | None = None) -> str:
        """Why a smarthost (any account's) is this relayq's own listener (own_listener), or ""."""
        for acc in self.accounts().values():  # each account's relay too (core/accounts)
            where = "" if acc is self else f" (account {acc.account})"
            for sh in acc.smarthosts():
                spec = own_listener(sh.host, sh.port, self.listen if listen is None else listen)
                if spec:
                    return f"smarthost {sh!r}{where} is this relayq's own listener (listen {spec})"
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
            elif key == "oauth2_proxy" and _proxy_secret(value):
                value = value.replace(_proxy_secret(value), "********", 1)
            if key == "delivery_mode":
                value = {v: k for k, v in DELIVERY_MODES.items()}[value]
            out[key] = value
        return out


def _proxy_secret(url: str) -> str:
    from relayq.core.oauth2 import proxy_secret

    return proxy_secret(url) if url else ""


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
        if key == "account":
            from relayq.core.accounts import check_tables

            values[key] = check_tables(value, path)
            continue
        if key not in SCHEMA:
            raise ConfigError(f"{path}: unknown key {key!r}{_nearest(key)}")
        values[key] = SCHEMA[key][1](value, key)
    cfg = Config(values, path)
    from relayq.core.accounts import build

    for one in build(cfg).values():  # not cached: the caller may still set queue_dir
        check(one, path)
    return cfg


def check(cfg: Config, path: str) -> None:
    """The rules between keys, for the top level and for each account."""
    where = path if cfg.account == "default" else f"{path}: account {cfg.account}"
    path = where
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
    from relayq.core import oauth2

    oauth2.check(cfg, path)


def _check_rewrite(cfg: Config, path: str) -> None:
    """local_forward and all_mail_from must be full addresses (core/rewrite.valid_target)."""
    from relayq.core.rewrite import own_address, valid_target

    for key in ("local_forward", "all_mail_from", "from_address"):
        value = getattr(cfg, key)
        if value and not valid_target(value):
            raise ConfigError(f"{path}: {key}: {value!r} is not a full address (user@domain)")
    if cfg.rewrite_from and not own_address(cfg.from_address, cfg.user):
        raise ConfigError(f"{path}: rewrite_from: set from_address (or user as an address): "
                          "the address From and the envelope sender become")
