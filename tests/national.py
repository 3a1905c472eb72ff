"""Helpers for the aggregator's tests: simulated cells that build and sign snapshots exactly as
national/format.py says, and the aggregator as a process of its own (`iiot national serve`)."""

import asyncio
import base64
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datasketches
import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql

from iiot.net import free_port
from national import format as wire
from national.keys import add_cell, create_viewer_key
from national.migrate import connection_options, migrate
from national.settings import NationalSettings
from tests.conftest import eventually


def platform(
    id_: str,
    *,
    connected: int = 0,
    registered: int | None = None,
    tier: str = "basic",
    type_: str = "professional",
    region: str = "320500",
    industry: str | None = "36",
) -> dict[str, Any]:
    registered = connected if registered is None else registered
    return {
        "id": id_,
        "name": id_.upper(),
        "tier": tier,
        "type": type_,
        "region": region,
        "industry_code": industry,
        "industry_text": "汽车制造业" if industry == "36" else "other",
        "registered": registered,
        "connected": connected,
        "ever_connected": registered,
        "active_24h": connected,
        "active_30d": registered,
        "activity_as_of": datetime.now(UTC).isoformat(),
    }


def sketch_of(identities: Iterable[str], lg_k: int = 12) -> dict[str, Any]:
    sketch = datasketches.hll_sketch(lg_k, datasketches.tgt_hll_type.HLL_8)
    count = 0
    for identity in identities:
        sketch.update(identity)
        count += 1
    return {
        "kind": "datasketches-hll",
        "lg_k": lg_k,
        "target": "HLL_8",
        "data": base64.b64encode(sketch.serialize_compact()).decode(),
        "identities": count,
        "connected_without_identity": 0,
    }


@dataclass(eq=False)
class SimCell:
    """A cell as the aggregator sees one: a name, a key pair and a sequence."""

    name: str
    interval: float = 60.0  # seconds; tests of staleness give 1
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    sequence: int = 0

    @property
    def public_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def body(
        self,
        platforms: list[dict[str, Any]],
        *,
        identities: Iterable[str] = (),
        without_identity: int = 0,
        releases: list[dict[str, Any]] | None = None,
        enterprises: dict[str, Any] | None = None,
        taken_at: datetime | None = None,
        sequence: int | None = None,
    ) -> bytes:
        """The next snapshot's bytes (validated by national/format.py's model)."""
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        devices = sketch_of(identities) | {"connected_without_identity": without_identity}
        document = {
            "format": wire.FORMAT,
            "cell": self.name,
            "sequence": sequence,
            "taken_at": (taken_at or datetime.now(UTC)).isoformat(),
            "took_seconds": 0.01,
            "interval_seconds": self.interval,
            "definitions_version": "2026-12.1",
            "platforms": platforms,
            "releases": releases or [],
            "devices": devices,
            "enterprises": enterprises,
        }
        return wire.Snapshot.model_validate(document).model_dump_json().encode()

    def headers(self, body: bytes) -> dict[str, str]:
        signature = base64.b64encode(self.key.sign(body)).decode()
        return {
            wire.CELL_HEADER: self.name,
            wire.SIGNATURE_HEADER: wire.SIGNATURE_PREFIX + signature,
            "Content-Type": "application/json",
        }

    async def push(self, http: httpx.AsyncClient, body: bytes) -> httpx.Response:
        return await http.post("/snapshots", content=body, headers=self.headers(body))


@dataclass
class Aggregator:
    url: str
    settings: NationalSettings
    key: str  # a national viewer key

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        key = self.key if key is None else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)

    async def register(self, *cells: SimCell) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.settings.require_database_url(),
            options=connection_options(self.settings.database_schema),
            autocommit=True,
        ) as conn:
            for cell in cells:
                public = cell.key.public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
                await add_cell(conn, cell.name, public)


def national_cli(aggregator: "Aggregator", *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "IIOT_NATIONAL_DATABASE_URL": aggregator.settings.require_database_url(),
        "IIOT_NATIONAL_DATABASE_SCHEMA": aggregator.settings.database_schema,
    }
    return subprocess.run(
        [sys.executable, "-m", "iiot.cli", "national", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
async def aggregator(database_url: str, unique: str, tmp_path: Path) -> AsyncIterator[Aggregator]:
    """`iiot national serve` on a schema of the test's (import it into a test module)."""
    async with aggregator_process(database_url, f"n_{unique}", tmp_path / "national.log") as agg:
        yield agg


@asynccontextmanager
async def aggregator_process(
    database_url: str, schema: str, log: Path, **settings: str
) -> AsyncIterator[Aggregator]:
    """`iiot national serve` as a process of its own on a schema of the test's (dropped after);
    `settings`: IIOT_NATIONAL_* values (sample_seconds defaults to 1 here)."""
    national = NationalSettings(database_url=database_url, database_schema=schema)
    await migrate(national)
    async with await psycopg.AsyncConnection.connect(
        database_url, options=connection_options(schema), autocommit=True
    ) as conn:
        _, key = await create_viewer_key(conn, "test viewer")
    port = free_port()
    env = os.environ | {
        "IIOT_NATIONAL_DATABASE_URL": database_url,
        "IIOT_NATIONAL_DATABASE_SCHEMA": schema,
        "IIOT_NATIONAL_PORT": str(port),
        "IIOT_NATIONAL_SAMPLE_SECONDS": "1",
        "IIOT_NATIONAL_KEY_CACHE_SECONDS": "0",
    }
    env |= {f"IIOT_NATIONAL_{name.upper()}": value for name, value in settings.items()}
    with log.open("ab") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, "-m", "iiot.cli", "national", "serve"],
            env=env,
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:

            async def ready() -> bool:
                assert process.poll() is None, f"the aggregator ended; see {log}"
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=30, interval=0.1)
        yield Aggregator(url, national, key)
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
