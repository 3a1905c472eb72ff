"""Logging of every process role: structured JSON lines, or readable lines for a terminal.

The code logs through the standard library (`logging.getLogger(__name__)`); structlog renders
each record with its level, time, logger, the fields passed as `extra` (platform, device, topic,
reason) and the context bound for the work in progress (the writer binds each batch's id).
`IIOT_LOG_FORMAT=json` (default) for collectors, `console` for people (`iiot run`).
"""

import logging
from typing import IO, Literal

import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict


class LogSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IIOT_", extra="ignore")

    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def configure(
    settings: LogSettings | None = None, *, verbose: bool = False, stream: IO[str] | None = None
) -> None:
    """Renders every record to `stream` (default standard error)."""
    settings = settings or LogSettings()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else settings.log_level)
    # Per-request lines belong to the access log of a proxy; uvicorn's errors stay.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # httpx logs every request at info: a cell's pusher would log each snapshot it sends (its
    # own outcome lines and metrics say what matters).
    logging.getLogger("httpx").setLevel(logging.WARNING)
