"""The cell's national snapshots (national/cell/): the figures equal the registry's own, the
sketch counts each national identity once within its stated bound, enterprise codes travel only
as keyed hashes, and the outbox numbers, signs and keeps snapshots in order."""

import asyncio
import base64
import hashlib
import hmac
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import datasketches
import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from national.cell import outbox
from national.cell.keys import (
    EnterpriseHashKey,
    UnusableKey,
    generate_signing_key,
    load_enterprise_hash_key,
)
from national.cell.settings import CellSettings, Reporting
from national.format import Snapshot
from registry import uscc
from registry.activity import refresh_activity
from registry.counts import all_platform_counts
from registry.enterprises import declare, link, upsert_enterprises
from registry.migrate import migrate
from registry.platforms import PlatformType, Tier, upsert_platform
from registry.registration import register_devices
from registry.settings import StoreSettings
from registry.store import connect, create_pool
from tests.test_writer import telemetry

HASH_KEY = "5e" * 32
AUTO = uscc.compose("440300", "19231745")
STEEL = uscc.compose("320500", "60000001")
PHARMA = uscc.compose("320104", "60000004")
MOVED_ONLY = uscc.compose("320200", "60000002")


async def add_devices(
    db: psycopg.AsyncConnection[Any],
    pool: AsyncConnectionPool,
    platform: str,
    devices: dict[str, str | None],
    *,
    online: set[str],
) -> None:
    """Registers `devices` (id -> global id or None); those in `online` send live data."""
    async with db.transaction():
        await register_devices(
            db,
            platform,
            [(d, {} if g is None else {"global_id": g}) for d, g in devices.items()],
            shard=0,
        )
    if online:
        now = datetime.now(UTC)
        writer = TelemetryWriter(pool, stats=IngestStats())
        await writer.write([telemetry(platform, d, (now, "v", 1.0)) for d in sorted(online)])


async def move(db: psycopg.AsyncConnection[Any], platform: str, to_cell: str) -> None:
    """What a platform export with --move-to leaves in the source cell (migration 0032)."""
    await db.execute(
        "UPDATE platforms SET moved_to = %s, moved_at = now() WHERE id = %s", (to_cell, platform)
    )


@pytest.fixture
async def fleet(db: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool) -> None:
    """Three platforms: plant-a (steel, division 31) and plant-b (manufacturing, section C) held,
    plant-m moved to cell-9; a global id shared between plant-a and plant-b."""
    await upsert_platform(db, "plant-a", tier=Tier.GROWTH, region="320500", industry="steel")
    await upsert_platform(
        db, "plant-b", type=PlatformType.INDUSTRY, region="440300", industry="manufacturing"
    )
    await upsert_platform(db, "plant-m", region="320200", industry="汽车")
    a = {"a1": "g1", "a2": "g2", "a3": None, "a4": "g3"}
    await add_devices(db, pool, "plant-a", a, online={"a1", "a2", "a3"})
    await add_devices(
        db, pool, "plant-b", {"b1": "g1", "b2": None, "b3": None}, online={"b1", "b2"}
    )
    await add_devices(db, pool, "plant-m", {"m1": "g9", "m2": None}, online={"m1", "m2"})
    for platform, code, industry in (
        ("plant-a", STEEL, "31"),
        ("plant-a", PHARMA, "26"),  # plant-a and plant-b say 27 and 26: two say 27
        ("plant-b", PHARMA, "27"),
        ("plant-m", PHARMA, "27"),  # moved: its declaration no longer counts here
        ("plant-b", AUTO, "36"),
        ("plant-m", MOVED_ONLY, "38"),
    ):
        async with db.transaction():
            await upsert_enterprises(
                db, platform, [declare(code, name="企业", industry=industry, above_size=True)]
            )
    async with db.transaction():
        await link(db, "plant-a", "devices", {"a1": STEEL})
        await link(db, "plant-b", "devices", {"b3": AUTO})  # offline, never seen: not active
    await move(db, "plant-m", "cell-9")
    assert await refresh_activity(db)


