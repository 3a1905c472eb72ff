"""RFC 9457 problem details: every error the API returns has this one shape."""

from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from registry.errors import Conflict, Invalid, NotFound, RegistryError

PROBLEM_JSON = "application/problem+json"
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


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        response = _response(request, exc.status, exc.title, exc.detail, **exc.extra)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _response(
            request, exc.status_code, HTTPStatus(exc.status_code).phrase, str(exc.detail)
        )

    @app.exception_handler(RegistryError)
    async def _refused(request: Request, exc: RegistryError) -> JSONResponse:
        status = _REGISTRY_STATUS.get(type(exc), 400)
        return _response(request, status, HTTPStatus(status).phrase, str(exc))

    @app.exception_handler(psycopg.OperationalError)
    async def _store_down(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        response = _response(request, 503, "Service Unavailable", "the store is unavailable; retry")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return _response(
            request, 422, "Unprocessable Content", "the request is not valid", errors=errors
        )
