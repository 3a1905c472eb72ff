"""Table lifecycle on the real PostgreSQL (docs/operations.md): `iiot maintain` with the default
retention, the migration that partitions the event tables, and the command itself."""

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from iiot.services import ingest_services
from ingest.settings import IngestSettings
from registry.history import history
from registry.lifecycle import LifecycleSettings
from registry.maintenance import Maintainer, last_runs, maintain_once
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect
from registry.usage import usage_days
from tests.conftest import eventually, scalar
from tests.test_deploy import DEPLOY, K8S, check_cli, compose
from tests.test_metrics import samples

NOW = datetime.now(UTC)
TODAY = NOW.date()
WINDOW = timedelta(days=7)  # ingest's default time window
# Days back: 0 and 1 are untouched by every lifecycle; 40 and 100 by some; 800 by all.
AGES = (0, 1, 40, 100, 800)
PLATFORMS = ("plant-1", "plant-2")


def noon(age: int) -> datetime:
    day = TODAY - timedelta(age)
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def age_of(column: str) -> sql.Composed:
    """A row's age in whole UTC days before today."""
    return sql.SQL("(%s::date - ({} AT TIME ZONE 'UTC')::date)").format(sql.Identifier(column))


async def ages(db: psycopg.AsyncConnection[Any], table: str, column: str) -> list[int]:
    query = sql.SQL("SELECT DISTINCT {age} FROM {table} ORDER BY 1").format(
        age=age_of(column), table=sql.Identifier(table)
    )
    cur = await db.execute(query, (TODAY,))
    return [row[0] for row in await cur.fetchall()]


async def rows(db: psycopg.AsyncConnection[Any], query: str, *params: Any) -> list[Any]:
    cur = await db.execute(query, params or None)
    return list(await cur.fetchall())


async def arrange(db: psycopg.AsyncConnection[Any]) -> None:
    """Rows of every age in every growing table. Days 1 and 100 get daily partitions first;
    the others land in the default partitions (no partition covers them), as rows written while
    maintenance made no partitions would."""
    for platform in PLATFORMS:
        await upsert_platform(db, platform, name=platform)
    for table in ("connection_events", "count_history", "usage_ledger"):
        for age in (1, 100):
            day = TODAY - timedelta(age)
            await db.execute("SELECT iiot_ensure_daily_partitions(%s, %s, %s)", (table, day, day))
    for age in AGES:
        at = noon(age)
        day = at.date()
        await db.execute("SELECT iiot_ensure_telemetry_partitions(%s, %s)", (day, day))
        await db.execute("INSERT INTO telemetry VALUES (%s, 1, 1, %s)", (at, float(age)))
        await db.execute(
            "INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause)"
            " VALUES (%s, 'plant-1', 'device', 1, 'online', 'data')",
            (at,),
        )
        await db.execute(
            "INSERT INTO dead_letters (received_at, source, topic, platform_id, reason, detail,"
            " payload) SELECT %s, 'mqtt', 'iiot/v1/plant-1/d/data', 'plant-1', 'bad_json',"
            " 'detail', 'payload'",
            (at,),
        )
        await db.execute(
            "INSERT INTO reconciliations (time, platforms, drift) VALUES (%s, 2, '[]')", (at,)
        )
        for platform in PLATFORMS:
            # Minute samples over three hours, the count moving; the hour's first minute too.
            await db.execute(
                "INSERT INTO count_history (time, platform_id, registered, connected,"
                " ever_connected, seconds)"
                " SELECT %s + m * interval '1 minute', %s, 1000 + m, (m * 37) %% 500, 900, 60"
                " FROM generate_series(0, 179) m",
                (at - timedelta(hours=1), platform),
            )
            # Three batches recorded on that day: two of that usage day, one of the day before.
            for batch, usage_day in enumerate((day, day, day - timedelta(1))):
                figures = (10 + batch, 1000 + age, 50 + batch, batch, age % 3)
                await db.execute(
                    "INSERT INTO usage_ledger (recorded_at, platform_id, day, source, messages,"
                    " bytes, points, duplicate_points, refused_messages)"
                    " VALUES (%s, %s, %s, 'mqtt', %s, %s, %s, %s, %s)",
                    (at + timedelta(minutes=batch), platform, usage_day, *figures),
                )
                await db.execute(
                    "INSERT INTO usage_daily AS u (platform_id, day, shard, messages, bytes,"
                    " points, duplicate_points, refused_messages)"
                    " VALUES (%s, %s, 0, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (platform_id, day, shard) DO UPDATE SET"
                    " messages = u.messages + excluded.messages, bytes = u.bytes + excluded.bytes,"
                    " points = u.points + excluded.points,"
                    " duplicate_points = u.duplicate_points + excluded.duplicate_points,"
                    " refused_messages = u.refused_messages + excluded.refused_messages",
                    (platform, usage_day, *figures),
                )


