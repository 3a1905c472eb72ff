"""What can go wrong in ingest, and what to do about it.

    IngestError
    ├── Rejected      the input is bad: record it as a dead letter with its reason; retrying
    │                 cannot help. Carries a stable `reason` code (docs/contract.md).
    ├── Retryable     the store or broker is unavailable: keep the unacknowledged messages and
    │                 try the same batch again later; nothing is acknowledged meanwhile.
    └── Unstorable    a refusal the store will not record either: stop consuming, acknowledge
                      nothing, and fail readiness; an operator must look at the message named.

Lower-layer exceptions (psycopg, aiomqtt) are translated into these at one place each:
`ingest.writer` for the store (classified by `ingest.isolation`), `ingest.mqtt` for the broker.
"""


class IngestError(Exception):
    """Base class of ingest errors."""


class Rejected(IngestError):
    """Bad input. Dead-letter it with `reason` (a stable code) and `detail` (for humans)."""

    def __init__(self, reason: str, detail: str, *, platform: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.platform = platform


class Retryable(IngestError):
    """A transient failure of a dependency: retry the same work later; acknowledge nothing."""


class Unstorable(IngestError):
    """A refused message whose dead letter the store refuses too. Consuming stops there (never
    a loop, never an acknowledgement of what was not stored); the message names where it is."""

    @staticmethod
    def first(group: BaseExceptionGroup["Unstorable"]) -> "Unstorable":
        """The first of a group, however deeply nested task groups wrapped it."""
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        assert isinstance(error, Unstorable)
        return error
