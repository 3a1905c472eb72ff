"""The arithmetic of a consumer's progress, on a clock the test moves."""

from ingest.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_oldest_waiting_message_and_the_stall_follow_acknowledgements() -> None:
    clock = Clock()
    progress = Progress(clock)
    progress.start("p", 10)
    assert (progress.oldest_waiting(), progress.stalled()) == ({}, {})
    # Idle for a long time, then work arrives: the stall counts from its arrival.
    clock.now = 1000.0
    progress.received("p", 20, clock())  # offsets 10..19
    clock.now = 1005.0
    progress.received("p", 30, clock())  # 20..29
    progress.received("p", 25, clock())  # nothing new: ignored
    clock.now = 1010.0
    assert progress.oldest_waiting() == {"p": 10.0}
    assert progress.stalled() == {"p": 10.0}
    # Part of the first fetch committed: still the first fetch's age; the stall restarts.
    progress.acknowledged("p", 15)
    clock.now = 1012.0
    assert progress.oldest_waiting() == {"p": 12.0}
    assert progress.stalled() == {"p": 2.0}
    # Into the second fetch: its age.
    progress.acknowledged("p", 22)
    assert progress.oldest_waiting() == {"p": 7.0}
    # Everything: nothing waits, nothing stalls.
    progress.acknowledged("p", 30)
    clock.now = 2000.0
    assert (progress.oldest_waiting(), progress.stalled()) == ({}, {})
    # A stream given up is not this consumer's to report.
    progress.received("p", 40, clock())
    progress.forget("p")
    progress.received("p", 50, clock())
    assert progress.oldest_waiting() == {}
