"""Soak benchmark: 90 days of a 10,000-device platform at compressed time, `iiot maintain` at
the end of each simulated day, and the store's size day by day (docs/operations.md).

What it does, on the machine's PostgreSQL in a schema of its own (dropped at the end):
1. For each simulated UTC day, from 90 days ago to today, writes what the day would leave in
   every growing table, back-dated to that day: telemetry (each device's readings), connection
   events (each device connecting and disconnecting), count samples every minute, per-batch
   usage rows (one batch a minute) with the daily totals, dead letters, reconciliation records.
   Rows go in with server-side INSERT ... SELECT: the figures are about the lifecycle, not about
   ingest's speed (the drain benchmarks measure that).
2. Runs maintenance as of the end of that day, as the hourly schedule would have.
3. Measures the schema's size on disk (tables, partitions and indexes).

It shows the size levelling off once the longest-kept large table reaches its retention
(telemetry, 30 days; connection events, kept 90 days, still grow a little), and that the
ledger's totals still equal the billed daily totals after every roll-up. Baseline in the same
run: the size the same days would take with no lifecycle (the rows written, at the bytes a row
measured before the first retention).
"""

import argparse
import asyncio
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.types.numeric import Int8

from bench.figures import Figure, record
from registry.lifecycle import LifecycleSettings
from registry.maintenance import maintain_once
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.store import connect

DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
PLATFORM = "soak"

# One simulated day; %(day)s is its midnight (UTC), %(devices)s the fleet, %(readings)s a
# device's readings in the day.
DAY = [
    """
    INSERT INTO telemetry (time, device_id, metric_id, value)
    SELECT %(day)s + r * (interval '1 day' / %(readings)s), d, 1, random()
    FROM generate_series(1, %(devices)s) d, generate_series(0, %(readings)s - 1) r
    """,
    """
    INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause)
    SELECT %(day)s + (d %% 86000) * interval '1 second' + s * interval '1 hour', %(platform)s,
           'device', d, CASE s WHEN 0 THEN 'online' ELSE 'offline' END, 'status'
    FROM generate_series(1, %(devices)s) d, generate_series(0, 1) s
    """,
    """
    INSERT INTO count_history (time, platform_id, registered, connected, ever_connected, seconds)
    SELECT %(day)s + m * interval '1 minute', %(platform)s, %(devices)s,
           %(devices)s / 2 + (m %% 97), %(devices)s, 60
    FROM generate_series(0, 1439) m
    """,
    """
    INSERT INTO usage_ledger (recorded_at, platform_id, day, source, messages, bytes, points,
                              duplicate_points, refused_messages)
    SELECT %(day)s + m * interval '1 minute', %(platform)s, %(day)s::date, 'mqtt',
           %(devices)s, %(devices)s * 200, %(devices)s * %(readings)s / 1440, m %% 3, m %% 2
    FROM generate_series(0, 1439) m
    """,
    """
    INSERT INTO usage_daily (platform_id, day, shard, messages, bytes, points, duplicate_points,
                             refused_messages)
    SELECT platform_id, day, 0, sum(messages), sum(bytes), sum(points), sum(duplicate_points),
           sum(refused_messages)
    FROM usage_ledger WHERE recorded_at >= %(day)s AND recorded_at < %(day)s + interval '1 day'
    GROUP BY platform_id, day
    """,
    """
    INSERT INTO dead_letters (received_at, source, topic, platform_id, reason, detail, payload)
    SELECT %(day)s + n * interval '1 minute', 'mqtt', 'iiot/v1/soak/d/data', %(platform)s,
           'bad_json', 'soak', 'not json'
    FROM generate_series(1, 100) n
    """,
    """
    INSERT INTO reconciliations (time, platforms, drift)
    SELECT %(day)s + n * interval '5 minutes', 1, '[]' FROM generate_series(0, 287) n
    """,
]
SCHEMA_BYTES = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')
"""
ROWS_WRITTEN = """
SELECT (SELECT count(*) FROM telemetry) + (SELECT count(*) FROM connection_events)
     + (SELECT count(*) FROM count_history) + (SELECT count(*) FROM usage_ledger)
     + (SELECT count(*) FROM dead_letters) + (SELECT count(*) FROM reconciliations)