async def billing(db: psycopg.AsyncConnection[Any]) -> Any:
    """Every figure billing and charts read, over all the days arranged."""
    # From the oldest day still held (past 2 years the count history is gone by design).
    start, end = TODAY - timedelta(102), TODAY + timedelta(1)
    charts = [
        (b.start, b.connected_min, b.connected_max, b.connected_last, b.registered_last)
        for platform in PLATFORMS
        for b in await history(
            db, platform, _midnight(start), NOW + timedelta(1), timedelta(hours=1)
        )
    ]
    return (
        await usage_days(db, platform=None, start=start, end=end),
        await rows(db, "SELECT * FROM usage_ledger_days ORDER BY platform_id, day"),
        await rows(db, "SELECT * FROM platform_totals ORDER BY id"),
        charts,
    )


async def test_maintenance_applies_each_tables_lifecycle_once(
    store: StoreSettings, db: psycopg.AsyncConnection[Any]
) -> None:
    await arrange(db)
    before = await billing(db)
    assert all(before), before  # there is something to compare
    settings = LifecycleSettings(**store.model_dump())

    run = await maintain_once(settings, ingest_window=WINDOW)

    assert run is not None
    assert run.succeeded, run.summary()
    # Telemetry 30 days, connection events 90, dead letters 30, reconciliations 90.
    assert await ages(db, "telemetry", "time") == [0, 1]
    assert await ages(db, "connection_events", "time") == [0, 1, 40]
    assert await ages(db, "dead_letters", "received_at") == [0, 1]
    assert await ages(db, "reconciliations", "time") == [0, 1, 40]
    # Partitions went whole, not row by row; the default partitions lost their old rows.
    assert await scalar(db, "SELECT count(*) FROM connection_events_default") == 1  # age 40
    partition = f"connection_events_{TODAY - timedelta(100):%Y%m%d}"
    assert await scalar(db, "SELECT to_regclass(%s)", partition) is None
    # Count history: minutes for 7 days, hours beyond, nothing past 2 years.
    samples = await rows(
        db,
        sql.SQL(
            "SELECT {age}, platform_id, count(*), min(seconds), max(seconds) FROM count_history"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        )
        .format(age=age_of("time"))
        .as_string(db),
        TODAY,
    )
    minutes, hours = (180, 60, 60), (3, 3600, 3600)
    assert samples == [
        (age, platform, *(minutes if age < 7 else hours))
        for age in AGES[:-1]
        for platform in PLATFORMS
    ]
    # The ledger: per-batch rows of settled days (7) rolled into daily rows; the rest untouched.
    assert await ages(db, "usage_ledger", "recorded_at") == [0, 1]
    assert await scalar(db, "SELECT sum(batches) FROM usage_ledger_daily") == 3 * 3 * 2
    # Billing, ledger totals, counts and charts: identical.
    assert await billing(db) == before

    # Yesterday's rows are untouched: still every minute and every batch.
    assert await scalar(
        db, "SELECT count(*) FROM usage_ledger WHERE recorded_at >= %s", noon(1).replace(hour=0)
    ) == 2 * 3 * 2  # fmt: skip

    snapshot = [
        await rows(db, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("count_history", "usage_ledger_daily", "connection_events", "dead_letters")
    ]
    again = await maintain_once(settings, ingest_window=WINDOW)
    assert again is not None
    assert again.succeeded
    assert [step for step in again.steps if step.count] == []
    assert again.summary().endswith("nothing to do")
    assert snapshot == [
        await rows(db, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("count_history", "usage_ledger_daily", "connection_events", "dead_letters")
    ]
    assert await billing(db) == before
    recorded = await last_runs(db)
    assert recorded.succeeded
    assert recorded.last_success == recorded.finished_at
    assert await scalar(db, "SELECT count(*) FROM maintenance_runs WHERE succeeded") == 2


async def test_telemetry_retention_never_shorter_than_the_ingest_window(
    store: StoreSettings,
) -> None:
    settings = LifecycleSettings(**store.model_dump(), retention_telemetry_days=5)
    with pytest.raises(ValueError, match="IIOT_RETENTION_TELEMETRY_DAYS"):
        await maintain_once(settings, ingest_window=WINDOW)


@pytest.fixture
async def schema_at_0025(database_url: str, unique: str) -> AsyncIterator[StoreSettings]:
    """A schema migrated up to, not including, the partitioning of the event tables."""
    settings = StoreSettings(database_url=database_url, database_schema=f"t_{unique}")
    await migrate(settings, through=25)
    yield settings
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(settings.database_schema))
        )


