"""Simulated enterprises with valid credit codes, spread over regions and industries, for
`iiot run`'s simulator and the load test: deterministic, so a run can check its figures."""

from typing import Any, Final

from psycopg import AsyncConnection

from registry import classification, enterprises, uscc
from registry.enterprises import Declaration
from registry.official_totals import import_totals, totals_imported
from registry.registration import register_devices

DEMO_TOTALS_SOURCE: Final = "iiot run: simulated totals for the demo, not official figures"
DEMO_RULE_KEY: Final = "uscc"


def simulated_enterprises(count: int, *, prefix: str = "DM") -> list[Declaration]:
    """`count` enterprises: the k-th in a prefecture and an industrial division chosen by k,
    above designated size unless k % 4 == 3; `prefix` (2 characters of the code's alphabet)
    keeps the codes of different simulations apart."""
    prefectures = sorted(
        r.code for r in classification.regions().values() if r.level == "prefecture"
    )
    divisions = sorted(
        i.code
        for i in classification.industries().values()
        if i.level == "division" and i.industrial
    )
    found = []
    for k in range(count):
        region = prefectures[(k * 37) % len(prefectures)]
        code = uscc.compose(region, f"{prefix}{k:06d}")
        found.append(
            enterprises.declare(
                code,
                name=f"模拟企业 {prefix}-{k:04d}",
                industry=divisions[(k * 7) % len(divisions)],
                above_size=k % 4 != 3,
            )
        )
    return found


def demo_totals(declared: list[Declaration], *, year: int) -> str:
    """A totals file for the demo: per province four times its above-size enterprises (so the
    rates are visible), and the whole country as their sum."""
    per_province: dict[str, int] = {}
    for d in declared:
        if d.above_size:
            province = classification.province_of(d.region)
            per_province[province] = per_province.get(province, 0) + 4
    lines = ["year,region,industry,enterprises"]
    lines += [f"{year},{p},,{n}" for p, n in sorted(per_province.items())]
    lines.append(f"{year},{classification.NATIONAL},,{sum(per_province.values())}")
    return "\n".join(lines) + "\n"


async def seed_demo(
    conn: AsyncConnection[Any], platform: str, devices: list[str], *, year: int
) -> None:
    """Declares the demo platform's enterprises, has its simulated devices name theirs in
    their metadata (the platform's rule), and imports demo totals if none are there.
    Call within a transaction."""
    declared = simulated_enterprises(max(1, min(24, len(devices) // 2)))
    await enterprises.upsert_enterprises(conn, platform, declared)
    owned = [(d, {DEMO_RULE_KEY: declared[n % len(declared)].code}) for n, d in enumerate(devices)]
    if owned:
        await register_devices(conn, platform, owned, shard=0)
    await enterprises.set_rule(conn, platform, DEMO_RULE_KEY)
    if not await totals_imported(conn):
        await import_totals(
            conn, demo_totals(declared, year=year), source=DEMO_TOTALS_SOURCE, file_name="demo"
        )
