"""`relayq oauth2 login|import|status`: a mailbox's consent becomes the grant in an
account's token file, and what that file says about it.

The first login is the device code flow (RFC 8628) where the provider allows
it (Microsoft; a generic provider with oauth2_device_url): relayq shows a URL
and a short code, the user signs in on any device, relayq polls the token
endpoint. Google refuses Gmail's scope to the device flow: its login is the
browser's (delivery/oauth2_browser). A grant made on another machine arrives
as a file (`import`). Whatever the way, the grant is stored by
delivery.oauth2.save_grant (atomic, 0600). No token or secret is ever shown.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from relayq.core import oauth2
from relayq.core.errors import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_TEMPFAIL,
    ConfigError,
    RelayqError,
)
from relayq.delivery.oauth2 import TokenError, client_secret, exchange
from relayq.smtp.client import AuthFailed
from relayq.system.http import HttpError, post_form
from relayq.system.textfile import NotRegular, open_regular

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN = 5  # seconds RFC 8628 3.5 adds to the interval at each slow_down
MAX_IMPORT = 256 * 1024
# what the endpoint's error means for the login's exit status (sysexits)
FAILURE_CODES = {"access_denied": EX_NOPERM, "invalid_grant": EX_NOPERM,
                 "authorization_declined": EX_NOPERM,  # Microsoft's access_denied
                 "expired_token": EX_TEMPFAIL, "temporarily_unavailable": EX_TEMPFAIL,
                 "invalid_client": EX_CONFIG, "unauthorized_client": EX_CONFIG,
                 "invalid_scope": EX_CONFIG, "unsupported_grant_type": EX_CONFIG,
                 "invalid_request": EX_CONFIG}
HINTS = {
    "access_denied": "the sign-in was declined",
    "authorization_declined": "the sign-in was declined",
    "expired_token": "the code expired before the sign-in; run the login again",
    "unauthorized_client": "the application may not use this flow (Microsoft: allow "
                           "public client flows in its registration)",
    "invalid_client": "check oauth2_client_id, the client secret, and (Microsoft) that "
                      "public client flows are allowed",
    "invalid_scope": "the application lacks a permission for these scopes",
}


def login_failure(exc: AuthFailed) -> RelayqError:
    """An endpoint's refusal or absence as one line and the login's exit status:
    declined 77, expired or unreachable 75, the application misconfigured 78."""
    if isinstance(exc, TokenError):  # its own words, not the deliveries' "run login"
        hint = HINTS.get(exc.error, "")
        what = f"{exc.error}: {exc.description}" if exc.description else exc.error
        return RelayqError(f"the OAuth2 endpoint refused the login: {what}"
                           + (f" ({hint})" if hint else ""),
                           FAILURE_CODES.get(exc.error, EX_NOPERM))
    return RelayqError(str(exc), EX_TEMPFAIL)


def writable_target(path: str) -> None:
    """Refuse before the user signs in, not after, when the grant could not be stored."""
    where = os.path.dirname(os.path.abspath(path))  # a save renames in the directory
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)  # the token directory is made when missing
    if not os.access(where, os.W_OK):
        raise RelayqError(f"{path}: cannot write it as this user; run as root or as the "
                          "queue's owner", EX_NOPERM)


# --- the device code flow (RFC 8628) --------------------------------------------------

class DeviceCode:
    """The device authorization's answer: what the user types where, and how to poll."""

    def __init__(self, answer: dict[str, Any]) -> None:
        code, user_code = answer.get("device_code"), answer.get("user_code")
        uri = answer.get("verification_uri") or answer.get("verification_url")  # Google's
        if not all(isinstance(v, str) and v for v in (code, user_code, uri)):
            raise RelayqError("the device authorization endpoint's answer lacks "
                              "device_code, user_code or verification_uri", EX_TEMPFAIL)
        self.device_code = str(code)
        self.user_code = _printable(user_code, 32)
        self.uri = _printable(uri, 300)
        self.complete = _printable(answer.get("verification_uri_complete") or "", 400)
        self.expires_in = _number(answer.get("expires_in"), 900.0)
        self.interval = oauth2.lifetime(answer.get("interval"), 5.0, low=1.0, high=60.0)


def _number(value: object, default: float) -> float:
    return oauth2.lifetime(value, default)


def plain(text: object, limit: int) -> str:
    """Someone else's text for one line of ours (core.oauth2.printable)."""
    return oauth2.printable(text, limit)


def _printable(text: object, limit: int) -> str:
    return oauth2.printable(text, limit, spaces=False)


