"""OAuth2 for SMTP AUTH: the providers' endpoints and scopes, and the rules of the keys.

Pure: which URLs and scopes an account's oauth2_* keys mean, and whether they
make sense together. Getting, caching and refreshing tokens is
relayq.delivery.oauth2's.
"""

from __future__ import annotations

from relayq.core.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from relayq.core.config import Config

MICROSOFT_LOGIN = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
# provider: (authorize, device, token, delegated scopes, app-only scopes)
PRESETS: dict[str, tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = {
    "microsoft": (MICROSOFT_LOGIN + "/authorize", MICROSOFT_LOGIN + "/devicecode",
                  MICROSOFT_LOGIN + "/token",
                  ("https://outlook.office.com/SMTP.Send", "offline_access"),
                  ("https://outlook.office365.com/.default",)),
    # Google's device flow does not grant Gmail's scope: the login is a browser's
    "google": ("https://accounts.google.com/o/oauth2/v2/auth", "",
               "https://oauth2.googleapis.com/token", ("https://mail.google.com/",), ()),
    "generic": ("", "", "", (), ()),
}
# Microsoft's tenants that name no organisation: an app-only token needs a real one
SHARED_TENANTS = ("common", "organizations", "consumers")


def endpoints(cfg: Config) -> tuple[str, str, str]:
    """(authorize, device, token) URLs: the keys set, else the provider's."""
    authorize, device, token, _, _ = PRESETS[cfg.oauth2_provider or "generic"]
    urls = (cfg.oauth2_authorize_url or authorize, cfg.oauth2_device_url or device,
            cfg.oauth2_token_url or token)
    return tuple(u.replace("{tenant}", cfg.oauth2_tenant) for u in urls)  # type: ignore[return-value]


def scopes(cfg: Config) -> list[str]:
    if cfg.oauth2_scopes:
        return list(cfg.oauth2_scopes)
    _, _, _, delegated, app = PRESETS[cfg.oauth2_provider or "generic"]
    return list(app if cfg.oauth2_flow == "client_credentials" else delegated)


def check(cfg: Config, where: str) -> None:
    """The oauth2_* keys of one account together; ConfigError (78) naming the key."""
    if not cfg.oauth2_provider:
        from relayq.core.schema import SCHEMA

        stray = [k for k in _OWN_KEYS if k in cfg.values and cfg.values[k] != SCHEMA[k][0]]
        if stray:
            raise ConfigError(f"{where}: {stray[0]}: set oauth2_provider to use OAuth2")
        return
    if cfg.password or cfg.password_file or cfg.password_command:
        raise ConfigError(f"{where}: oauth2_provider: the AUTH secret is the OAuth2 token; "
                          "remove password, password_file and password_command")
    if not cfg.user:
        raise ConfigError(f"{where}: user: OAuth2 logs in as a mailbox; set user")
    if not cfg.oauth2_client_id:
        raise ConfigError(f"{where}: oauth2_client_id: the application's id is needed")
    if cfg.oauth2_client_secret and cfg.oauth2_client_secret_file:
        raise ConfigError(f"{where}: oauth2_client_secret: give only one of "
                          "oauth2_client_secret, oauth2_client_secret_file")
    if cfg.auth_mechanism in ("PLAIN", "LOGIN"):
        raise ConfigError(f"{where}: auth_mechanism: an OAuth2 token goes as XOAUTH2 or "
                          "OAUTHBEARER, never as a password")
    if cfg.oauth2_flow == "client_credentials":
        if not (cfg.oauth2_client_secret or cfg.oauth2_client_secret_file):
            raise ConfigError(f"{where}: oauth2_flow: client_credentials needs "
                              "oauth2_client_secret_file")
        if cfg.oauth2_provider == "microsoft" and cfg.oauth2_tenant in SHARED_TENANTS:
            raise ConfigError(f"{where}: oauth2_tenant: client_credentials needs your "
                              "tenant's domain or id, not " + repr(cfg.oauth2_tenant))
    _, _, token = endpoints(cfg)
    if not token:
        raise ConfigError(f"{where}: oauth2_token_url: the generic provider needs it")
    for key, url in (("oauth2_token_url", token), ("oauth2_proxy", cfg.oauth2_proxy)):
        if url and not secure_url(url, proxy=key == "oauth2_proxy"):
            shown = url.replace(proxy_secret(url), "********", 1) if proxy_secret(url) else url
            raise ConfigError(f"{where}: {key}: {shown!r}: expected https:// "
                              "(http:// only to a loopback address)")
    if not scopes(cfg):
        raise ConfigError(f"{where}: oauth2_scopes: the generic provider needs them")


def proxy_secret(url: str) -> str:
    """The user:password of a proxy URL (http://user:pass@host:port), or "": a secret in
    the file like `password` (masked, never cached, the file private)."""
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.partition("@") if sep else ("", "", "")
    return userinfo if at and userinfo else ""


def token_file(cfg: Config) -> str:
    """The account's token cache: oauth2_token_file, else oauth2/ACCOUNT.json in the queue."""
    import os.path

    return cfg.oauth2_token_file or os.path.join(cfg.queue_dir, "oauth2", cfg.account + ".json")


def secure_url(url: str, proxy: bool = False) -> bool:
    """https://, or http:// to loopback (tests, a local proxy): a token or a client
    secret never crosses a network in clear. A proxy may be http:// anywhere: the
    request goes through it in a CONNECT tunnel."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    if parts.scheme == "https" and host:
        return True
    if parts.scheme != "http" or not host:
        return False
    return proxy or host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


MIN_LIFETIME, MAX_LIFETIME = 0.0, 86400.0


def lifetime(value: object, default: float = 3600.0, low: float = MIN_LIFETIME,
             high: float = MAX_LIFETIME) -> float:
    """An endpoint's expires_in (or interval) as seconds we can do arithmetic and JSON
    with: a number, or a numeric string, clamped to [low, high];
    anything else (a bool, NaN, inf, a 400-digit integer, garbage) is `default`."""
    import math

    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        n = float(value)
    except (ValueError, OverflowError):
        return default
    if not math.isfinite(n):
        return default
    return min(max(n, low), high)


def printable(text: object, limit: int, *, spaces: bool = True) -> str:
    """Someone else's text (an endpoint's error, a browser's query) for one line of ours:
    printable, spaces squeezed (or, spaces=False, dropped: a user code), bounded."""
    raw = str(text or "")
    if not spaces:
        return "".join(c for c in raw if c.isprintable() and not c.isspace())[:limit]
    s = " ".join("".join(c if c.isprintable() else " " for c in raw).split())
    return s if len(s) <= limit else s[:max(limit - 3, 0)] + "..."


REQUEST_SECRETS = ("client_secret", "refresh_token", "code", "code_verifier", "device_code",
                   "access_token")


def masked(text: str, form: dict[str, str]) -> str:
    """`text` with every secret value of the request `form` replaced by ***: an
    endpoint's error description may quote what it was sent."""
    for key in REQUEST_SECRETS:
        value = form.get(key, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def needs_login(cfg: Config, data: dict[str, object]) -> str:
    """Why the account's token file (its parsed object) cannot serve it until a person
    acts, or "": the one rule relayq status, relayq oauth2 status and delivery share."""
    owner = data.get("user")
    if isinstance(owner, str) and owner and owner.lower() != cfg.user.lower():
        return f"the token file holds the grant of {printable(owner, 100)}, not of {cfg.user}"
    mark = data.get("reauth")
    if isinstance(mark, dict):
        return printable(mark.get("error", "invalid_grant"), 240) or "invalid_grant"
    refused = data.get("client_refused")  # cleared by the next token the endpoint gives
    if isinstance(refused, dict):
        return ("the application is refused (" + printable(refused.get("error", ""), 200)
                + "): renew oauth2_client_secret_file")
    if cfg.oauth2_flow == "refresh_token" and not data.get("refresh_token"):
        return "no grant yet (never logged in)"
    return ""


def looks_like_token(secret: str) -> bool:
    """An OAuth2 access token from a password_command: a JWT (Microsoft's), Google's
    ya29. tokens, or any long token68 string; a password is rarely any of these."""
    if secret.startswith("ya29.") or (secret.startswith("eyJ") and secret.count(".") == 2):
        return True
    token68 = all(c.isascii() and (c.isalnum() or c in "-._~+/=") for c in secret)
    return token68 and len(secret) >= 100


_OWN_KEYS = ("oauth2_tenant", "oauth2_client_id", "oauth2_client_secret",
             "oauth2_client_secret_file", "oauth2_flow", "oauth2_scopes", "oauth2_token_url",
             "oauth2_device_url", "oauth2_authorize_url", "oauth2_token_file")