def reporting(tmp_path: Path, *, hash_key: str | None = HASH_KEY, **settings: Any) -> Reporting:
    key = tmp_path / "cell.key"
    if not key.exists():
        generate_signing_key(key)
    cell = CellSettings(
        cell="cell-1",
        national_url="http://127.0.0.1:9",
        cell_signing_key=key,
        enterprise_hash_key=hash_key,
        snapshot_interval_seconds=2,
        **settings,
    )
    return Reporting.load(cell, key)


async def built(store: StoreSettings, report: Reporting) -> tuple[Snapshot, bytes, bytes]:
    """Builds one snapshot into the outbox; its parsed form, its bytes and its signature."""
    async with await connect(store, autocommit=True) as conn:
        sequence = await outbox.store_snapshot(conn, report)
        pending = {p.sequence: p for p in await outbox.undelivered(conn, 10_000)}
    body = pending[sequence].body
    return Snapshot.model_validate_json(body), body, pending[sequence].signature


def public_key(report: Reporting) -> Ed25519PublicKey:
    return report.signing_key.public_key()


def sketch_of(snapshot: Snapshot) -> Any:
    return datasketches.hll_sketch.deserialize(base64.b64decode(snapshot.devices.data))


@pytest.mark.usefixtures("fleet")
async def test_platform_figures_are_the_registrys_own_and_moved_platforms_are_released(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    snapshot, _, _ = await built(store, reporting(tmp_path))
    registry = {c.key: c for c in await all_platform_counts(db, after=None, limit=100)}
    assert [p.id for p in snapshot.platforms] == ["plant-a", "plant-b"]
    for p in snapshot.platforms:
        own = registry[p.id]
        figures = (p.registered, p.connected, p.ever_connected, p.active_24h, p.active_30d)
        assert figures == (
            own.registered,
            own.connected,
            own.ever_connected,
            own.active_24h,
            own.active_30d,
        )
        assert p.activity_as_of == own.activity_as_of
    a, b = snapshot.platforms
    assert (a.registered, a.connected, a.ever_connected) == (4, 3, 3)
    assert (b.registered, b.connected) == (3, 2)
    assert (a.tier, a.region, a.industry_code, a.industry_text) == (
        "growth",
        "320500",
        "31",
        "steel",
    )
    # Mapped to a section only: no division to report, the text goes along.
    assert (b.type, b.industry_code, b.industry_text) == ("industry", None, "manufacturing")
    [release] = snapshot.releases
    assert (release.platform, release.to_cell) == ("plant-m", "cell-9")
    assert (snapshot.cell, snapshot.sequence, snapshot.interval_seconds) == ("cell-1", 1, 2)
    assert snapshot.definitions_version == "2026-11.4"


@pytest.mark.usefixtures("fleet")
async def test_connected_devices_split_into_identities_and_the_rest_add_up_exactly(
    store: StoreSettings, tmp_path: Path
) -> None:
    snapshot, _, _ = await built(store, reporting(tmp_path))
    devices = snapshot.devices
    # g1 on plant-a and plant-b is one identity; g3 is offline; plant-m's g9 moved away.
    assert (devices.identities, devices.connected_without_identity) == (2, 2)
    assert sketch_of(snapshot).get_estimate() == pytest.approx(2)
    assert (devices.kind, devices.lg_k, devices.target) == ("datasketches-hll", 14, "HLL_4")
    # Registrations: a1, a2, b1 carry an identity, a3 and b2 none.
    assert sum(p.connected for p in snapshot.platforms) == 3 + devices.connected_without_identity


async def test_two_cells_sketches_count_a_shared_device_once_within_the_stated_bound(
    database_url: str, db: psycopg.AsyncConnection[Any], store: StoreSettings, tmp_path: Path
) -> None:
    """12,000 identities in each of two cells, 4,000 of them in both: the merged sketch
    estimates the 20,000 within its bound at two standard deviations."""
    other = store.model_copy(update={"database_schema": store.database_schema + "_b"})
    await migrate(other)
    try:
        snapshots = []
        for cell, first in ((store, 0), (other, 8_000)):
            async with (
                create_pool(cell, name="fleet") as pool,
                await connect(cell, autocommit=True) as conn,
            ):
                await upsert_platform(conn, "plant")
                devices = {f"d{i}": f"g{i}" for i in range(first, first + 12_000)}
                await add_devices(conn, pool, "plant", devices, online=set(devices))
            snapshot, _, _ = await built(cell, reporting(tmp_path))
            assert snapshot.devices.identities == 12_000
            snapshots.append(snapshot)
    finally:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            await c.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(other.database_schema))
            )
    union = datasketches.hll_union(14)
    for snapshot in snapshots:
        union.update(sketch_of(snapshot))
    merged = union.get_result()
    assert "Current Mode   : HLL" in merged.to_string()  # past the exact modes of small sketches
    bound = datasketches.hll_sketch.get_rel_err(True, True, 14, 2)
    assert bound < 0.02
    assert merged.get_lower_bound(2) <= 20_000 <= merged.get_upper_bound(2)
    assert abs(merged.get_estimate() - 20_000) <= 20_000 * abs(bound)
    # Summing the cells' exact figures would count the 4,000 shared devices twice.
    assert sum(s.devices.identities for s in snapshots) == 24_000


