"""The process composition: every service is stopped, in reverse order, whatever ended the run."""

import asyncio

import pytest

from iiot.services import Service, run_until


class Recorder:
    """A service that runs until stopped and records, in a shared list, when it was asked to stop
    and whether it then finished what it held."""

    def __init__(self, name: str, log: list[str], *, fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        await self._stopped.wait()
        await asyncio.sleep(0)  # finishing what it holds takes a turn of the loop
        self.log.append(f"{self.name} finished")

    def stop(self) -> None:
        self.log.append(f"{self.name} stop")
        self._stopped.set()


class Stubborn(Recorder):
    """Ignores stop(): only cancellation ends it."""

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.log.append(f"{self.name} cancelled")
            raise


async def test_the_stop_event_stops_every_service_in_reverse_order() -> None:
    log: list[str] = []
    services: list[Service] = [Recorder("consumer", log), Recorder("sweeper", log)]
    stop = asyncio.Event()
    stop.set()
    await run_until(stop, services)
    assert log[:2] == ["sweeper stop", "consumer stop"]
    assert sorted(log[2:]) == ["consumer finished", "sweeper finished"]


async def test_a_failing_service_lets_the_others_finish_then_raises() -> None:
    log: list[str] = []
    services: list[Service] = [Recorder("consumer", log), Recorder("monitor", log, fail=True)]
    with pytest.raises(ExceptionGroup) as raised:
        await run_until(asyncio.Event(), services)
    assert [str(e) for e in raised.value.exceptions] == ["monitor broke"]
    # A TaskGroup would have cancelled the consumer instead of letting it finish.
    assert "consumer finished" in log


async def test_a_service_that_ignores_stop_is_cancelled_after_the_grace_period() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    stop.set()
    await run_until(stop, [Stubborn("stuck", log)], grace_seconds=0.05)
    assert log == ["stuck stop", "stuck cancelled"]


async def test_cancelling_the_run_cancels_every_service() -> None:
    log: list[str] = []
    run = asyncio.create_task(run_until(asyncio.Event(), [Stubborn("stuck", log)]))
    await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert log == ["stuck cancelled"]
