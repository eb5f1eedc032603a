"""The OpenAI error shape: ``APIError`` and the app's exception handlers, engine failures as HTTP statuses, and
the body-size limit and response counting middleware."""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixroute.serve.engine import RequestTimeout, Unavailable

log = logging.getLogger("uvicorn.error")
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def install_handlers(app: FastAPI) -> None:
    """Every error the app answers takes the OpenAI shape; a validation error names the field."""

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        # pydantic puts union members' type tags ('str', 'list[str]') in the location: not field names
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and str(x) not in _TYPE_TAGS
               and "[" not in str(x) and "-" not in str(x)]
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg', 'invalid')}" if param else str(err.get("msg", "invalid request body"))
        return JSONResponse(error_body(msg, "invalid_request_error", param, err.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("mixroute: internal error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def engine_error(error: BaseException) -> BaseException:
    """An engine failure as the API answers it: an expert removed while the request waited is a 404, an
    engine that cannot serve now a 503, a request past its timeout a 504, vLLM's own refusals their status."""
    if isinstance(error, LookupError):
        return APIError(404, str(error), "model", "invalid_request_error", "model_not_found")
    if isinstance(error, Unavailable):
        return APIError(503, str(error), None, "server_error", "unavailable", headers={"Retry-After": "5"})
    if isinstance(error, RequestTimeout):
        return APIError(504, str(error), None, "server_error", "timeout")
    status = getattr(error, "status", None)
    if isinstance(status, int) and 400 <= status < 500:
        return APIError(status, str(error), None, "invalid_request_error", "engine_rejected")
    return error


class LimitAndCount:
    """Refuses bodies over the size limit (413) and counts every response by path and status. Plain ASGI, not
    ``@app.middleware``: Starlette's BaseHTTPMiddleware hides the client's disconnect from the endpoint, which
    needs it to cancel the request of a client that went away."""

    def __init__(self, app: Any, max_request_bytes: int, count: Any) -> None:
        self.app, self.max_request_bytes, self.count = app, max_request_bytes, count

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = dict(scope.get("headers") or []).get(b"content-length")
        status = 500

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if size is not None and (not size.isdigit() or int(size) > self.max_request_bytes):
                too_big = JSONResponse(error_body(f"request body larger than {self.max_request_bytes} bytes",
                                                  "invalid_request_error", None, "request_too_large"), status_code=413)
                await too_big(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.count(scope["path"], status)