"""
# Billed totals against the ledger's (per-batch and rolled-up rows): any day that differs.
LEDGER_DIFFERS = """
SELECT count(*) FROM (
    SELECT day, sum(messages), sum(bytes), sum(points), sum(duplicate_points),
           sum(refused_messages) FROM usage_daily GROUP BY day
    EXCEPT
    SELECT day, sum(messages), sum(bytes), sum(points), sum(duplicate_points),
           sum(refused_messages) FROM usage_ledger_days GROUP BY day
) differs
"""


async def soak(
    settings: LifecycleSettings, *, days: int, devices: int, readings: int
) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    first = today - timedelta(days - 1)
    sizes: list[int] = []
    maintain_seconds: list[float] = []
    written = 0
    bytes_per_row = 0.0
    async with await connect(settings, autocommit=True) as conn:
        await upsert_platform(conn, PLATFORM, name="Soak")
        await _maintain(settings, first - timedelta(1), maintain_seconds)  # partitions ahead
        for n in range(days):
            day = first + timedelta(n)
            async with conn.transaction():
                written += await _write_day(conn, day, devices=devices, readings=readings)
            if n == 0:  # before any retention: what a row costs with no lifecycle
                bytes_per_row = await _scalar(conn, SCHEMA_BYTES) / await _scalar(
                    conn, ROWS_WRITTEN
                )
            await _maintain(settings, day, maintain_seconds)
            sizes.append(await _scalar(conn, SCHEMA_BYTES))
            if n % 10 == 9 or n == days - 1:
                print(f"  day {n + 1:3}: {sizes[-1] / 2**20:8.1f} MiB", flush=True)
        differs = await _scalar(conn, LEDGER_DIFFERS)
    return {
        "days": days,
        "devices": devices,
        "readings_per_device_day": readings,
        "rows_written": written,
        "sizes_mib": [round(size / 2**20, 1) for size in sizes],
        "no_lifecycle_mib": round(written * bytes_per_row / 2**20, 1),
        "maintain_seconds_median": sorted(maintain_seconds)[len(maintain_seconds) // 2],
        "maintain_seconds_max": max(maintain_seconds),
        "ledger_days_differing": differs,
    }


async def _write_day(conn: AsyncConnection[Any], day: date, *, devices: int, readings: int) -> int:
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    # bigint: psycopg would send small numbers as smallint, and their products overflow it.
    params = {
        "day": midnight,
        "devices": Int8(devices),
        "readings": Int8(readings),
        "platform": PLATFORM,
    }
    rows = 0
    for statement in DAY:
        cur = await conn.execute(statement, params)
        rows += cur.rowcount if "usage_daily" not in statement else 0
    return rows


async def _maintain(settings: LifecycleSettings, day: date, seconds: list[float]) -> None:
    end_of_day = datetime(day.year, day.month, day.day, 23, 59, tzinfo=UTC)
    started = time.perf_counter()
    run = await maintain_once(settings, ingest_window=timedelta(days=7), now=end_of_day)
    seconds.append(round(time.perf_counter() - started, 3))
    if run is None or not run.succeeded:
        raise RuntimeError(f"maintenance of {day} failed: {run and run.summary()}")


async def _scalar(conn: AsyncConnection[Any], query: str) -> Any:
    row = await (await conn.execute(query)).fetchone()
    assert row is not None
    return row[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 days, 1,000 devices")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--readings", type=int, default=24, help="per device and day")
    parser.add_argument("--database-url", default=DATABASE_URL)
    args = parser.parse_args()
    if args.quick:
        args.days, args.devices = 40, 1_000
    settings = LifecycleSettings(
        database_url=args.database_url, database_schema=f"soak_{uuid.uuid4().hex[:8]}"
    )

    async def run() -> dict[str, Any]:
        await migrate(settings)
        try:
            return await soak(
                settings, days=args.days, devices=args.devices, readings=args.readings
            )
        finally:
            async with await psycopg.AsyncConnection.connect(
                args.database_url, autocommit=True
            ) as conn:
                await conn.execute(
                    sql.SQL("DROP SCHEMA {} CASCADE").format(
                        sql.Identifier(settings.database_schema)
                    )
                )

    print(f"soak: {args.days} days of a {args.devices:,}-device platform, maintained daily")
    result = asyncio.run(run())
    sizes = result["sizes_mib"]
    days = [d for d in (10, 30, 60, 90) if d <= len(sizes)]
    last = sizes[-1]
    result["last_10_days_growth"] = round(last / sizes[max(0, len(sizes) - 11)], 3)
    figures: list[Figure] = [
        (
            f"schema size at day {' / '.join(map(str, days))}",
            f"{' / '.join(str(sizes[d - 1]) for d in days)} MiB",
            "",
        ),
        ("size now / 10 days before", f"{result['last_10_days_growth']}", "<= 1.05 (level)"),
        ("size now / with no lifecycle", f"{last / result['no_lifecycle_mib']:.2f}",
         f"(no lifecycle: {result['no_lifecycle_mib']} MiB)"),
        ("maintenance run, median / max", f"{result['maintain_seconds_median']} / "
         f"{result['maintain_seconds_max']} s", ""),
        ("ledger days whose totals differ from billing", f"{result['ledger_days_differing']}",
         "0"),
    ]  # fmt: skip
    result["quick"] = args.quick
    record("soak", result, figures)


if __name__ == "__main__":
    main()
