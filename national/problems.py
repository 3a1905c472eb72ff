"""RFC 9457 problem details for the aggregator's API, the one error shape, as the cell API has
them (api/problems.py, which the aggregator does not import: it runs apart from any cell).
`type` names the reason (`/problems/replayed`, ...; docs/national.md lists them)."""

from http import HTTPStatus
from typing import Any, Final

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from national.intake import Refused

PROBLEM_JSON: Final = "application/problem+json"


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, the body of every error."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str


class Problem(Exception):
    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


_DOCUMENTED: Final = {
    401: "No national viewer key, or an unknown or revoked one; for /snapshots: a bad signature",
    403: "/snapshots: the cell is not registered here",
    409: "/snapshots: a replayed or out-of-order sequence number (see `next_sequence`)",
    422: "The request is not valid",
    503: "The aggregator's database is unavailable; retry after `Retry-After` seconds",
}
ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    status: {
        "model": ProblemDetails,
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
    }
    for status, description in _DOCUMENTED.items()
}


def response(
    request: Request, status: int, detail: str, *, type_: str = "about:blank", **extra: Any
) -> JSONResponse:
    body = {
        "type": type_,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        answer = response(request, exc.status, exc.detail)
        answer.headers.update(exc.headers)
        return answer

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        extra: dict[str, Any] = {"reason": exc.reason}
        if exc.next_sequence is not None:
            extra["next_sequence"] = exc.next_sequence
        if exc.sequence is not None:
            extra["sequence"] = exc.sequence
        return response(request, exc.status, exc.detail, type_=exc.type, **extra)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        answer = response(request, exc.status_code, str(exc.detail))
        answer.headers.update(exc.headers or {})
        return answer

    @app.exception_handler(psycopg.OperationalError)
    async def _down(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        answer = response(request, 503, "the aggregator's database is unavailable; retry")
        answer.headers["Retry-After"] = "5"
        return answer

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return response(request, 422, "the request is not valid", errors=errors)
