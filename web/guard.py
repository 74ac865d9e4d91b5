"""What every request and response of serve.py passes through: Host and Origin checks, request framing,
security headers, and a last catch that answers JSON and logs no message (web/app.py).

- Host: only the names the server was bound to (plus `--allow-host`), so a
  page on another name cannot reach it through DNS rebinding. 400.
- Origin: a request that carries an Origin other than the server's own
  (scheme and host as in its Host header) is refused, whatever the method,
  so another web page cannot make the local server work. 403.
- Framing: a request with both Content-Length and Transfer-Encoding is
  refused (RFC 9112 section 6.3 allows a server to), before its body is read. 400.
- Headers on every response: Content-Security-Policy (no script, style or
  image from anywhere but this server; no framing), X-Content-Type-Options,
  X-Frame-Options, Referrer-Policy, Cross-Origin-Resource-Policy; and
  `Cache-Control: no-store` on the page and the API unless a route set its own;
  `Connection: close` (one request a connection, so web.protocol's time
  limit on a request's head covers every request).
- Any exception a route lets through becomes `{"error": ...}` with 500; the
  log gets its type only (a message may hold a file or member name).
"""
from __future__ import annotations

import json
import logging
import re
from urllib.parse import urlsplit

log = logging.getLogger("ich.web")

CSP = ("default-src 'none'; script-src 'self'{scripts}; style-src 'self'; style-src-attr 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-resource-policy": b"same-origin",
    b"cross-origin-opener-policy": b"same-origin",
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def csp(script_hashes=()) -> str:
    """The policy; script_hashes: 'sha256-...' sources of the page's inline scripts."""
    return CSP.format(scripts="".join(f" '{h}'" for h in script_hashes))


def allowed_hosts_for(bound: str, extra=()) -> set[str] | None:
    """The Host names answered: the bound address (all loopback names when it is one) and `extra`;
    None (no check) only when extra holds '*'."""
    extra = [h.strip().lower() for h in extra if h.strip()]
    if "*" in extra:
        return None
    hosts = {bound.strip("[]").lower(), *extra}
    if hosts & set(LOOPBACK):
        hosts |= set(LOOPBACK)
    return hosts


_HOST = re.compile(r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'; '' when malformed (a user part such as
    'evil@127.0.0.1', a path, spaces: RFC 9110's Host is a name or address and a port, nothing else)."""
    if not _HOST.fullmatch(value):
        return ""
    try:
        return (urlsplit("//" + value).hostname or "").lower()
    except ValueError:
        return ""


class Guard:
    def __init__(self, app, *, allowed_hosts: set[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    def problem(self, scope) -> tuple[int, str] | None:
        headers: dict[bytes, list[bytes]] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), []).append(v)
        hosts = headers.get(b"host", [])
        if len(hosts) != 1:
            return 400, "the request must carry one Host header"
        host = hosts[0].decode("latin-1")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            return 400, ("this server does not answer to that host name (serve.py --allow-host NAME adds one)")
        for origin in headers.get(b"origin", []):
            o = urlsplit(origin.decode("latin-1"))
            if o.scheme not in ("http", "https") or o.netloc.lower() != host.lower():
                return 403, "requests from another web page (Origin) are refused: use this server's own page"
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return 400, "a request may not carry both Content-Length and Transfer-Encoding"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = scope["path"] == "/" or scope["path"].startswith("/api/")
        started = False

        async def secure_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in HEADERS.items() if k not in names]
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", csp().encode()))
                if api and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                if b"connection" not in names:  # one request a connection: web.protocol times its head
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        problem = self.problem(scope)
        if problem is not None:
            return await self.answer(secure_send, *problem, close=True)
        try:
            await self.app(scope, receive, secure_send)
        except Exception as exc:  # noqa: BLE001 - the last catch: JSON, and no message in the log
            log.error("request failed: %s (no details logged: they may name patient files)", type(exc).__name__)
            if not started:
                await self.answer(secure_send, 500, "the server failed on this request; it goes on serving others")

    @staticmethod
    async def answer(send, status: int, message: str, close: bool = False):
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
