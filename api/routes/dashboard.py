"""The operator dashboard: a page and its script, served as files (api/dashboard/).

The files hold no data and need no key; the page reads everything from the API with the
operator's own key, so it shows exactly what that key may see.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(tags=["dashboard"], include_in_schema=False)
FILES = Path(__file__).parent.parent / "dashboard"
# Same-origin only, no inline script, nothing fetched from elsewhere.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/dashboard")
async def page() -> FileResponse:
    return FileResponse(FILES / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/dashboard/app.js")
async def script() -> FileResponse:
    return FileResponse(FILES / "app.js", media_type="text/javascript", headers=HEADERS)


@router.get("/dashboard/style.css")
async def style() -> FileResponse:
    return FileResponse(FILES / "style.css", media_type="text/css", headers=HEADERS)