@pytest.mark.usefixtures("fleet")
async def test_enterprises_travel_as_keyed_hashes_of_their_codes_only(
    store: StoreSettings, tmp_path: Path
) -> None:
    snapshot, body, _ = await built(store, reporting(tmp_path))
    assert snapshot.enterprises is not None
    secret = bytes.fromhex(HASH_KEY)
    assert snapshot.enterprises.key_id == hashlib.sha256(secret).hexdigest()[:16]

    def keyed(code: str) -> str:
        return hmac.new(secret, code.encode(), hashlib.sha256).hexdigest()

    items = {e.code_hmac: e for e in snapshot.enterprises.items}
    # The enterprise only the moved platform serves is not this cell's any more.
    assert set(items) == {keyed(STEEL), keyed(PHARMA), keyed(AUTO)}
    steel, pharma, auto = items[keyed(STEEL)], items[keyed(PHARMA)], items[keyed(AUTO)]
    assert (steel.region, steel.industry_code, steel.active_30d) == ("320500", "31", True)
    # Of the held platforms one says 26, one 27: a tie goes to the earliest declaration (26).
    assert (pharma.industry_code, pharma.active_30d) == ("26", False)
    assert (auto.industry_code, auto.active_30d, auto.served) == ("36", False, True)
    for code in (STEEL, PHARMA, AUTO, MOVED_ONLY):
        assert code.encode() not in body
        assert hashlib.sha256(code.encode()).hexdigest().encode() not in body


@pytest.mark.usefixtures("fleet")
async def test_without_the_shared_key_a_snapshot_carries_no_enterprises(
    store: StoreSettings, tmp_path: Path
) -> None:
    snapshot, _, _ = await built(store, reporting(tmp_path, hash_key=None))
    assert snapshot.enterprises is None


def test_the_shared_key_is_read_as_hex_or_from_a_file_and_must_be_long_enough(
    tmp_path: Path,
) -> None:
    as_hex = load_enterprise_hash_key(HASH_KEY)
    file = tmp_path / "hash.key"
    file.write_text(HASH_KEY + "\n")
    assert load_enterprise_hash_key(str(file)) == as_hex
    raw = tmp_path / "raw.key"
    raw.write_bytes(os.urandom(32))
    assert load_enterprise_hash_key(str(raw)) == EnterpriseHashKey(raw.read_bytes())
    with pytest.raises(UnusableKey, match="at least 32"):
        load_enterprise_hash_key("ab" * 16)
    with pytest.raises(UnusableKey, match="neither hex nor a readable file"):
        load_enterprise_hash_key(str(tmp_path / "missing"))


