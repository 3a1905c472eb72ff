"""Runs a Starlette app (the API, an ingest process's monitoring endpoints) under uvicorn as a
start/stop service that its owner composes with others."""

import contextlib
from collections.abc import Generator

import uvicorn
from starlette.applications import Starlette


class _OwnedSignalsServer(uvicorn.Server):
    # The process owner handles SIGINT/SIGTERM and calls stop(); uvicorn must not take them.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiServer:
    def __init__(
        self,
        app: Starlette,
        *,
        host: str,
        port: int,
        access_log: bool = False,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="on",
            access_log=access_log,
            log_config=None,
            ssl_certfile=tls_cert_file,
            ssl_keyfile=tls_key_file,
        )
        self._server = _OwnedSignalsServer(config)

    @property
    def started(self) -> bool:
        return self._server.started

    async def run(self) -> None:
        await self._server.serve()
        if not self._server.started:
            raise RuntimeError("the API server did not start (see the log above)")

    def stop(self) -> None:
        self._server.should_exit = True
