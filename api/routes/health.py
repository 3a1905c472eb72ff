from fastapi import APIRouter, Request

from api.deps import Cell, Connection
from api.models import Health
from api.problems import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="health", response_model=Health)
async def healthz(cell: Cell) -> Health:
    """The process is alive."""
    return Health(status="ok", cell=cell)


@router.get("/readyz", operation_id="ready", response_model=Health)
async def readyz(request: Request, conn: Connection, cell: Cell) -> Health:
    """The process can reach the store (else 503), and the consumers running in the same
    process (`iiot run`) are connected."""
    await conn.execute("SELECT 1")
    waiting = [name for name, ready in request.app.state.consumers if not ready()]
    if waiting:
        raise Problem(
            503, "Service Unavailable", f"cell {cell}: not connected yet: {', '.join(waiting)}"
        )
    return Health(status="ready", cell=cell)
