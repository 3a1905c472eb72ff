"""Prometheus metrics of an ingest process, read from its consumers at scrape time.

Nothing is counted twice on the hot path: the consumers keep plain totals (`IngestStats`,
Sparkplug session stats, Kafka lag) and this collector turns them into metrics when Prometheus
asks. `IIOT_METRICS_PORT` makes `iiot ingest ...` serve them on `/metrics` (iiot/monitor.py).
"""

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.progress import Progress
from ingest.sparkplug_host import SparkplugHost
from ingest.stats import IngestStats


class Consumer(Protocol):
    """What the collector reads from an MQTT or Kafka consumer."""

    stats: IngestStats
    sparkplug: SparkplugHost | None
    progress: Progress

    def queue_depth(self) -> int: ...

    def partition_lag(self) -> dict[tuple[str, int], int]: ...

    def subscribed_platforms(self) -> int | None: ...


class CellLabelled(Collector):
    """Every metric of `registry` with the label `cell` (`IIOT_CELL`) on each sample, and
    `iiot_cell_info{cell}` = 1: cells scraped by one Prometheus stay apart, whatever its
    scrape configuration (docs/operations.md, "Cells")."""

    def __init__(self, registry: CollectorRegistry, cell: str) -> None:
        self._registry = registry
        self._cell = cell

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("iiot_cell_info", "The cell this process serves.", labels=["cell"])
        info.add_metric([self._cell], 1)
        yield info
        for family in self._registry.collect():
            family.samples = [
                sample._replace(labels={"cell": self._cell, **sample.labels})
                for sample in family.samples
            ]
            yield family


def exposition(registry: CollectorRegistry, cell: str) -> bytes:
    """`registry`'s metrics in Prometheus' text format, labelled with the cell."""
    labelled = CollectorRegistry()
    labelled.register(CellLabelled(registry, cell))
    return generate_latest(labelled)


