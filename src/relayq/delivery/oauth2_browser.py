"""The browser's login: the authorization code flow with PKCE (RFC 7636, S256) and a
loopback redirect (RFC 8252 7.3), Google's only way to Gmail's scope.

relayq listens on 127.0.0.1 (an ephemeral port, or --port), prints the
provider's URL carrying redirect_uri http://127.0.0.1:PORT/, a random state
and the verifier's challenge; the browser comes back with ?code=&state=; a
wrong state is refused (another page's answer, or a forgery), and the code is
exchanged with the verifier, which never left this process. It needs a
browser, not a relayq.toml: `--output` writes the grant for `relayq oauth2
import` on the server.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from relayq.core import oauth2
from relayq.core.errors import EX_NOPERM, EX_TEMPFAIL, EX_UNAVAILABLE, ConfigError, RelayqError
from relayq.delivery.oauth2 import exchange
from relayq.delivery.oauth2_login import login_failure, plain
from relayq.smtp.client import AuthFailed

if TYPE_CHECKING:
    from relayq.core.config import Config

PAGE = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>relayq</title></head>"
        "<body style=\"font-family:sans-serif;margin:3em\"><h1>relayq</h1><p>{}</p>"
        "</body></html>")
# providers' extra parameters: Google returns a refresh token only for offline access,
# and again for a mailbox that consented before only when asked to consent again
EXTRA = {"google": {"access_type": "offline", "prompt": "consent"}}


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, its S256 code_challenge): 64 unreserved characters (43..128)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, challenge(verifier)


def challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    login: BrowserLogin


class _Handler(BaseHTTPRequestHandler):
    """The redirect's one useful request; a favicon or a stray visit gets a 404."""

    server: _Server
    timeout = 30  # a browser's idle pre-connection holds no one up

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if parts.path != "/" or not ({"code", "error", "state"} & query.keys()):
            self._answer(404, "Not the login's page.")
            return
        status, text = self.server.login.arrived(query)
        self._answer(status, text)

    def _answer(self, status: int, text: str) -> None:
        body = PAGE.format(text).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class BrowserLogin:
    """One login: the listener, the state, the verifier; `url()` to open, `wait()`
    for the code, `finish()` to exchange it. A context manager (closes the port)."""

    def __init__(self, cfg: Config, port: int = 0) -> None:
        authorize, _, _ = oauth2.endpoints(cfg)
        if not authorize:
            raise ConfigError(f"account {cfg.account}: oauth2_authorize_url: the generic "
                              "provider needs it for the browser's login")
        self.cfg = cfg
        self.authorize = authorize
        self.verifier, _ = pkce_pair()
        self.state = secrets.token_urlsafe(24)
        self._done = threading.Event()
        self._result: tuple[str, str] = ("", "")  # (code, "") or ("", why it failed)
        try:
            self._server = _Server(("127.0.0.1", port), _Handler)
        except OSError as exc:
            raise RelayqError(f"cannot listen on 127.0.0.1:{port} for the browser's answer: "
                              f"{exc.strerror}", EX_UNAVAILABLE) from None
        self._server.login = self
        self.port = self._server.server_address[1]
        self.redirect_uri = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.1}, name="oauth2-loopback")
        self._thread.start()

    def __enter__(self) -> BrowserLogin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def url(self) -> str:
        """The provider's authorization URL for this login."""
        cfg = self.cfg
        query = {"response_type": "code", "client_id": cfg.oauth2_client_id,
                 "redirect_uri": self.redirect_uri, "scope": " ".join(oauth2.scopes(cfg)),
                 "state": self.state, "code_challenge": challenge(self.verifier),
                 "code_challenge_method": "S256", **EXTRA.get(cfg.oauth2_provider, {})}
        if cfg.user and cfg.oauth2_provider in ("google", "microsoft"):
            query["login_hint"] = cfg.user
        sep = "&" if "?" in self.authorize else "?"
        return self.authorize + sep + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)

    def arrived(self, query: dict[str, str]) -> tuple[int, str]:
        """The listener's request with the provider's answer: (HTTP status, page text)."""
        if self._done.is_set():
            return 409, "This login is over already; close this page."
        if not secrets.compare_digest(query.get("state", ""), self.state):
            self._finish("", "the browser's answer carries the wrong state (not this login's "
                             "page, or a forgery): refused")
            return 400, "Refused: this answer is not for the login relayq is waiting for."
        if "error" in query:
            error = plain(query["error"], 64)
            desc = plain(query.get("error_description", ""), 200)
            self._finish("", f"the provider answered {error}" + (f": {desc}" if desc else ""))
            return 403, "The sign-in did not give relayq access; see the terminal."
        if not query.get("code"):
            self._finish("", "the browser's answer carries no code")
            return 400, "No authorization code in this answer."
        self._finish(query["code"], "")
        return 200, "Signed in: relayq has its authorization. You can close this page."

    def _finish(self, code: str, why: str) -> None:
        self._result = (code, why)
        self._done.set()

    def wait(self, timeout: float) -> str:
        """The authorization code; 75 when no answer came in time, 77 when refused."""
        if not self._done.wait(max(timeout, 0.0)):
            raise RelayqError(f"no answer from the browser within {int(timeout)} s; run the "
                              "login again (--timeout to wait longer)", EX_TEMPFAIL)
        code, why = self._result
        if not code:
            raise RelayqError(f"account {self.cfg.account}: {why}", EX_NOPERM)
        return code

    def finish(self, code: str) -> dict[str, Any]:
        """Exchange the code with the verifier: the token endpoint's answer."""
        try:
            return exchange(self.cfg, {"grant_type": "authorization_code", "code": code,
                                       "redirect_uri": self.redirect_uri,
                                       "code_verifier": self.verifier})
        except AuthFailed as exc:
            raise login_failure(exc) from None


def open_browser(url: str) -> bool:
    """Open the URL where a browser can show it (a display, macOS, Windows); never
    fails: on a server the printed URL is the way."""
    import os
    import sys

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
            or sys.platform in ("darwin", "win32")):
        return False
    try:
        import webbrowser

        return bool(webbrowser.open(url))
    except Exception:
        return False
