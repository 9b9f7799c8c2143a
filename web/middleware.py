"""ASGI wrappers: cross-site requests refused (403), a bound on request bodies (413), both with a JSON reason, and
security headers on every answer."""
import json

SECURITY_HEADERS = [
    # Scripts, styles and fonts from this server only (no CDN); catalogue images may be the marketplace's URLs.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data: https: http:; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class BodyTooLarge(Exception):
    """Raised while the app reads a body over the bound; the app answers it with 413 (see web.app)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


async def send_json(send, status, payload):
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 {"error", "status"}: at once when Content-Length says so,
    else as soon as the streamed body passes the bound, before the rest is read."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    def reason(self, size=None):
        limit = f"{self.max_bytes} bytes ({self.max_bytes / 1e6:.1f} MB)"
        return (f"upload too large: the request is {size} bytes, over the limit of {limit}" if size is not None
                else f"upload too large: the request is over the limit of {limit}")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, {"error": self.reason(int(length)), "status": 413})
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.reason())
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as error:
            if started:
                raise
            await send_json(send, 413, {"error": error.reason, "status": 413})


class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {name for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def normal_origin(origin):
    """An origin as compared: lower case, without a trailing slash."""
    return origin.strip().rstrip("/").lower()


def own_origin(scope):
    """scheme://host[:port] that the request came to, from its Host header; None without one."""
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip()
    return normal_origin(f"{scope.get('scheme', 'http')}://{host}") if host else None


class SameOrigin:
    """Refuses requests that may change something (any method but GET, HEAD and OPTIONS) when a browser says they
    come from another site: an Origin header that is neither the front's own origin nor one of `allowed`, or, with
    no Origin, Sec-Fetch-Site: cross-site. Requests without either header (curl, scripts) pass."""

    def __init__(self, app, allowed=()):
        self.app, self.allowed = app, {normal_origin(o) for o in allowed}

    def refusal(self, scope):
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return None
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is not None:
            origin = normal_origin(origin.decode("latin-1"))
            if origin == own_origin(scope) or origin in self.allowed:
                return None
            return f"cross-site request refused: Origin {origin[:200]} is not this page's origin"
        if headers.get(b"sec-fetch-site", b"").strip().lower() == b"cross-site":
            return "cross-site request refused: Sec-Fetch-Site is cross-site"
        return None

    async def __call__(self, scope, receive, send):
        reason = self.refusal(scope)
        if reason is not None:
            return await send_json(send, 403, {"error": reason, "status": 403})
        await self.app(scope, receive, send)
