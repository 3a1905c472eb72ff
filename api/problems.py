"""RFC 9457 problem details: every error the API returns has this one shape."""

from http import HTTPStatus
from typing import Any

import orjson
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.types import Scope, Send

from registry.errors import Conflict, Invalid, NotFound, RegistryError

PROBLEM_JSON = "application/problem+json"


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, the body of every error."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[dict[str, Any]] | None = None


_DOCUMENTED = {
    401: "No API key, or an unknown or revoked one",
    403: "The key's role may not do this",
    404: "No such object (or not the key's platform)",
    409: "Conflicts with what exists",
    410: "The platform moved to another cell: `moved_to` names it (docs/operations.md)",
    413: "The request body is larger than the API accepts (`IIOT_API_MAX_BODY_BYTES`)",
    422: "The request is not valid",
    429: "The key's rate limit; retry after `Retry-After` seconds",
    503: "The store is unavailable; retry after `Retry-After` seconds",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": ProblemDetails,
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
    }
    for status, description in _DOCUMENTED.items()
}
_REGISTRY_STATUS = {NotFound: 404, Conflict: 409, Invalid: 422}


class Problem(Exception):
    """Raised by handlers; rendered as problem+json by the one handler below."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def _response(request: Request, status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


async def send_problem(scope: Scope, send: Send, problem: Problem) -> None:
    """Sends `problem` from plain ASGI code, outside FastAPI's exception handlers."""
    body = orjson.dumps(
        {
            "type": "about:blank",
            "title": problem.title,
            "status": problem.status,
            "detail": problem.detail,
            "instance": scope["path"],
        }
    )
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        response = _response(request, exc.status, exc.title, exc.detail, **exc.extra)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        response = _response(
            request, exc.status_code, HTTPStatus(exc.status_code).phrase, str(exc.detail)
        )
        # Starlette's own answers carry headers that belong to them: 405's Allow.
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RegistryError)
    async def _refused(request: Request, exc: RegistryError) -> JSONResponse:
        status = _REGISTRY_STATUS.get(type(exc), 400)
        return _response(request, status, HTTPStatus(status).phrase, str(exc))

    @app.exception_handler(psycopg.OperationalError)
    async def _store_down(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        response = _response(request, 503, "Service Unavailable", "the store is unavailable; retry")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(psycopg.DataError)
    async def _unstorable(request: Request, exc: psycopg.DataError) -> JSONResponse:
        # Values the request validation let through but the store cannot hold.
        detail = (exc.diag.message_primary or str(exc))[:500]
        return _response(
            request, 422, "Unprocessable Content", f"the store refused a value: {detail}"
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return _response(
            request, 422, "Unprocessable Content", "the request is not valid", errors=errors
        )