@pytest.mark.usefixtures("fleet")
async def test_outbox_numbers_signs_and_keeps_snapshots_in_order(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    report = reporting(tmp_path, snapshot_keep_delivered_hours=0)
    for _ in range(3):
        await built(store, report)
    pending = await outbox.undelivered(db)
    assert [p.sequence for p in pending] == [1, 2, 3]
    for p in pending:
        public_key(report).verify(p.signature, p.body)  # raises if not
        assert Snapshot.model_validate_json(p.body).sequence == p.sequence
    # Delivered ones are deleted after their retention; their numbers are never taken again.
    assert await outbox.delivered_below(db, 4) == 3
    assert await outbox.delete_delivered(db, timedelta(0)) == 3
    snapshot, _, _ = await built(store, report)
    assert snapshot.sequence == 4
    figures = await outbox.outbox_figures(db)
    assert (figures.built, figures.delivered, figures.undelivered) == (4, 3, 1)


@pytest.mark.usefixtures("fleet")
async def test_a_full_outbox_builds_nothing_more_and_says_so(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    report = reporting(tmp_path, snapshot_outbox_limit=10)
    for _ in range(10):
        await built(store, report)
    with pytest.raises(outbox.OutboxFull, match="10 snapshots wait"):
        await built(store, report)
    figures = await outbox.outbox_figures(db)
    assert (figures.built, figures.undelivered) == (10, 10)  # none dropped
    assert figures.failures["outbox_full"][0] == 1


def test_keygen_writes_a_private_key_only_its_owner_reads_and_prints_the_public_key(
    tmp_path: Path,
) -> None:
    out = tmp_path / "cell.key"
    command = [sys.executable, "-m", "iiot.cli", "cell", "keygen", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert out.stat().st_mode & 0o777 == 0o600
    public = serialization.load_pem_public_key(done.stdout.encode())
    assert isinstance(public, Ed25519PublicKey)
    private = serialization.load_pem_private_key(out.read_bytes(), password=None)
    public.verify(private.sign(b"body"), b"body")  # type: ignore[union-attr,call-arg]
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 1
    assert "exists" in again.stderr


async def test_snapshots_are_numbered_in_the_order_their_figures_were_read(
    store: StoreSettings, tmp_path: Path
) -> None:
    """Builders in parallel: each takes the build lock before its transaction starts, so a
    higher number never carries older figures."""
    report = reporting(tmp_path)
    async with create_pool(store, name="builders", autocommit=True) as pool:

        async def build() -> int:
            async with pool.connection() as conn:
                return await outbox.store_snapshot(conn, report)

        sequences = await asyncio.gather(*(build() for _ in range(6)))
    assert sorted(sequences) == [1, 2, 3, 4, 5, 6]
    async with await connect(store, autocommit=True) as conn:
        pending = await outbox.undelivered(conn)
    taken = [Snapshot.model_validate_json(p.body).taken_at for p in pending]
    assert taken == sorted(taken)


@pytest.mark.usefixtures("fleet")
async def test_metrics_show_how_far_building_and_delivery_came(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], tmp_path: Path, api: httpx.AsyncClient
) -> None:
    report = reporting(tmp_path)
    for _ in range(3):
        await built(store, report)
    await outbox.delivered_below(db, 2)
    await outbox.record_failure(db, "unreachable", "ConnectError")
    await outbox.record_failure(db, "unreachable", "ConnectError")
    await outbox.halt(db, "replayed", 2, "other bytes under 2")
    response = await api.get("/metrics")
    assert response.status_code == 200
    oldest = (await outbox.outbox_figures(db)).oldest_undelivered
    assert oldest is not None
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    cell = (("cell", store.cell),)
    for name, labels, value in (
        ("iiot_national_snapshots_built", (), 3.0),
        ("iiot_national_snapshots_delivered", (), 1.0),
        ("iiot_national_outbox_undelivered", (), 2.0),
        ("iiot_national_push_failures_total", (("reason", "unreachable"),), 2.0),
        ("iiot_national_delivery_halted", (("reason", "replayed"),), 1.0),
    ):
        assert samples[name, tuple(sorted(cell + labels))] == value, name
    age = samples["iiot_national_outbox_oldest_undelivered_timestamp_seconds", cell]
    assert age == pytest.approx(oldest.timestamp())
