"""The server's security model: a secret token on every request, strict headers.

* **Token.** :func:`new_token` makes a random URL-safe secret. Every request must
  carry it, as the ``token`` query parameter (the URL the server prints), the
  ``X-Attrlab-Token`` header (what the page's scripts send) or the cookie that a
  request with a valid query token sets (``HttpOnly; SameSite=Strict``, as
  Jupyter does). Anything else gets ``403`` with a JSON error: another local
  user, or a web page in the same browser, cannot drive the server without
  reading the token from the terminal.
* **Headers.** Every response carries a strict Content-Security-Policy
  (:data:`CSP`: scripts and styles only from the server itself, no inline
  script, no ``eval``, no framing, no plugins), ``X-Content-Type-Options:
  nosniff``, ``Referrer-Policy: no-referrer`` (the token in the URL never leaks
  through a Referer) and ``Cache-Control: no-store``.
* **Writes.** ``POST`` bodies must be ``application/json`` (a cross-site HTML
  form cannot send that without a CORS preflight, which the server never
  grants).
* **Binding.** :func:`is_loopback` tells whether a host is loopback only; the
  CLI warns when asked to bind anywhere else.

Example:
    >>> len(new_token()) >= 32, is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
    (True, True, False)
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

__all__ = ["CSP", "SECURITY_HEADERS", "TokenGuard", "is_loopback", "new_token"]

#: the Content-Security-Policy of every response the server sends
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'; object-src 'none'"
)

#: headers added to every response
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}

HEADER = "x-attrlab-token"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def new_token() -> str:
    """A new random secret (256 bits, URL-safe).

    Example:
        >>> new_token() != new_token()
        True
    """
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` exposes the server to this machine only.

    Example:
        >>> is_loopback("localhost"), is_loopback("::1"), is_loopback("192.168.1.5")
        (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json_response(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": "Forbidden" if status == 403 else "BadRequest",
                       "message": message}).encode()  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return headers, body


class TokenGuard:
    """ASGI middleware: refuse requests without the token; add the security headers.

    Args:
        app: the wrapped ASGI application.
        token: the secret every request must carry.
        cookie: the cookie name (one per server port, so two servers on one
            machine do not overwrite each other's cookie).

    Example:
        >>> async def app(scope, receive, send): pass
        >>> TokenGuard(app, "s3cret").cookie
        'attrlab_token'
    """

    def __init__(self, app: ASGIApp, token: str, cookie: str = "attrlab_token"):
        self.app = app
        self.token = token
        self.cookie = cookie

    def _given(self, scope: Scope) -> tuple[str | None, bool]:
        """The token the request carries and whether it came in the query string."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if HEADER in headers:
            return headers[HEADER], False
        if "cookie" in headers:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(headers["cookie"])
            except Exception:  # a malformed cookie header is just no token
                return None, False
            if self.cookie in jar:
                return jar[self.cookie].value, False
        return None, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events carry no request
            await self.app(scope, receive, send)
            return
        given, from_query = self._given(scope)
        ok = given is not None and secrets.compare_digest(given.encode(), self.token.encode())
        extra: list[tuple[bytes, bytes]] = [
            (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
        ]
        if not ok:
            headers, body = _json_response(
                403,
                "this server needs its token: open the URL printed by `attrlab serve` "
                "(it ends in ?token=...)",
            )
            await send({"type": "http.response.start", "status": 403, "headers": headers + extra})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["method"] == "POST":
            headers_in = {k.decode("latin-1").lower(): v.decode("latin-1")
                          for k, v in scope["headers"]}  # fmt: skip
            if not headers_in.get("content-type", "").startswith("application/json"):
                headers, body = _json_response(415, "POST bodies must be application/json")
                await send({"type": "http.response.start", "status": 415,
                            "headers": headers + extra})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        if from_query:
            extra.append((b"set-cookie", (f"{self.cookie}={self.token}; Path=/; HttpOnly; "
                                          "SameSite=Strict").encode()))  # fmt: skip

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in extra}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)