EVENT_TABLES = {
    "connection_events": "SELECT * FROM connection_events ORDER BY id",
    "count_history": "SELECT time, platform_id, registered, connected, ever_connected, seconds"
    " FROM count_history ORDER BY platform_id, time",
    "usage_ledger": "SELECT * FROM usage_ledger ORDER BY id",
}


async def test_migration_partitions_tables_holding_rows(schema_at_0025: StoreSettings) -> None:
    """Rows of 400 days ago (before any partition it makes), of the last weeks and of a far
    future (a device clock) all carry over with their ids, and writers go on afterwards."""
    times = [NOW - timedelta(days=d, minutes=m) for d in (400, 20, 1, 0) for m in range(3)]
    times.append(datetime(2099, 1, 1, tzinfo=UTC))
    async with await connect(schema_at_0025, autocommit=True) as db:
        await upsert_platform(db, "plant-1", name="Plant 1")
        for at in times:
            await db.execute(
                "INSERT INTO connection_events (time, platform_id, subject, subject_id, state,"
                " cause) VALUES (%s, 'plant-1', 'gateway', 7, 'offline', 'death')",
                (at,),
            )
            await db.execute(
                "INSERT INTO count_history (time, platform_id, registered, connected,"
                " ever_connected) VALUES (%s, 'plant-1', 5, 4, 5)",
                (at,),
            )
            await db.execute(
                "INSERT INTO usage_ledger (recorded_at, platform_id, day, source, messages,"
                " bytes, points, duplicate_points, refused_messages)"
                " VALUES (%s, 'plant-1', %s, 'kafka', 1, 2, 3, 4, 5)",
                (at, at.date()),
            )
        before = {table: await rows(db, query) for table, query in EVENT_TABLES.items()}

    assert [m.version for m in await migrate(schema_at_0025, through=26)] == [26]

    async with await connect(schema_at_0025, autocommit=True) as db:
        for table, query in EVENT_TABLES.items():
            assert await rows(db, query) == before[table], table
            assert (
                await scalar(db, "SELECT relkind FROM pg_class WHERE oid = %s::regclass", table)
                == "p"
            )
            # A year back to a week ahead in daily partitions; 400 days ago and 2099 by default.
            assert await scalar(db, f"SELECT count(*) FROM {table}_default") == 4
            partitions = await rows(db, "SELECT day FROM iiot_daily_partitions(%s)", table)
            assert partitions[0][0] == TODAY - timedelta(366)
            assert partitions[-1][0] == TODAY + timedelta(7)
        # New rows take ids after the copied ones, and the ledger is still append-only.
        new_id = await scalar(
            db,
            "INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause)"
            " VALUES (now(), 'plant-1', 'device', 1, 'online', 'data') RETURNING id",
        )
        assert new_id == max(row[0] for row in before["connection_events"]) + 1
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await db.execute("DELETE FROM usage_ledger")


async def test_maintain_command_runs_once_and_waits_for_no_one(
    store: StoreSettings, db: psycopg.AsyncConnection[Any]
) -> None:
    """`iiot maintain --once` in a process of its own: a summary, the run recorded; while
    another runner holds the lock it does nothing and says so."""
    env = {
        **os.environ,
        "IIOT_DATABASE_URL": str(store.database_url),
        "IIOT_DATABASE_SCHEMA": store.database_schema,
    }

    async def maintain() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iiot.cli", "maintain", "--once",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    await db.execute("SELECT pg_advisory_lock(hashtext(current_schema() || '.iiot_maintain'))")
    code, out = await maintain()
    assert (code, "another process is running maintenance" in out) == (0, True), out
    assert await scalar(db, "SELECT count(*) FROM maintenance_runs") == 0
    await db.execute("SELECT pg_advisory_unlock(hashtext(current_schema() || '.iiot_maintain'))")

    code, out = await maintain()
    assert code == 0, out
    assert "maintenance succeeded" in out
    assert await scalar(db, "SELECT count(*) FROM maintenance_runs WHERE succeeded") == 1


