"""`/metrics` of the API: the store's figures in Prometheus format.

Ingest processes export their own traffic (ingest/metrics.py); the API exports what only the
store knows: per-platform counts (labelled by tier, type and region, so dashboards can sum
them), the drift the latest reconciliation found, and each Kafka partition's lag as stored
with its last batch. Everything is read from maintained figures; nothing counts devices.
Table sizes, their oldest rows and the last maintenance run show that the lifecycle keeps the
store within its disk (docs/operations.md).
"""

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from api.auth import Caller, check_national
from api.deps import Connection, Settings
from ingest.certificates import CertificateExpiry
from ingest.metrics import exposition
from national.cell.outbox import outbox_figures
from registry.counts import platform_gauges
from registry.kafka_offsets import partition_lag
from registry.maintenance import last_runs, table_figures
from registry.reconcile import recent_reconciliations

router = APIRouter(tags=["health"])


class _Snapshot(Collector):
    """Metric families gathered for one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Any:
        return iter(self._families)


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(conn: Connection, caller: Caller, settings: Settings) -> Response:
    """Connected, registered and active devices per platform, counter drift and Kafka lag,
    in Prometheus' text format (keys for all platforms: Prometheus scrapes with a national
    viewer key)."""
    check_national(caller)
    labels = ["platform", "tier", "type", "region"]
    figures = {
        name: GaugeMetricFamily(f"iiot_devices_{name}", doc, labels=labels)
        for name, doc in (
            ("registered", "Registered devices (docs/counts.md)."),
            ("connected", "Connected devices (docs/counts.md)."),
            ("ever_connected", "Devices connected at least once."),
            ("active_24h", "Devices connected within the last 24 hours."),
            ("active_30d", "Devices connected within the last 30 days."),
        )
    }
    for row in await platform_gauges(conn):
        key = [row.platform, row.tier, row.type, row.region]
        for name, family in figures.items():
            family.add_metric(key, getattr(row, name))

    drift = GaugeMetricFamily(
        "iiot_counter_drift",
        "Counter minus recount per platform, as the latest reconciliation found (and fixed).",
        labels=["platform", "count"],
    )
    last_run = GaugeMetricFamily(
        "iiot_reconciliation_timestamp_seconds", "When the latest reconciliation ran."
    )
    # One family for every background task whose runs the store records, so one alert covers
    # them: a task that stopped completing is a maintenance failure.
    maintenance = GaugeMetricFamily(
        "iiot_maintenance_last_success_timestamp_seconds",
        "When each maintenance task last completed.",
        labels=["task"],
    )
    latest = await recent_reconciliations(conn, limit=1)
    if latest:
        last_run.add_metric([], latest[0].time.timestamp())
        maintenance.add_metric(["reconcile"], latest[0].time.timestamp())
        for d in latest[0].drift:
            for count in ("registered", "connected", "ever_connected"):
                drift.add_metric([d.platform, count], getattr(d, count))

    lag = GaugeMetricFamily(
        "iiot_kafka_stored_lag",
        "Records behind the partition's end when its offset was last stored.",
        labels=["group", "topic", "partition"],
    )
    for p in await partition_lag(conn):
        if p.lag is not None:
            lag.add_metric([p.group_id, p.topic, str(p.partition)], p.lag)

    registry = CollectorRegistry()
    lifecycle = await _lifecycle(conn, maintenance)
    national = await _national(conn)
    families = [*figures.values(), drift, last_run, maintenance, lag, *lifecycle, *national]
    registry.register(_Snapshot(families))
    registry.register(CertificateExpiry(settings.certificate_files()))
    return Response(exposition(registry, settings.cell), media_type=CONTENT_TYPE_LATEST)


async def _lifecycle(conn: Any, maintenance: GaugeMetricFamily) -> list[Metric]:
    """The tables' sizes and oldest rows, and the latest `iiot maintain` run; its latest success
    joins the other tasks' in `maintenance` as task "lifecycle"."""
    size = GaugeMetricFamily(
        "iiot_table_size_bytes",
        "A growing table on disk, partitions and indexes included.",
        labels=["table"],
    )
    oldest = GaugeMetricFamily(
        "iiot_table_oldest_timestamp_seconds",
        "Its oldest row (for tables partitioned by day: the start of the oldest day held).",
        labels=["table"],
    )
    for table in await table_figures(conn):
        size.add_metric([table.table], table.bytes)
        if table.oldest is not None:
            oldest.add_metric([table.table], table.oldest.timestamp())
    runs = await last_runs(conn)
    finished = GaugeMetricFamily(
        "iiot_maintenance_last_run_timestamp_seconds", "When the latest maintenance run ended."
    )
    succeeded = GaugeMetricFamily(
        "iiot_maintenance_last_run_success", "1 when every step of the latest run succeeded."
    )
    if runs.finished_at is not None:
        finished.add_metric([], runs.finished_at.timestamp())
        succeeded.add_metric([], 1.0 if runs.succeeded else 0.0)
    if runs.last_success is not None:
        maintenance.add_metric(["lifecycle"], runs.last_success.timestamp())
    return [size, oldest, finished, succeeded]


async def _national(conn: Any) -> list[Metric]:
    """The cell's national snapshots (national/cell/outbox.py): built, delivered, waiting, and
    why deliveries failed. Alert on a rising oldest undelivered age or on a halt."""
    figures = await outbox_figures(conn)
    built = GaugeMetricFamily(
        "iiot_national_snapshots_built", "The last snapshot sequence number this cell took."
    )
    built.add_metric([], figures.built)
    delivered = GaugeMetricFamily(
        "iiot_national_snapshots_delivered",
        "Every snapshot up to this sequence number is with the national aggregator.",
    )
    delivered.add_metric([], figures.delivered)
    waiting = GaugeMetricFamily(
        "iiot_national_outbox_undelivered", "Snapshots kept until the aggregator takes them."
    )
    waiting.add_metric([], figures.undelivered)
    oldest = GaugeMetricFamily(
        "iiot_national_outbox_oldest_undelivered_timestamp_seconds",
        "When the oldest undelivered snapshot was taken (absent: none waits).",
    )
    if figures.oldest_undelivered is not None:
        oldest.add_metric([], figures.oldest_undelivered.timestamp())
    failures = CounterMetricFamily(
        "iiot_national_push_failures",
        "Snapshots not built or not delivered, by reason (docs/operations.md).",
        labels=["reason"],
    )
    for reason, (count, _) in figures.failures.items():
        failures.add_metric([reason], count)
    halted = GaugeMetricFamily(
        "iiot_national_delivery_halted",
        "1 while delivery is halted for an operator (`iiot national push --resume`).",
        labels=["reason"],
    )
    if figures.halt is not None:
        halted.add_metric([figures.halt.reason], 1.0)
    return [built, delivered, waiting, oldest, failures, halted]
