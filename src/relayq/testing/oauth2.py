"""A fake OAuth2 authorization server on 127.0.0.1, for tests and demos.

It speaks what relayq asks of Microsoft's and Google's endpoints: the
refresh_token grant (rotating the refresh token, the old one still valid, as
Microsoft does), client_credentials, the device code flow (RFC 8628) and the
authorization code flow with PKCE (RFC 7636). It issues real random tokens
and remembers them, so the test smarthost can check a login against it
(Smarthost(token_check=endpoint.accepts)). Faults: .down closes the port,
.stall delays each answer, .fail_with answers every POST with a fixed error,
.revoke() kills grants (invalid_grant), .invalidate_access() kills issued
access tokens (a 535 at the smarthost while relayq still caches one).

Stdlib only, its own thread; it imports nothing else of relayq.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

SECRET_FIELDS = ("client_secret", "refresh_token", "code", "code_verifier", "device_code",
                 "access_token", "password", "assertion")
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class _Device:
    __slots__ = ("client_id", "code", "denied", "expires", "last_poll", "scope", "user",
                 "user_code")

    def __init__(self, client_id: str, scope: str, lifetime: float) -> None:
        self.client_id = client_id
        self.scope = scope
        self.code = "dc." + secrets.token_urlsafe(24)
        self.user_code = f"{secrets.randbelow(10**4):04d}-{secrets.randbelow(10**4):04d}"
        self.expires = time.time() + lifetime
        self.user: str | None = None
        self.denied = False
        self.last_poll = 0.0


class FakeTokenEndpoint:
    """The fake server. Start with `with FakeTokenEndpoint() as ep:` or .start()."""

    def __init__(self, tls_context: ssl.SSLContext | None = None) -> None:
        self.tls_context = tls_context  # a server context: https:// (TestPKI's certificate)
        self.client_id = "relayq-test-client"
        self.client_secret: str | None = None
        self.access_lifetime = 3600
        self.rotate = True
        self.stall = 0.0
        self.fail_with: tuple[int, dict[str, Any]] | None = None
        self.browser_user = "user@example.org"
        self.device_lifetime = 900.0
        self.device_interval = 1  # seconds a device poll must wait (RFC 8628's interval)
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._grants: dict[str, tuple[int, str]] = {}  # refresh token -> (family, user)
        self._dead: set[int] = set()  # revoked families
        self._families = 0
        self._access: dict[str, tuple[str | None, float]] = {}  # token -> (user, expires)
        self._devices: dict[str, _Device] = {}
        self._codes: dict[str, tuple[str, str, str, str, str]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._down = False

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> FakeTokenEndpoint:
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.endpoint = self
        if self.tls_context is not None:
            server.socket = self.tls_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="fake-oauth2",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeTokenEndpoint:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        """True closes the port (connection refused); False opens it again, same port."""
        if value and not self._down:
            self.stop()
        elif not value and self._down:
            self.start()
        self._down = value

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def device_url(self) -> str:
        return self.url + "/devicecode"

    @property
    def authorize_url(self) -> str:
        return self.url + "/authorize"

    # --- the test's controls ---------------------------------------------------------

    def grant(self, user: str) -> str:
        """Seed a consented grant for `user`; its refresh token."""
        with self._lock:
            self._families += 1
            return self._new_refresh(self._families, user)

    def accepts(self, user: str, access_token: str) -> bool:
        """Is this a live access token for `user` (an app-only token: any user)?"""
        with self._lock:
            found = self._access.get(access_token)
        if found is None:
            return False
        who, expires = found
        return time.time() < expires and who in (None, user)

    def revoke(self, refresh_token: str | None = None) -> None:
        """invalid_grant from now on for this grant (all its rotated tokens), or all."""
        with self._lock:
            if refresh_token is None:
                self._dead.update(f for f, _ in self._grants.values())
            elif refresh_token in self._grants:
                self._dead.add(self._grants[refresh_token][0])

    def invalidate_access(self) -> None:
        """Every access token issued so far stops working (the smarthost answers 535)."""
        with self._lock:
            self._access.clear()

    def approve_device(self, user: str) -> None:
        """The user signs in at verification_uri: every pending device code is approved."""
        with self._lock:
            for dev in self._devices.values():
                if dev.user is None and not dev.denied:
                    dev.user = user

    def deny_device(self) -> None:
        """The user declines: access_denied for every pending device code."""
        with self._lock:
            for dev in self._devices.values():
                if dev.user is None:
                    dev.denied = True

    def refresh_tokens(self, user: str) -> list[str]:
        """The live refresh tokens of `user` (for assertions)."""
        with self._lock:
            return [t for t, (f, u) in self._grants.items() if u == user and f not in self._dead]

    def token_requests(self, grant_type: str = "") -> list[dict[str, str]]:
        """The token requests seen (of one grant_type)."""
        return [r for r in list(self.requests) if r.get("_path") == "/token"
                and (not grant_type or r.get("grant_type") == grant_type)]

    # --- issuing (with self._lock held) ------------------------------------------------

    def _new_refresh(self, family: int, user: str) -> str:
        token = "rt." + secrets.token_urlsafe(32)
        self._grants[token] = (family, user)
        return token

    def _issue(self, user: str | None, scope: str, family: int | None) -> dict[str, Any]:
        access = "at." + secrets.token_urlsafe(32)
        self._access[access] = (user, time.time() + self.access_lifetime)
        answer: dict[str, Any] = {"token_type": "Bearer", "access_token": access,
                                  "expires_in": self.access_lifetime, "scope": scope}
        if family is not None and user is not None:
            answer["refresh_token"] = self._new_refresh(family, user)
        return answer

    # --- the flows (each returns (status, JSON) or (status, None, location)) ----------

    def _check_client(self, form: dict[str, str], need_secret: bool) -> tuple[int, dict] | None:
        if form.get("client_id") != self.client_id:
            return 401, _error("invalid_client", "unknown client_id")
        if self.client_secret is not None or need_secret:
            given = form.get("client_secret")
            if not given or (self.client_secret is not None and given != self.client_secret):
                return 401, _error("invalid_client", "client authentication failed")
        return None

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        bad = self._check_client(form, grant == "client_credentials")
        if bad is not None:
            return bad
        scope = form.get("scope", "")
        with self._lock:
            if grant == "refresh_token":
                found = self._grants.get(form.get("refresh_token", ""))
                if found is None or found[0] in self._dead:
                    return 400, _error("invalid_grant", "AADSTS70008: The refresh token has "
                                       "expired or is invalid due to sign-in frequency checks "
                                       "by conditional access.")
                answer = self._issue(found[1], scope, found[0] if self.rotate else None)
                return 200, answer
            if grant == "client_credentials":
                return 200, self._issue(None, scope, None)
            if grant == DEVICE_GRANT:
                return self._device_token(form, scope)
            if grant == "authorization_code":
                return self._code_token(form, scope)
        return 400, _error("unsupported_grant_type", f"grant_type {grant!r}")

    def _device_token(self, form: dict[str, str], scope: str) -> tuple[int, dict[str, Any]]:
        dev = self._devices.get(form.get("device_code", ""))
        if dev is None:
            return 400, _error("invalid_grant", "unknown device_code")
        now = time.time()
        if now >= dev.expires:
            return 400, _error("expired_token", "the device code expired")
        if dev.denied:
            return 400, _error("access_denied", "the user declined")
        if dev.user is None:
            early = now - dev.last_poll < self.device_interval / 2
            dev.last_poll = now
            if early:
                return 400, _error("slow_down", "polled faster than interval")
            return 400, _error("authorization_pending", "waiting for the user")
        del self._devices[dev.code]
        self._families += 1
        return 200, self._issue(dev.user, dev.scope or scope, self._families)

    def _code_token(self, form: dict[str, str], scope: str) -> tuple[int, dict[str, Any]]:
        found = self._codes.pop(form.get("code", ""), None)
        if found is None:
            return 400, _error("invalid_grant", "unknown or used authorization code")
        redirect, challenge, user, granted, client = found
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if form.get("redirect_uri") != redirect:
            return 400, _error("invalid_grant", "redirect_uri does not match")
        if client != form.get("client_id") or digest.rstrip(b"=").decode() != challenge:
            return 400, _error("invalid_grant", "code_verifier does not match")
        self._families += 1
        return 200, self._issue(user, granted or scope, self._families)

    def devicecode(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != self.client_id:
            return 400, _error("invalid_client", "unknown client_id")
        dev = _Device(self.client_id, form.get("scope", ""), self.device_lifetime)
        with self._lock:
            self._devices[dev.code] = dev
        return 200, {"device_code": dev.code, "user_code": dev.user_code,
                     "verification_uri": self.url + "/device",
                     "expires_in": int(self.device_lifetime), "interval": self.device_interval,
                     "message": f"To sign in, open {self.url}/device and enter the code "
                                f"{dev.user_code} to authenticate."}

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """(302, Location) auto-approved as browser_user, or (400, why)."""
        redirect = query.get("redirect_uri", "")
        if query.get("client_id") != self.client_id or not redirect:
            return 400, "unknown client_id or no redirect_uri"
        if query.get("response_type") != "code":
            return 400, "response_type must be code"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, "PKCE with S256 is required"
        code = "ac." + secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = (redirect, query["code_challenge"], self.browser_user,
                                 query.get("scope", ""), self.client_id)
        answer = {"code": code}
        if "state" in query:
            answer["state"] = query["state"]
        sep = "&" if "?" in redirect else "?"
        return 302, redirect + sep + urllib.parse.urlencode(answer)

    def _record(self, path: str, form: dict[str, str]) -> None:
        shown = {k: ("***" if k in SECRET_FIELDS else v) for k, v in form.items()}
        shown["_path"] = path
        self.requests.append(shown)


def _error(code: str, description: str) -> dict[str, Any]:
    return {"error": code, "error_description": description}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    endpoint: FakeTokenEndpoint

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up on a stalled answer is what a stall is for: quiet."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str, location: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if location:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(body)

    def _stall(self) -> None:
        ep = self.server.endpoint
        if ep.stall > 0:
            time.sleep(ep.stall)

    def do_GET(self) -> None:
        ep = self.server.endpoint
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        ep._record(parts.path, query)
        self._stall()
        if parts.path != "/authorize":
            self._send(404, b"not found\n", "text/plain")
            return
        status, where = ep.authorize(query)
        if status == 302:
            self._send(302, b"", "text/plain", where)
        else:
            self._send(status, where.encode() + b"\n", "text/plain")

    def do_POST(self) -> None:
        ep = self.server.endpoint
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, 1 << 20)).decode("utf-8", "replace")
        form = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))
        path = urllib.parse.urlsplit(self.path).path
        ep._record(path, form)
        self._stall()
        if ep.fail_with is not None:
            status, answer = ep.fail_with
        elif path == "/token":
            status, answer = ep.token(form)
        elif path == "/devicecode":
            status, answer = ep.devicecode(form)
        else:
            status, answer = 404, _error("not_found", path)
        self._send(status, json.dumps(answer).encode(), "application/json")
