"""An account's OAuth2 access token: cached in its token file, refreshed when due.

The SMTP transport asks TokenSource.access_token() for the AUTH secret. The
token file (system.tokenstore) keeps the grant between runs; a refresh
happens under its lock, so workers whose tokens expire together refresh once
(the second finds the first's token) and a rotated refresh token is saved
before anything else can fail. A dead grant (invalid_grant) is recorded in
the file as "reauth": the account's mail then waits (policy.REAUTH_REASON,
never returned at max_queue_age), the postmaster is told once, `relayq
status` is critical, until `relayq oauth2 login` stores a new grant.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from relayq.core import oauth2, policy
from relayq.core.errors import RelayqError
from relayq.smtp.client import AuthFailed, ReauthNeeded
from relayq.system.http import HttpError, post_form
from relayq.system.tokenstore import TokenFile

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config

MARGIN = 300.0  # refresh a token that expires within this (5 minutes), or half its life
MAX_DESCRIPTION = 200


class TokenError(AuthFailed):
    """The endpoint answered an OAuth2 error: `.error` its code (authorization_pending,
    slow_down, invalid_client...), `.description` its bounded printable text."""

    def __init__(self, message: str, error: str = "", description: str = "") -> None:
        super().__init__(message)
        self.error = error
        self.description = description


class EndpointUnusable(AuthFailed):
    """No usable answer from the token endpoint (down, slow, TLS, 5xx): temporary."""


class GrantRevoked(TokenError, ReauthNeeded):
    """invalid_grant: the grant is dead; its message contains policy.REAUTH_REASON."""


class ClientRefused(TokenError, ReauthNeeded):
    """invalid_client, unauthorized_client: the application's id or secret is refused
    (an Azure client secret expires within 24 months). The administrator's to fix, as a
    dead grant is: the mail waits (policy.CLIENT_REASON), never returned."""


CLIENT_ERRORS = ("invalid_client", "unauthorized_client")


def _printable(text: object, limit: int = MAX_DESCRIPTION) -> str:
    return oauth2.printable(text, limit)


def client_secret(cfg: Config) -> str:
    """oauth2_client_secret, else the first line of oauth2_client_secret_file, else ""."""
    if cfg.oauth2_client_secret:
        return str(cfg.oauth2_client_secret)
    if not cfg.oauth2_client_secret_file:
        return ""
    try:
        with open(cfg.oauth2_client_secret_file, encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError as exc:
        raise AuthFailed(f"cannot read oauth2_client_secret_file "
                         f"{cfg.oauth2_client_secret_file}: {exc.strerror}") from None


def _account(cfg: Config) -> str:
    return getattr(cfg, "account", "") or "default"


def exchange(cfg: Config, fields: dict[str, str], *,
             timeout: float | None = None) -> dict[str, Any]:
    """One POST to the account's token endpoint (client_id and secret added); its JSON
    on 200. AuthFailed (endpoint down, slow, 5xx, not JSON), TokenError (an OAuth2
    error), GrantRevoked (invalid_grant). No message holds a secret."""
    _, _, url = oauth2.endpoints(cfg)
    form = dict(fields)
    form.setdefault("client_id", cfg.oauth2_client_id)
    secret = client_secret(cfg)
    if secret:
        form.setdefault("client_secret", secret)
    limit = cfg.oauth2_timeout if timeout is None else min(timeout, cfg.oauth2_timeout)
    try:
        status, answer = post_form(url, form, timeout=max(limit, 0.1), ca_file=cfg.oauth2_ca_file,
                                   proxy=cfg.oauth2_proxy)
    except HttpError as exc:
        raise EndpointUnusable(f"OAuth2 token endpoint unusable: {exc.message}") from None
    if status == 200 and isinstance(answer.get("access_token"), str) and answer["access_token"]:
        return answer
    if status == 200:
        raise EndpointUnusable("OAuth2 token endpoint answered 200 without an access_token")
    error = _printable(oauth2.masked(str(answer.get("error", "")), form), 64)
    desc = _printable(oauth2.masked(str(answer.get("error_description", "")), form))
    if status >= 500 or not error:
        raise EndpointUnusable(f"OAuth2 token endpoint answered HTTP {status}"
                         + (f" ({error}: {desc})" if error else ""))
    what = f"{error}: {desc}" if desc else error
    if error == "invalid_grant":
        raise GrantRevoked(f"{policy.REAUTH_REASON} (account {_account(cfg)}: {what})",
                           error, desc)
    if error in CLIENT_ERRORS:
        raise ClientRefused(f"{policy.CLIENT_REASON} (account {_account(cfg)}: {what}; "
                            "check oauth2_client_id and renew oauth2_client_secret_file)",
                            error, desc)
    raise TokenError(f"OAuth2 token endpoint refused account {_account(cfg)}: {what}",
                     error, desc)


def token_store(cfg: Config) -> TokenFile:
    """The account's TokenFile, owned (when root writes it) by the queue's owner."""
    owner = None
    try:
        st = os.stat(cfg.queue_dir)
        if st.st_uid != 0:
            owner = (st.st_uid, st.st_gid)
    except OSError:
        pass
    return TokenFile(oauth2.token_file(cfg), owner)


def _fresh(data: dict[str, Any], now: float) -> bool:
    """Does the cached access token outlive the refresh margin?"""
    token, expires = data.get("access_token"), data.get("expires_at")
    if not isinstance(token, str) or not token or not isinstance(expires, (int, float)) \
            or isinstance(expires, bool) or not math.isfinite(expires):
        return False
    life = expires - float(data.get("refreshed_at") or data.get("obtained_at") or now - 7200)
    return expires - min(MARGIN, max(life, 0) / 2) > now


def _apply(cfg: Config, data: dict[str, Any], answer: dict[str, Any], now: float) -> None:
    """An endpoint's token answer into the file's object."""
    data["version"] = 1
    data["provider"] = cfg.oauth2_provider
    data["client_id"] = cfg.oauth2_client_id
    data["user"] = cfg.user
    data["scopes"] = oauth2.scopes(cfg)
    if isinstance(answer.get("refresh_token"), str) and answer["refresh_token"]:
        data["refresh_token"] = answer["refresh_token"]  # first: nothing below can fail
    data["access_token"] = answer["access_token"]
    data["expires_at"] = now + oauth2.lifetime(answer.get("expires_in"))
    data["refreshed_at"] = now
    data.setdefault("obtained_at", now)
    data.pop("reauth", None)


def _ensure_queue(cfg: Config) -> None:
    """A login before any mail was queued: the default token file lives in the queue,
    which is made as every first submission makes it (its owner's, 0700)."""
    if os.path.isdir(cfg.queue_dir) or cfg.oauth2_token_file:
        return
    from relayq.queue.spool import Spool
    from relayq.system.privilege import queue_owner

    Spool(cfg.queue_dir).ensure(queue_owner(cfg.queue_dir, cfg.daemon_user))


def save_grant(cfg: Config, token_response: dict[str, Any]) -> None:
    """Store a fresh grant (what a login or an import got), clearing "reauth"."""
    _ensure_queue(cfg)
    store = token_store(cfg)
    now = time.time()
    with store.locked():
        try:
            data = store.load()
        except RelayqError:
            data = {}  # a damaged file: the new grant replaces it
        data.pop("refresh_token", None)
        data["obtained_at"] = now
        if "access_token" in token_response:
            _apply(cfg, data, token_response, now)
        else:
            data.update(version=1, provider=cfg.oauth2_provider, user=cfg.user,
                        client_id=cfg.oauth2_client_id, scopes=oauth2.scopes(cfg),
                        refreshed_at=now)
            data.pop("access_token", None)
            data.pop("expires_at", None)
            data.pop("reauth", None)
        if token_response.get("refresh_token"):
            data["refresh_token"] = token_response["refresh_token"]
        store.save(data)


class TokenSource:
    """The access tokens of one account (one per transport: its memory spares
    reading the file for every connection)."""

    def __init__(self, cfg: Config, *, notify: Callable[[Config, dict[str, Any]], None]
                 | None = None, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.store = token_store(cfg)
        self.notify = notify  # told once about a dead grant (the postmaster's notice)
        self.log = log
        self._token = ""
        self._data: dict[str, Any] = {}
        # another process's refresh takes at most oauth2_timeout: wait for it, not more
        self.lock_wait = 2 * cfg.oauth2_timeout + 1
        self.refreshes = 0  # refreshes this source made (tests, statistics)

    def access_token(self, force: bool = False, *, timeout: float | None = None) -> str:
        """A valid access token: the cached one unless it is due (or `force`, after a
        535), else a new one from the endpoint. AuthFailed or ReauthNeeded; a token
        file that cannot be read, locked or written is an AuthFailed too (deferred)."""
        try:
            return self._access_token(force, timeout)
        except AuthFailed:
            raise
        except RelayqError as exc:
            raise AuthFailed(f"OAuth2 token file: {exc.message}") from None

    def _access_token(self, force: bool, timeout: float | None) -> str:
        now = time.time()
        if not force and self._token and _fresh(self._data, now):
            return self._token
        data = self._load()
        # force: whatever token this source (else the file) holds was refused (a 535)
        refused = (self._token or str(data.get("access_token", ""))) if force else ""
        if not force and _fresh(data, now) and self._mine(data):
            return self._keep(data)
        self._check_reauth(data, False)
        with self.store.locked(self.lock_wait):
            data = self._load()  # another worker may have refreshed meanwhile
            now = time.time()
            if _fresh(data, now) and self._mine(data) and (
                    not force or data.get("access_token") != refused):
                return self._keep(data)
            self._check_reauth(data, True)
            self._refresh(data, timeout)
            return self._keep(data)

    def _mine(self, data: dict[str, Any]) -> bool:
        return str(data.get("user") or self.cfg.user).lower() == self.cfg.user.lower()

    def _load(self) -> dict[str, Any]:
        try:
            return self.store.load()
        except RelayqError as exc:
            raise AuthFailed(exc.message) from None

    def _keep(self, data: dict[str, Any]) -> str:
        self._data = data
        self._token = str(data["access_token"])
        return self._token

    def _check_reauth(self, data: dict[str, Any], locked: bool) -> None:
        """A grant known dead is not tried again (a login clears the mark); another
        mailbox's (`user` changed since the login) is not used for this one."""
        owner = str(data.get("user") or "")
        if owner and owner.lower() != self.cfg.user.lower():
            raise ReauthNeeded(f"{policy.REAUTH_REASON} (account {_account(self.cfg)}: "
                               f"the token file holds the grant of {owner}, not of "
                               f"{self.cfg.user})")
        mark = data.get("reauth")
        if isinstance(mark, dict):
            if not mark.get("notified") and self.notify is not None:
                if locked:
                    self._notify_once()
                else:
                    with self.store.locked(self.lock_wait):
                        self._notify_once()
            raise ReauthNeeded(f"{policy.REAUTH_REASON} (account {_account(self.cfg)}: "
                               f"{_printable(mark.get('error', 'invalid_grant'))})")

    def _refresh(self, data: dict[str, Any], timeout: float | None) -> None:
        cfg = self.cfg
        fields = {"scope": " ".join(oauth2.scopes(cfg))}
        if cfg.oauth2_flow == "client_credentials":
            fields["grant_type"] = "client_credentials"
        else:
            refresh = data.get("refresh_token")
            if not isinstance(refresh, str) or not refresh:
                raise ReauthNeeded(f"{policy.REAUTH_REASON} (account {_account(cfg)}: no "
                                   f"token yet in {self.store.path})")
            fields.update(grant_type="refresh_token", refresh_token=refresh)
        try:
            answer = exchange(cfg, fields, timeout=timeout)
        except GrantRevoked as exc:
            data["reauth"] = {"since": time.time(), "notified": False,
                              "error": _printable(f"{exc.error}: {exc.description}")}
            self.store.save(data)
            self._notify_once()
            raise
        except ClientRefused as exc:  # asked again each try: the secret may be renewed
            if "client_refused" not in data:
                data["client_refused"] = {"since": time.time(), "error": _printable(
                    f"{exc.error}: {exc.description}")}
                self.store.save(data)
            raise
        data.pop("client_refused", None)
        _apply(cfg, data, answer, time.time())
        self.store.save(data)  # a rotated refresh token is kept before anything else
        self.refreshes += 1
        if self.log is not None:
            self.log(f"OAuth2 access token of account {_account(cfg)} refreshed "
                     f"(valid {max(0, int(data['expires_at'] - time.time()))} s)")

    def _notify_once(self) -> None:
        """Under the lock: tell the postmaster about the dead grant, once."""
        data = self._load()
        mark = data.get("reauth")
        if not isinstance(mark, dict) or mark.get("notified") or self.notify is None:
            return
        try:
            self.notify(self.cfg, mark)
        except RelayqError as exc:
            if self.log is not None:
                self.log(f"OAuth2 re-authorization notice not queued: {exc.message}")
            return
        mark["notified"] = True
        self.store.save(data)


def refresh_due(cfg: Config, *, notify: Callable[[Config, dict[str, Any]], None] | None = None,
                log: Callable[[str], None] | None = None,
                failed: dict[str, str] | None = None) -> int:
    """An idle daemon's tick: refresh each refresh_token account whose token was last
    refreshed longer than oauth2_idle_refresh ago (Microsoft's refresh tokens die
    after 90 days unused). Never raises; a failure is logged once (`failed`: the
    last one per account, kept by the caller), the number refreshed returned."""
    done = 0
    now = time.time()
    failed = {} if failed is None else failed
    for name, acct in cfg.accounts().items():
        if not acct.oauth2_provider or acct.oauth2_flow != "refresh_token" \
                or acct.oauth2_idle_refresh <= 0:
            continue
        source = TokenSource(acct, notify=notify, log=log)
        try:
            data = source.store.load()
            if not data.get("refresh_token") or "reauth" in data:
                continue
            if now - float(data.get("refreshed_at") or 0) < acct.oauth2_idle_refresh:
                continue
            source.access_token(force=True)
        except (AuthFailed, RelayqError, OSError, ValueError, TypeError) as exc:
            why = f"OAuth2 idle refresh of account {name} failed: {exc}"
            if failed.get(name) != why and log is not None:
                log(why)
            failed[name] = why
            continue
        failed.pop(name, None)
        done += 1
    return done


class IdleRefresh:
    """The daemon's side of refresh_due: checked from its loop, run in a thread of its
    own (a slow endpoint never stalls the scheduler), one at a time."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.failed: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._next = 0.0  # monotonic time of the next check

    def tick(self, cfg: Config) -> None:
        now = time.monotonic()
        if now < self._next or (self._thread is not None and self._thread.is_alive()):
            return
        idle = [a.oauth2_idle_refresh for a in cfg.accounts().values()
                if a.oauth2_provider and a.oauth2_flow == "refresh_token"
                and a.oauth2_idle_refresh > 0]
        # a check is cheap (a file read per account); a quarter of the shortest idle
        # time, between a second and an hour
        self._next = now + min(max(min(idle, default=3600.0) / 4, 1.0), 3600.0)
        if not idle:
            return

        def notify(acct: Config, mark: dict[str, Any]) -> None:
            tell_postmaster(acct, mark, self.log)

        self._thread = threading.Thread(target=refresh_due, args=(cfg,), daemon=True,
                                        kwargs={"notify": notify, "log": self.log,
                                                "failed": self.failed},
                                        name="oauth2-idle-refresh")
        self._thread.start()


class _Lines:
    """A Log's info() onto a transport's log callable (enqueue logs through it)."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        self._log = log

    def info(self, line: str) -> None:
        if self._log is not None:
            self._log(line)


def notice_text(cfg: Config, mark: dict[str, Any], domain: str) -> bytes:
    """The postmaster's notice about a dead grant: which account, why, what to run."""
    from relayq.system import hostname

    name = _account(cfg)
    command = "relayq oauth2 login" + ("" if name == "default" else f" --account {name}")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(mark.get("since") or 0)))
    lines = [
        f"From: Mail Delivery Subsystem <MAILER-DAEMON@{domain}>",
        f"To: {cfg.postmaster or 'postmaster'}",
        f"Subject: relayq: account {name} needs a new OAuth2 login",
        "Auto-Submitted: auto-generated",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"relayq on {hostname.fqdn()} can no longer get an OAuth2 access token for",
        f"account {name} (user {cfg.user}, provider {cfg.oauth2_provider}).",
        "",
        "The token endpoint refused the stored grant:",
        f"    {_printable(mark.get('error', 'invalid_grant'))}",
        f"since {since}. The consent was revoked, the password changed, or the",
        "refresh token expired.",
        "",
        "Mail sent through this account is held in the queue, never returned to its",
        "senders, until the account is authorized again. Run, as root or the queue's owner:",
        "",
        f"    {command}",
        "",
        "The held mail goes out at the next queue run. This notice is sent once per",
        "refused grant.",
        "",
    ]
    return "\n".join(lines).encode("utf-8")


def tell_postmaster(cfg: Config, mark: dict[str, Any],
                    log: Callable[[str], None] | None = None) -> None:
    """Queue the notice to cfg.postmaster, as a submission from relayq itself (null
    sender, qualified and local_forward-ed as every message is: cron's admin gets it)."""
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context, Request, enqueue

    ctx = Context(cfg)
    req = Request(user="MAILER-DAEMON", uid=0, sender="",
                  recipients=[cfg.postmaster or "postmaster"])
    msg, _ = enqueue(cfg, Spool(cfg.queue_dir), req, [notice_text(cfg, mark, ctx.domain)],
                     _Lines(log), ctx)  # type: ignore[arg-type]
    msg.release()
    if log is not None:
        log(f"{msg.qid}: OAuth2 grant of account {_account(cfg)} refused; "
            f"re-authorization notice queued to the postmaster")
