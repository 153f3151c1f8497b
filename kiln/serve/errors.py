"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Every failure the server answers with goes through here, so a client sees one shape whatever
went wrong: validation (400), auth (401), unknown model or route (404), limits (413, 431),
overload or not ready (503), and kiln bugs (500, with no internals in the message).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("kiln.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    431: "invalid_request_error",
    503: "service_unavailable",
}
# Longest error message sent back: a message never grows with the request that caused it.
MAX_MESSAGE_CHARS = 2048


class APIError(Exception):
    """Raised by handlers; answered as an OpenAI error with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return {"error": {
        "message": message,
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": code,
    }}


def error_bytes(status: int, message: str, code: str | None = None) -> bytes:
    """The same body as raw JSON, for the ASGI middlewares that answer before FastAPI."""
    return json.dumps(error_body(status, message, code=code)).encode()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status, headers=error.headers,
    )


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    first_param = None
    for item in error.errors()[:8]:
        if item.get("type") == "json_invalid":  # not a field's fault: the body is not JSON
            detail = (item.get("ctx") or {}).get("error", "not valid JSON")
            return f"invalid JSON in the request body: {detail}", None
        # loc starts with "body"/"query"; the rest names the field. The input itself is
        # never echoed: it may be megabytes, or bytes a terminal should not print.
        location = [str(part) for part in item.get("loc", ())[1:]]
        param = ".".join(location) or None
        first_param = first_param or param
        problems.append(f"{param or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed body with 400, not FastAPI's 422.
        message, param = _validation_message(error)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(error.status_code, str(error.detail)),
                            status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request handler")
        return JSONResponse(error_body(500, "internal server error"), status_code=500)
