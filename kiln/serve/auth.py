"""API key check on every route except /health (pure ASGI, in front of everything else).

The key is compared with `hmac.compare_digest` on bytes, so the time taken does not tell how
much of a guess was right. Accepted forms:

    Authorization: Bearer <key>                 OpenAI clients
    Authorization: Basic base64(<any>:<key>)    browsers: the web chat page at / answers an
                                                unauthenticated load with a Basic challenge,
                                                and the browser then sends the credentials
                                                on the page's own API calls too
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.serve.errors import error_bytes

EXEMPT_PATHS = frozenset({"/health"})


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name != b"authorization":
            continue
        scheme, _, credentials = value.partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer":
            return credentials.strip()
        if scheme == b"basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
            return decoded.partition(b":")[2]
        return None
    return None


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        # compare_digest on two byte strings; a missing key is compared too (against an
        # empty string), so "no header" and "wrong key" take the same path.
        if hmac.compare_digest(presented or b"", self._key) and presented is not None:
            await self.app(scope, receive, send)
            return
        # A browser loading the page gets a Basic challenge (it prompts for the key);
        # API clients get the OpenAI-style Bearer one.
        challenge = b'Basic realm="kiln", charset="UTF-8"' if scope.get("path") == "/" else b"Bearer"
        body = error_bytes(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", challenge),
        ]})
        await send({"type": "http.response.body", "body": body})
