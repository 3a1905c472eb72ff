"""A cap on the size of request bodies, applied before anything reads them."""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import Problem, send_problem


class BodyTooLarge(HTTPException):
    """Raised by `receive` once a body streams past the cap; FastAPI re-raises it from its body
    reading and the problem handler answers 413 (api/problems.py)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimit:
    """Answers 413 to a body longer than `max_bytes`: at once when its `Content-Length` says so
    (nothing is read), else as soon as the chunks received pass it (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = BodyTooLarge(self.max_bytes)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        # The server (h11, httptools) has refused a malformed Content-Length already.
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_problem(scope, send, Problem(413, "Content Too Large", too_large.detail))
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)