def device_start(cfg: Config) -> DeviceCode:
    """Ask the device authorization endpoint for a user code (client_id and scope)."""
    _, url, _ = oauth2.endpoints(cfg)
    if not url:
        raise ConfigError(f"account {cfg.account}: {cfg.oauth2_provider or 'generic'} has "
                          "no device code flow"
                          + ("; Google's login is the browser's: relayq oauth2 login --browser"
                             if cfg.oauth2_provider == "google" else
                             "; set oauth2_device_url, or use relayq oauth2 login --browser"))
    form = {"client_id": cfg.oauth2_client_id, "scope": " ".join(oauth2.scopes(cfg))}
    try:
        secret = client_secret(cfg)
    except AuthFailed as exc:
        raise RelayqError(str(exc), EX_CONFIG) from None
    if secret:
        form["client_secret"] = secret
    try:
        status, answer = post_form(url, form, timeout=cfg.oauth2_timeout,
                                   ca_file=cfg.oauth2_ca_file, proxy=cfg.oauth2_proxy)
    except HttpError as exc:
        raise RelayqError(f"OAuth2 device authorization endpoint unusable: {exc.message}",
                          EX_TEMPFAIL) from None
    if status != 200:
        error = _printable(answer.get("error", ""), 64) or f"HTTP {status}"
        desc = plain(answer.get("error_description", ""), 200)
        what = f"{error}: {desc}" if desc else error
        failure = TokenError(f"OAuth2 device authorization refused account {cfg.account}: "
                             f"{what}", error, desc)
        raise login_failure(failure if status < 500 else AuthFailed(str(failure)))
    return DeviceCode(answer)


def device_poll(cfg: Config, dev: DeviceCode, *, limit: float = 0.0,
                sleep: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Poll the token endpoint until the user signs in (the token answer), declines
    (77), or the code expires (75); `limit` bounds the wait below expires_in."""
    interval = dev.interval
    deadline = clock() + (min(dev.expires_in, limit) if limit > 0 else dev.expires_in)
    unreachable = 0
    while True:
        sleep(min(interval, max(deadline - clock(), 0.0)))
        if clock() >= deadline:
            raise RelayqError(f"account {cfg.account}: the code {dev.user_code} expired before "
                              "the sign-in; run relayq oauth2 login again", EX_TEMPFAIL)
        try:
            return exchange(cfg, {"grant_type": DEVICE_GRANT, "device_code": dev.device_code})
        except TokenError as exc:
            unreachable = 0
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += SLOW_DOWN
                continue
            raise login_failure(exc) from None
        except AuthFailed as exc:
            unreachable += 1  # a moment's network trouble need not lose the user's sign-in
            if unreachable >= 3:
                raise login_failure(exc) from None


def device_prompt(cfg: Config, dev: DeviceCode) -> str:
    """The one block the user acts on: where to go and the code to type."""
    minutes = max(1, round(dev.expires_in / 60))
    lines = [f"To let relayq send as {cfg.user} (account {cfg.account}), sign in:",
             "",
             f"    open   {dev.uri}",
             f"    enter  {dev.user_code}",
             ""]
    if dev.complete:
        lines.insert(-1, f"    (or open {dev.complete})")
    lines.append(f"The code expires in {minutes} minute{'s' if minutes != 1 else ''}; "
                 "waiting for the sign-in (Ctrl-C stops)...")
    return "\n".join(lines)


def app_token(cfg: Config) -> dict[str, Any]:
    """client_credentials: no one signs in; get a token to prove the keys work."""
    from relayq.delivery.oauth2 import TokenSource

    source = TokenSource(cfg)
    try:
        source.access_token(force=True)
    except AuthFailed as exc:
        raise login_failure(exc) from None
    return source.store.load()


# --- token files: --output and import ----------------------------------------------

def grant_record(cfg: Config, answer: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A token file's object for a fresh grant (--output: to carry to the server)."""
    if not isinstance(answer.get("refresh_token"), str) or not answer["refresh_token"]:
        raise RelayqError(f"account {cfg.account}: the provider gave no refresh token "
                          "(Microsoft: the scope offline_access; Google: the consent screen "
                          "asks again only with prompt=consent)", EX_NOPERM)
    now = time.time() if now is None else now
    data: dict[str, Any] = {"version": 1, "provider": cfg.oauth2_provider,
                            "client_id": cfg.oauth2_client_id, "user": cfg.user,
                            "scopes": oauth2.scopes(cfg), "refresh_token": answer["refresh_token"],
                            "obtained_at": now, "refreshed_at": now}
    if isinstance(answer.get("access_token"), str) and answer["access_token"]:
        data["access_token"] = answer["access_token"]
        data["expires_at"] = now + _number(answer.get("expires_in"), 3600.0)
    return data


def write_output(path: str, data: dict[str, Any]) -> None:
    """The grant for another machine: a new file, mode 0600, atomic, as this user."""
    from relayq.system.tokenstore import TokenFile

    TokenFile(path, (os.getuid(), os.getgid())).save(data)


def read_import(path: str) -> dict[str, Any]:
    """A token file made elsewhere: a JSON object with a refresh token (65 otherwise)."""
    try:
        fd = open_regular(path)
    except NotRegular:
        fd = -1
    except OSError as exc:
        code = EX_NOINPUT if isinstance(exc, FileNotFoundError) else EX_NOPERM
        raise RelayqError(f"{path}: cannot read: {exc.strerror}", code) from None
    raw = b""
    if fd >= 0:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_IMPORT + 1)
    try:
        data = json.loads(raw.decode("utf-8")) if 0 < len(raw) <= MAX_IMPORT else None
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise RelayqError(f"{path}: not a token file (a JSON object, as relayq oauth2 login "
                          "--output writes)", EX_DATAERR)
    if not isinstance(data.get("refresh_token"), str) or not data["refresh_token"].strip():
        raise RelayqError(f"{path}: holds no refresh token", EX_DATAERR)
    return data