async def test_metrics_show_tables_and_the_last_runs_outcome(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], api: httpx.AsyncClient
) -> None:
    """/metrics: table sizes, oldest rows, the last run and its outcome; a run whose step
    cannot get its lock (a long query holds the table) fails, and says so."""
    await arrange(db)
    settings = LifecycleSettings(**store.model_dump(), maintain_lock_timeout_seconds=0.2)

    got = samples((await api.get("/metrics")).text)
    assert (
        "iiot_maintenance_last_success_timestamp_seconds",
        frozenset({("task", "lifecycle")}),
    ) not in got
    assert got[("iiot_table_oldest_timestamp_seconds", frozenset({("table", "telemetry")}))] == (
        noon(800).replace(hour=0).timestamp()  # the day its partition starts
    )

    first = await maintain_once(settings, ingest_window=WINDOW)
    assert first is not None
    assert first.succeeded
    got = samples((await api.get("/metrics")).text)
    oldest = {
        dict(labels)["table"]: value
        for (name, labels), value in got.items()
        if name == "iiot_table_oldest_timestamp_seconds"
    }
    assert oldest["connection_events"] == noon(40).timestamp()  # in the default partition
    assert oldest["dead_letters"] == noon(1).timestamp()
    assert oldest["telemetry"] == noon(1).replace(hour=0).timestamp()
    assert oldest["count_history"] == noon(100).replace(hour=0).timestamp()  # a partition
    assert got[("iiot_table_size_bytes", frozenset({("table", "connection_events")}))] > 0
    assert got[("iiot_maintenance_last_run_success", frozenset())] == 1
    assert {name for name, _ in got} >= LIFECYCLE_METRICS
    success = got[
        ("iiot_maintenance_last_success_timestamp_seconds", frozenset({("task", "lifecycle")}))
    ]
    assert success == first.finished_at.timestamp()

    # A query holding a lock on connection_events: dropping its old partition must wait.
    await db.execute(
        "SELECT iiot_ensure_daily_partitions('connection_events', %s, %s)",
        (TODAY - timedelta(95), TODAY - timedelta(95)),
    )
    async with await connect(store) as reader:
        await reader.execute("SELECT count(*) FROM connection_events")
        failed = await maintain_once(settings, ingest_window=WINDOW)
    assert failed is not None
    assert not failed.succeeded
    assert "connection_events: partitions dropped FAILED: LockNotAvailable" in failed.summary()
    assert [s.table for s in failed.steps if s.error] == ["connection_events"]
    got = samples((await api.get("/metrics")).text)
    assert got[("iiot_maintenance_last_run_success", frozenset())] == 0
    assert (
        got[("iiot_maintenance_last_success_timestamp_seconds", frozenset({("task", "lifecycle")}))]
        == success
    )
    assert got[("iiot_maintenance_last_run_timestamp_seconds", frozenset())] > success


LIFECYCLE_METRICS = {
    "iiot_table_size_bytes",
    "iiot_table_oldest_timestamp_seconds",
    "iiot_maintenance_last_run_timestamp_seconds",
    "iiot_maintenance_last_run_success",
    "iiot_maintenance_last_success_timestamp_seconds",
}


def test_the_cronjob_and_the_alert_use_what_exists() -> None:
    """The CronJob runs a real command and is deployed; the alerts read exported metrics."""
    cronjob = yaml.safe_load((K8S / "maintain-cronjob.yaml").read_text())
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    check_cli(pod["containers"][0]["args"])
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "maintain-cronjob.yaml" in kustomization["resources"]

    prometheus = DEPLOY / "prometheus"
    rules = yaml.safe_load((prometheus / "maintenance_alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"iiot_\w+", expr)}
    assert used
    assert used <= LIFECYCLE_METRICS
    config = yaml.safe_load((prometheus / "prometheus.yml").read_text())
    assert "maintenance_alerts.yml" in config["rule_files"]
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert (
        "../prometheus/maintenance_alerts.yml:/etc/prometheus/maintenance_alerts.yml:ro" in mounts
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_maintenance_alerts_fire_after_a_day_without_success_and_clear() -> None:
    for command in (
        ["check", "rules", "maintenance_alerts.yml"],
        ["test", "rules", "maintenance_alerts_test.yml"],
    ):
        done = subprocess.run(
            ["promtool", *command],
            cwd=DEPLOY / "prometheus",
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


async def test_ingest_processes_run_maintenance_on_their_schedule(
    store: StoreSettings,
    db: psycopg.AsyncConnection[Any],
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
) -> None:
    settings = LifecycleSettings(**store.model_dump())
    maintainer = Maintainer(settings, ingest_window=WINDOW, first_delay=0)
    task = asyncio.create_task(maintainer.run())
    try:
        await eventually(lambda: scalar(db, "SELECT count(*) FROM maintenance_runs"))
    finally:
        maintainer.stop()
        async with asyncio.timeout(10):
            await task
    assert maintainer.runs == 1

    def maintainers(settings: IngestSettings) -> int:
        return sum(isinstance(s, Maintainer) for s in ingest_services(settings, pool))

    assert maintainers(ingest_settings) == 1
    assert maintainers(ingest_settings.model_copy(update={"maintain_interval_seconds": 0})) == 0
