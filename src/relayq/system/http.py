"""One HTTPS form POST with a JSON answer: what an OAuth2 token endpoint speaks.

The standard library's urllib only (no new dependency). The endpoint's answer
is read whole but bounded, also for a 4xx (an OAuth2 error is a JSON body);
every failure to get a JSON object back is an HttpError whose message never
holds a field's value (a refresh token, a client secret).
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from relayq.core.errors import EX_TEMPFAIL, RelayqError
from relayq.core.oauth2 import secure_url

MAX_BODY = 64 * 1024


class HttpError(RelayqError):
    """No usable answer: no connection, a timeout, TLS, or a body that is not JSON.
    `status` is the HTTP status when one came (0: no answer)."""

    code = EX_TEMPFAIL

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A token endpoint that redirects a POST is misconfigured: never follow it
    (the form, with its secrets, would go wherever the answer says)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def _where(url: str) -> str:
    """The URL without query or fragment, for messages."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _opener(url: str, ca_file: str, proxy: str) -> urllib.request.OpenerDirector:
    handlers: list[Any] = [_NoRedirect(),
                           urllib.request.ProxyHandler({"http": proxy, "https": proxy}
                                                       if proxy else {})]
    if url.startswith("https:"):
        try:
            ctx = ssl.create_default_context(cafile=ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise HttpError(f"oauth2_ca_file {ca_file}: {getattr(exc, 'strerror', '') or exc}"
                            ) from None
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    return urllib.request.build_opener(*handlers)


def _read(resp: Any, where: str) -> bytes:
    """The body, at most MAX_BODY octets (post_form's wait bounds the time)."""
    body = bytearray()
    while True:
        chunk = resp.read1(16384) if hasattr(resp, "read1") else resp.read(16384)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > MAX_BODY:
            raise HttpError(f"{where}: answer larger than {MAX_BODY // 1024} KiB")


def post_form(url: str, fields: dict[str, str], *, timeout: float, ca_file: str = "",
              proxy: str = "") -> tuple[int, dict[str, Any]]:
    """POST `fields` form-encoded to `url`; (HTTP status, the JSON object answered),
    for a 4xx too. HttpError (75) when there is no JSON object to return.

    `timeout` bounds the whole request: a server dripping its status line and
    headers a byte at a time defeats a socket's per-read timeout, so the request runs
    in a thread this one waits for at most `timeout` (the thread, its socket timing
    out on its own, is left to end: it holds nothing of ours)."""
    import threading

    box: list[Any] = []

    def run() -> None:
        try:
            box.append(_post(url, fields, timeout=timeout, ca_file=ca_file, proxy=proxy))
        except BaseException as exc:  # handed to the caller's thread
            box.append(exc)

    worker = threading.Thread(target=run, name="relayq-http", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if not box:
        raise HttpError(f"{_where(url)}: timed out (no whole answer in {timeout:g} s)")
    if isinstance(box[0], BaseException):
        raise box[0]
    result: tuple[int, dict[str, Any]] = box[0]
    return result


def _post(url: str, fields: dict[str, str], *, timeout: float, ca_file: str,
          proxy: str) -> tuple[int, dict[str, Any]]:
    where = _where(url)
    if not secure_url(url):
        raise HttpError(f"{where}: refusing a token request that is not https://")
    if proxy and not secure_url(proxy, proxy=True):
        raise HttpError(f"oauth2_proxy {_where(proxy)}: expected http:// or https://")
    data = urllib.parse.urlencode(fields).encode("ascii")
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json", "User-Agent": "relayq"})
    opener = _opener(url, ca_file, proxy)
    try:
        try:
            resp = opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as exc:  # 4xx, 5xx (and a refused redirect)
            resp = exc
        with resp:
            status = int(resp.status or resp.code or 0)
            body = _read(resp, where)
    except HttpError:
        raise
    except urllib.error.URLError as exc:
        raise HttpError(f"{where}: {_why(exc.reason)}") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise HttpError(f"{where}: {_why(exc)}") from None
    try:
        answer = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HttpError(f"{where}: HTTP {status} with an answer that is not JSON",
                        status) from None
    if not isinstance(answer, dict):
        raise HttpError(f"{where}: HTTP {status} with JSON that is not an object", status)
    return status, answer


def _why(reason: object) -> str:
    """A short reason for a failed request (no traceback, no field value)."""
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {reason.verify_message}"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed: {reason.reason or reason}"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"name not resolved: {reason.strerror}"
    if isinstance(reason, OSError) and reason.strerror:
        return str(reason.strerror)
    return str(reason)[:200] or type(reason).__name__