class IngestCollector(Collector):
    def __init__(self, consumers: Iterable[tuple[str, Consumer]]) -> None:
        """`consumers`: (source, consumer) pairs, source being "mqtt" or "kafka"."""
        self._consumers = list(consumers)

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "iiot_messages_received",
            "Messages (MQTT) or records (Kafka) received.",
            labels=["source"],
        )
        stored = CounterMetricFamily(
            "iiot_points_stored", "Points committed to the store.", labels=["source"]
        )
        duplicates = CounterMetricFamily(
            "iiot_duplicates_skipped",
            "Points already stored (redeliveries), not stored again.",
            labels=["source"],
        )
        registered = CounterMetricFamily(
            "iiot_devices_registered",
            "Devices registered on their first message.",
            labels=["source"],
        )
        rejected = CounterMetricFamily(
            "iiot_messages_rejected",
            "Messages refused into the dead-letter table.",
            labels=["source", "platform", "reason"],
        )
        foreign = CounterMetricFamily(
            "iiot_foreign_records",
            "Records for platforms this cell does not hold, on Kafka topics shared by cells "
            "(IIOT_KAFKA_SCOPE=platforms): another cell's, skipped, not dead-lettered.",
            labels=["source"],
        )
        platforms = GaugeMetricFamily(
            "iiot_mqtt_subscribed_platforms",
            "Platforms whose topics the MQTT session subscribes to (IIOT_MQTT_SCOPE=platforms).",
            labels=["source"],
        )
        queue = GaugeMetricFamily(
            "iiot_queue_depth", "Messages waiting between receive and write.", labels=["source"]
        )
        lag = GaugeMetricFamily(
            "iiot_kafka_lag", "Records behind the partition's end.", labels=["topic", "partition"]
        )
        oldest = GaugeMetricFamily(
            "iiot_oldest_unacked_seconds",
            "Age of the oldest message received and not yet acknowledged (MQTT) or committed "
            "(Kafka); 0 when none waits.",
            labels=["source"],
        )
        uncommitted = GaugeMetricFamily(
            "iiot_kafka_oldest_uncommitted_seconds",
            "Age of the partition's oldest record fetched and not yet committed; 0 when none.",
            labels=["topic", "partition"],
        )
        stalled = GaugeMetricFamily(
            "iiot_ingest_stalled_seconds",
            "How long the consumer has held messages without acknowledging any (the longest of "
            "its partitions); 0 when it makes progress or holds nothing.",
            labels=["source"],
        )
        failed = GaugeMetricFamily(
            "iiot_ingest_failed",
            "1 when the consumer stopped on a refusal the store would not record (see /readyz).",
            labels=["source"],
        )
        gaps = CounterMetricFamily(
            "iiot_sparkplug_seq_gaps",
            "Sparkplug seq numbers that never arrived.",
            labels=["source"],
        )
        rebirths = CounterMetricFamily(
            "iiot_sparkplug_rebirth_requests",
            "Rebirth requests the host asked for.",
            labels=["source"],
        )
        not_stored = CounterMetricFamily(
            "iiot_sparkplug_values_not_stored",
            "Sparkplug metric values not stored, by type: not numbers (String, Bytes, DataSet, "
            "Template, ...) or is_transient (type 'transient').",
            labels=["source", "type"],
        )
        restamped = CounterMetricFamily(
            "iiot_sparkplug_birth_values_restamped",
            "BIRTH values whose own time was outside the window, stored at the BIRTH's time.",
            labels=["source"],
        )
        histograms: dict[str, Metric] = {}
        for source, consumer in self._consumers:
            s = consumer.stats
            received.add_metric([source], s.messages)
            stored.add_metric([source], s.points_written)
            duplicates.add_metric([source], s.duplicates_skipped)
            registered.add_metric([source], s.devices_registered)
            for (platform, reason), count in sorted(
                s.rejected.items(), key=lambda item: (item[0][0] or "", item[0][1])
            ):
                rejected.add_metric([source, platform or "", reason], count)
            foreign.add_metric([source], s.foreign_records)
            if (subscribed := consumer.subscribed_platforms()) is not None:
                platforms.add_metric([source], subscribed)
            queue.add_metric([source], consumer.queue_depth())
            for (topic, partition), behind in sorted(consumer.partition_lag().items()):
                lag.add_metric([topic, str(partition)], behind)
            progress = consumer.progress
            waiting = progress.oldest_waiting()
            oldest.add_metric([source], max(waiting.values(), default=0.0))
            if source == "kafka":
                owned: set[tuple[str, int]] = set(consumer.partition_lag())
                owned.update(tp for tp in waiting if isinstance(tp, tuple))
                for topic, partition in sorted(owned):
                    age = waiting.get((topic, partition), 0.0)
                    uncommitted.add_metric([topic, str(partition)], age)
            stalled.add_metric([source], max(progress.stalled().values(), default=0.0))
            failed.add_metric([source], int(progress.failure is not None))
            if consumer.sparkplug is not None:
                spb = consumer.sparkplug.sessions.stats
                gaps.add_metric([source], spb.gaps)
                rebirths.add_metric([source], spb.rebirth_requests)
                restamped.add_metric([source], spb.birth_values_restamped)
                for kind, count in sorted(spb.not_stored.items()):
                    not_stored.add_metric([source, kind], count)
            _merge_histograms(histograms, s, source)
        yield from (received, stored, duplicates, registered, rejected, foreign, platforms)
        yield from (queue, lag)
        yield from (oldest, uncommitted, stalled, failed, gaps, rebirths, not_stored, restamped)
        yield from histograms.values()


def _merge_histograms(histograms: dict[str, Metric], stats: IngestStats, source: str) -> None:
    """Adds a consumer's histograms to `histograms` (one family per name), labelled `source`."""
    for histogram in (stats.batch_points, stats.write_seconds, stats.delay_seconds):
        for family in histogram.collect():
            merged = histograms.setdefault(family.name, family)
            labelled = [
                sample._replace(labels={**sample.labels, "source": source})
                for sample in family.samples
            ]
            if merged is family:
                family.samples = labelled
            else:
                merged.samples += labelled
