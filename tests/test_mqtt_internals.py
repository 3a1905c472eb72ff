"""The start-up check of paho's and aiomqtt's private attributes (ingest/mqtt_internals.py).

The installed releases are the tested ones: nothing is missing. Releases that lack something
are imitated by taking it away here; ingest on paho's public path is tested against the real
broker in test_mqtt_ingest.py, test_redelivery.py and test_sparkplug_conformance.py."""

import logging
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.client import Client as PahoClient

from ingest.mqtt_internals import missing, paho_of, use_fast_path


async def test_the_installed_releases_have_every_internal_used() -> None:
    assert missing() == []
    assert use_fast_path(True)


async def test_paho_2_1_is_taken_for_what_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """paho 2.1 kept the keepalive's clock as `_last_msg_in`: the speedups would set a time
    paho never reads, and keepalive would break without a word."""
    init = PahoClient.__init__

    def paho_2_1(self: PahoClient, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._last_msg_in = vars(self).pop("_last_bytes_received")  # type: ignore[attr-defined]

    monkeypatch.setattr(PahoClient, "__init__", paho_2_1)
    monkeypatch.delattr(PahoClient, "_packet_queue")
    with caplog.at_level(logging.WARNING, logger="ingest.mqtt_internals"):
        assert not use_fast_path(True)
    assert missing() == ["paho Client._last_bytes_received", "paho Client._packet_queue"]
    assert "paho Client._last_bytes_received, paho Client._packet_queue" in caplog.text
    assert "tested with paho-mqtt 2.2.0, aiomqtt 2.5.1" in caplog.text


async def test_aiomqtt_without_its_queue_or_paho_client(monkeypatch: pytest.MonkeyPatch) -> None:
    init = aiomqtt.Client.__init__

    def without(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        del self._queue, self._client

    monkeypatch.setattr(aiomqtt.Client, "__init__", without)
    assert missing() == ["aiomqtt Client._queue"]
    # Without its paho client no acknowledgement can wait for the commit: ingest refuses.
    with pytest.raises(RuntimeError, match="keeps no paho client"):
        paho_of(aiomqtt.Client("127.0.0.1"))


async def test_the_setting_turns_the_speedups_off_without_a_check(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(PahoClient, "_packet_queue")
    with caplog.at_level(logging.WARNING, logger="ingest.mqtt_internals"):
        assert not use_fast_path(False)
    assert caplog.text == ""
