from fastapi import APIRouter

from api.deps import Connection
from api.models import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="health", response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", operation_id="ready", response_model=Health)
async def readyz(conn: Connection) -> Health:
    """The process can reach the store."""
    await conn.execute("SELECT 1")
    return Health(status="ready")