def import_answer(cfg: Config, data: dict[str, Any], path: str,
                  now: float | None = None) -> dict[str, Any]:
    """The token answer save_grant stores, once the file is seen to be this account's:
    same provider, client id and mailbox where both sides name one (78 otherwise)."""
    for key, mine in (("provider", cfg.oauth2_provider), ("client_id", cfg.oauth2_client_id),
                      ("user", cfg.user)):
        theirs = data.get(key)
        if isinstance(theirs, str) and theirs and mine and theirs.lower() != mine.lower():
            raise RelayqError(f"{path}: made for {key} {_printable(theirs, 100)!r}, but "
                              f"account {cfg.account} has {mine!r}", EX_CONFIG)
    answer: dict[str, Any] = {"refresh_token": data["refresh_token"].strip()}
    now = time.time() if now is None else now
    expires = data.get("expires_at")
    if isinstance(data.get("access_token"), str) and isinstance(expires, int | float) \
            and expires - now > 60 and data.get("client_id") == cfg.oauth2_client_id:
        answer.update(access_token=data["access_token"], expires_in=int(expires - now))
    return answer


# --- status ----------------------------------------------------------------------

def account_status(cfg: Config, now: float | None = None) -> dict[str, Any]:
    """What an account's token file says, never a token or a secret."""
    from relayq.delivery.oauth2 import token_store

    now = time.time() if now is None else now
    store = token_store(cfg)
    row: dict[str, Any] = {"account": cfg.account, "provider": cfg.oauth2_provider,
                           "flow": cfg.oauth2_flow, "user": cfg.user,
                           "token_file": store.path, "token_file_exists": False,
                           "has_refresh_token": False, "access_token_valid_until": None,
                           "access_token_valid": False, "obtained": None,
                           "last_refresh": None, "reauth_needed": False, "reauth_error": "",
                           "reauth_since": None, "error": ""}
    try:
        data = store.load()
        row["token_file_exists"] = os.path.exists(store.path)
    except RelayqError as exc:
        row["error"] = exc.message
        return row
    row["has_refresh_token"] = bool(data.get("refresh_token"))
    expires = data.get("expires_at")
    if data.get("access_token") and isinstance(expires, int | float):
        row["access_token_valid_until"] = _iso(expires)
        row["access_token_valid"] = expires > now
    for key, field in (("obtained", "obtained_at"), ("last_refresh", "refreshed_at")):
        if isinstance(data.get(field), int | float):
            row[key] = _iso(data[field])
    why = oauth2.needs_login(cfg, data)  # the rule relayq status uses (tokenstore)
    if why:
        row["reauth_needed"] = True
        row["reauth_error"] = why
        mark = data.get("reauth")
        if isinstance(mark, dict) and isinstance(mark.get("since"), int | float):
            row["reauth_since"] = _iso(mark["since"])
    return row


def _iso(epoch: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    except (OverflowError, ValueError, OSError):  # a damaged file's number
        return "?"
