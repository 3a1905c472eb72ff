"""The MQTT broker's access hooks, in the shape EMQX's HTTP authenticator and authorizer expect
(docs/access.md). Answers are 200 with `allow` or `deny`; the hooks need a broker key."""

from fastapi import APIRouter, Request, Response

from api.auth import check_broker
from api.broker_access import TopicRules, is_service, may_connect, moved_client
from api.deps import read_connection
from api.models import BrokerAnswer, BrokerAuthn, BrokerAuthz
from registry.moves import REASON as MOVED
from registry.moves import Moved

router = APIRouter(prefix="/broker", tags=["broker"])


# The answers, serialized once: the hooks are the API's hottest path (bench/api_requests.py).
_ANSWERS = {
    (allowed, superuser): BrokerAnswer(
        result="allow" if allowed else "deny", is_superuser=superuser
    ).model_dump_json(exclude_none=True)
    for allowed in (True, False)
    for superuser in (True, False)
}


def _answer(allowed: bool, *, superuser: bool = False) -> Response:
    return Response(_ANSWERS[allowed, superuser], media_type="application/json")


def _moved(moved: Moved) -> Response:
    """A denial that says why: the client's platform is served by another cell now (EMQX reads
    `result` and ignores the rest; its logs and a person reading the answer see the reason)."""
    answer = BrokerAnswer(result="deny", reason=MOVED, detail=moved.detail, moved_to=moved.cell)
    return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")


@router.post("/authenticate", operation_id="broker_authenticate", response_model=BrokerAnswer)
async def authenticate(body: BrokerAuthn, request: Request) -> Response:
    """May this client connect with this user name and password?"""
    check_broker(request)
    async with read_connection(request) as conn:
        if await is_service(conn, body.username, body.password):
            return _answer(True, superuser=True)
        if await may_connect(conn, body.username, body.password):
            return _answer(True)
        moved = await moved_client(conn, body.username)
    return _answer(False) if moved is None else _moved(moved)


@router.post("/authorize", operation_id="broker_authorize", response_model=BrokerAnswer)
async def authorize(body: BrokerAuthz, request: Request) -> Response:
    """May this (authenticated) client publish to, or subscribe to, this topic? Only while it
    still stands (docs/access.md)."""
    check_broker(request)
    rules: TopicRules = request.app.state.topic_rules
    allowed = await rules.may(request.app.state.pool, body.username, body.topic, body.action)
    if allowed:
        return _answer(True)
    async with read_connection(request) as conn:
        moved = await moved_client(conn, body.username)
    return _answer(False) if moved is None else _moved(moved)
