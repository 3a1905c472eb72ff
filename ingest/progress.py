"""How far a consumer has got: what it received and has not yet acknowledged, and whether it is
stuck (docs/contract.md, "Stalls").

A stream is what is acknowledged in order: one Kafka partition (positions are offsets), or one
MQTT session (positions count messages in arrival order). The consumer notes what arrived per
fetch or burst, not per message, and what it acknowledged per batch; the monitor reads the age
of the oldest message not yet acknowledged and how long a stream with work has gone without
progress (`/metrics`, `/readyz`).
"""

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Stream:
    acknowledged: int  # the position after the last acknowledged message
    received: int  # the position after the last received message
    progressed: float  # when a message was last acknowledged (or the stream started)
    # (first position, when noted) per fetch or burst, oldest first: what arrived since the
    # previous note, noted when the consumer took it up.
    arrivals: deque[tuple[int, float]] = field(default_factory=deque)


class Progress:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._streams: dict[Hashable, _Stream] = {}
        self.failure: str | None = None
        """Why the consumer stopped for good (a refusal it could not record), if it did."""

    def start(self, stream: Hashable, position: int) -> None:
        """A stream (re)starts at `position`: nothing before it is waiting any more."""
        self._streams[stream] = _Stream(position, position, self._clock())

    def forget(self, stream: Hashable) -> None:
        """The stream is no longer this consumer's (a revoked partition, a lost session)."""
        self._streams.pop(stream, None)

    def received(self, stream: Hashable, end: int, at: float) -> None:
        """Everything before `end` has arrived; what is new since the last call, by `at` (this
        object's clock: `now()`)."""
        state = self._streams.get(stream)
        if state is None or end <= state.received:
            return
        state.arrivals.append((state.received, at))
        state.received = end

    def acknowledged(self, stream: Hashable, end: int) -> None:
        """Everything before `end` is acknowledged (stored, and committed or acked)."""
        state = self._streams.get(stream)
        if state is None or end <= state.acknowledged:
            return
        state.acknowledged = end
        state.progressed = self._clock()
        arrivals = state.arrivals
        while len(arrivals) > 1 and arrivals[1][0] <= end:
            arrivals.popleft()
        if arrivals and end >= state.received:
            arrivals.clear()

    def now(self) -> float:
        return self._clock()

    def oldest_waiting(self) -> dict[Hashable, float]:
        """Per stream with work: seconds since its oldest message not yet acknowledged arrived."""
        now = self._clock()
        return {
            stream: now - state.arrivals[0][1]
            for stream, state in self._streams.items()
            if state.received > state.acknowledged and state.arrivals
        }

    def stalled(self) -> dict[Hashable, float]:
        """Per stream with work: seconds it has gone without acknowledging anything (counted
        from when the work arrived, if the stream was idle before)."""
        now = self._clock()
        return {
            stream: now - max(state.progressed, state.arrivals[0][1])
            for stream, state in self._streams.items()
            if state.received > state.acknowledged and state.arrivals
        }
