"""One error class and one error shape for every answer that is not a success: `{"error": "..."}`.

A sentence that says what to do, in one line, with the status that fits:
400 (the upload, or a refused request), 403 (another page's Origin), 404 (a
result no longer on the server, an unknown slice or series), 408, 411/413,
422 (a parameter of the wrong type), 503 (full: with Retry-After), 500 (the
model side; logged without patient data). Never a server path.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

GONE = ("this result is no longer on the server (results are kept in memory for the last few studies "
        "only, and not across a restart): upload the study again")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, " ".join(message.split()), retry_after


def answer(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("query", "path", "body")]
    return ".".join(parts) or "the request"


def install(app: FastAPI) -> None:
    """The handlers that turn every error, FastAPI's own included, into the one shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return answer(exc.status, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [f"{_field(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()[:3]]
        return answer(422, "a parameter of the request is not valid (" + "; ".join(problems)
                      + "): see /api/openapi.json for what each endpoint takes")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        words = {404: "no such page or endpoint: the page's own links and /api/openapi.json list them",
                 405: "this endpoint does not take that method: /api/openapi.json lists what it takes"}
        return answer(exc.status_code, words.get(exc.status_code, str(exc.detail)))
