"""Enterprises (docs/enterprises.md): credit code validation, the shipped classifications,
declarations, and the links of devices and gateways to enterprises."""

from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from registry import classification, industry_mappings, uscc
from registry.access import Role
from registry.errors import Invalid
from registry.migrate import available_migrations
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect
from tests.conftest import ApiAs, KeyMaker, scalar

# Codes the enterprises publish themselves (business licences, annual reports).
PUBLISHED = {
    "914403001922038216": "华为技术有限公司",
    "91440300708461136T": "深圳市腾讯计算机系统有限公司",
    "91330100716105852F": "阿里巴巴（中国）有限公司",  # noqa: RUF001 - the registered name's own brackets
    "91440300192317458F": "比亚迪股份有限公司",
    "91110000100010433L": "中国石油天然气集团有限公司",
}
HUAWEI, _, ALIBABA, BYD, CNPC = PUBLISHED


def with_check(first17: str) -> str:
    return first17 + uscc.check_character(first17)


@pytest.mark.parametrize("code", PUBLISHED)
def test_published_codes_are_valid(code: str) -> None:
    assert uscc.parse(code).code == code
    assert uscc.parse(code.lower()).code == code  # as typed, in lower case
    assert uscc.compose(code[2:8], code[8:16]) == code


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (HUAWEI[:17], "18 characters, not 17"),
        (HUAWEI[:17] + "7", "check character '7' does not match the code (expected '6')"),
        # Swapped neighbours, the commonest typing error.
        (HUAWEI[:9] + HUAWEI[10] + HUAWEI[9] + HUAWEI[11:], "check character '6' does not match"),
        (HUAWEI[:10] + "O" + HUAWEI[11:], "characters 'O' are not used"),
        (HUAWEI[:17] + "Z", "characters 'Z' are not used"),
        # A valid check character over an organization code whose own check is wrong.
        (with_check("91440300192203822"), "not a valid organization code"),
        (with_check("914403XX" + HUAWEI[8:17]), "are not an administrative division code"),
        # Well-formed codes of a public institution (12) and an individual business (92).
        (with_check("12" + HUAWEI[2:17]), "begins '12', not '91'"),
        (with_check("92" + HUAWEI[2:17]), "begins '92', not '91'"),
    ],
)
def test_invalid_codes_are_refused_with_the_reason(code: str, reason: str) -> None:
    with pytest.raises(Invalid, match=reason.replace("(", r"\(").replace(")", r"\)")):
        uscc.parse(code)


def test_every_mistyped_character_is_caught() -> None:
    for position in range(18):
        for wrong in uscc.ALPHABET:
            if wrong != BYD[position]:
                typo = BYD[:position] + wrong + BYD[position + 1 :]
                with pytest.raises(Invalid):
                    uscc.parse(typo)


def test_every_swap_of_neighbours_is_caught() -> None:
    for code in PUBLISHED:
        for i in range(16):
            if code[i] != code[i + 1]:
                swapped = code[:i] + code[i + 1] + code[i] + code[i + 2 :]
                with pytest.raises(Invalid):
                    uscc.parse(swapped)


def test_the_shipped_industry_classification() -> None:
    table = classification.industries()
    sections = [i for i in table.values() if i.level == "section"]
    divisions = [i for i in table.values() if i.level == "division"]
    assert [s.code for s in sections] == list("ABCDEFGHIJKLMNOPQRST")
    assert [d.code for d in divisions] == [f"{n:02}" for n in range(1, 98)]
    assert {i.section for i in table.values() if i.industrial} == {"B", "C", "D"}
    assert [d.code for d in divisions if d.industrial] == [f"{n:02}" for n in range(6, 47)]
    assert table["36"].name == "汽车制造业"
    assert table["36"].section == "C"
    assert table["11"].name == "开采专业及辅助性活动"  # the 2017 name (2011: 开采辅助活动)
    assert classification.division("C36").code == "36"
    assert classification.division("3670").code == "36"
    with pytest.raises(Invalid, match="not a GB/T 4754-2017 division"):
        classification.division("B36")  # 36 is in section C
    with pytest.raises(Invalid, match="not a GB/T 4754-2017 division"):
        classification.division("98")


def test_the_shipped_region_names() -> None:
    table = classification.regions()
    provinces = [r for r in table.values() if r.level == "province"]
    assert len(provinces) == 34  # 23 provinces, 5 autonomous regions, 4 municipalities, 2 SARs
    assert classification.region_name("440300") == "深圳市"
    assert classification.province_name("440305") == "广东省"
    assert classification.prefecture_name("440305") == "深圳市"  # a district, named by its city
    assert classification.region_name("429004") == "省直辖县级行政区划"  # Xiantao, Hubei
    assert classification.region_name("110100") == "市辖区"
    for region in table.values():
        if region.level == "prefecture":
            assert classification.province_of(region.code) in table, region


async def declare(client: httpx.AsyncClient, platform: str, *items: dict[str, Any]) -> Any:
    response = await client.post(f"/platforms/{platform}/enterprises", json={"enterprises": items})
    assert response.status_code == 200, response.text
    return response.json()


def byd(**changes: Any) -> dict[str, Any]:
    return {"code": BYD, "name": PUBLISHED[BYD], "industry": "C36", "above_size": True, **changes}


async def test_a_declaration_takes_its_region_from_the_code_and_shows_names(
    api: httpx.AsyncClient, platform: str
) -> None:
    assert await declare(api, platform, byd()) == {"added": 1, "changed": 0}
    assert await declare(api, platform, byd()) == {"added": 0, "changed": 0}
    assert await declare(api, platform, byd(name="比亚迪")) == {"added": 0, "changed": 1}
    found = (await api.get(f"/platforms/{platform}/enterprises/{BYD}")).json()
    assert found["industry"] == {
        "code": "36",
        "name": "汽车制造业",
        "section": "C",
        "section_name": "制造业",
    }
    assert found["region"] == {
        "code": "440300",
        "name": "深圳市",
        "province": "440000",
        "province_name": "广东省",
        "prefecture": "440300",
        "prefecture_name": "深圳市",
    }
    assert found["region_reason"] is None
    listed = await api.get(f"/platforms/{platform}/enterprises", params={"region": "440000"})
    assert [e["code"] for e in listed.json()["items"]] == [BYD]
    elsewhere = await api.get(f"/platforms/{platform}/enterprises", params={"region": "320000"})
    assert elsewhere.json()["items"] == []


async def test_a_region_other_than_the_code_s_needs_a_reason(
    api: httpx.AsyncClient, platform: str
) -> None:
    url = f"/platforms/{platform}/enterprises"
    moved = byd(region="340100")
    refused = await api.post(url, json={"enterprises": [moved]})
    assert refused.status_code == 422
    assert "state the reason" in refused.json()["detail"]
    reason = "production moved to the Hefei plant; registered in Shenzhen"
    await declare(api, platform, {**moved, "region_reason": reason})
    found = (await api.get(f"{url}/{BYD}")).json()
    assert found["region"]["code"] == "340100"
    assert found["region"]["name"] == "合肥市"
    assert found["region_reason"] == reason
    unknown = await api.post(url, json={"enterprises": [byd(region="990100", region_reason="x")]})
    assert unknown.status_code == 422
    assert "not a GB/T 2260 code" in unknown.json()["detail"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"code": BYD[:17] + "0"}, f"enterprises[0] ({BYD[:17]}0): check character '0'"),
        ({"industry": "65", "above_size": True}, "division 65 is in section I"),
        ({"industry": "C99"}, "not a GB/T 4754-2017 division"),
        ({"name": "   "}, "String should have at least 1 character"),
    ],
)
async def test_bad_declarations_are_refused_with_the_reason(
    api: httpx.AsyncClient, platform: str, changes: dict[str, Any], reason: str
) -> None:
    response = await api.post(
        f"/platforms/{platform}/enterprises", json={"enterprises": [byd(**changes)]}
    )
    assert response.status_code == 422
    assert reason in response.text
    assert (await api.get(f"/platforms/{platform}/enterprises")).json()["items"] == []


async def test_devices_belong_by_link_gateway_or_rule(
    api: httpx.AsyncClient, platform: str, db: psycopg.AsyncConnection[Any]
) -> None:
    await declare(api, platform, byd(), byd(code=HUAWEI, name=PUBLISHED[HUAWEI], industry="39"))
    devices = [
        {"device_id": "press-1"},
        {"device_id": "behind-gw"},
        {"device_id": "tagged", "metadata": {"uscc": HUAWEI.lower()}},
        {"device_id": "linked-and-tagged", "metadata": {"uscc": HUAWEI}},
        {"device_id": "loose"},
    ]
    response = await api.post(f"/platforms/{platform}/devices", json={"devices": devices})
    assert response.status_code == 200
    await api.post(f"/platforms/{platform}/gateways/gw-1/credential")  # registers the gateway
    await db.execute(
        "UPDATE devices SET via_gateway = (SELECT id FROM gateways WHERE gateway_id = 'gw-1') "
        "WHERE device_id = 'behind-gw'"
    )
    links = {
        "devices": {"press-1": BYD, "linked-and-tagged": BYD},
        "gateways": {"gw-1": HUAWEI},
    }
    changed = await api.post(f"/platforms/{platform}/enterprise-links", json=links)
    assert changed.json() == {"devices": 2, "gateways": 1}
    rule = await api.put(f"/platforms/{platform}/enterprise-rule", json={"metadata_key": "uscc"})
    assert rule.status_code == 200

    async def enterprise_of(device: str) -> tuple[str | None, str | None]:
        found = (await api.get(f"/platforms/{platform}/devices/{device}/enterprise")).json()
        return found["enterprise"], found["linked_by"]

    assert await enterprise_of("press-1") == (BYD, "device")
    assert await enterprise_of("behind-gw") == (HUAWEI, "gateway")
    assert await enterprise_of("tagged") == (HUAWEI, "rule")
    assert await enterprise_of("linked-and-tagged") == (BYD, "device")  # its own link first
    assert await enterprise_of("loose") == (None, None)
    of_huawei = (await api.get(f"/platforms/{platform}/enterprises/{HUAWEI}/devices")).json()
    assert of_huawei["items"] == [
        {"device_id": "behind-gw", "linked_by": "gateway"},
        {"device_id": "tagged", "linked_by": "rule"},
    ]

    # Cleared links and the end of a declaration leave nothing dangling.
    await api.post(f"/platforms/{platform}/enterprise-links", json={"devices": {"press-1": None}})
    assert await enterprise_of("press-1") == (None, None)
    assert (await api.delete(f"/platforms/{platform}/enterprises/{HUAWEI}")).status_code == 204
    assert await enterprise_of("behind-gw") == (None, None)
    assert await enterprise_of("tagged") == (None, None)
    assert await scalar(db, "SELECT count(*) FROM gateways WHERE enterprise IS NOT NULL") == 0


async def test_links_are_all_or_nothing(api: httpx.AsyncClient, platform: str) -> None:
    await declare(api, platform, byd())
    await api.post(f"/platforms/{platform}/devices", json={"devices": [{"device_id": "d-1"}]})
    url = f"/platforms/{platform}/enterprise-links"
    unknown = await api.post(url, json={"devices": {"d-1": BYD, "nope": BYD}})
    assert unknown.status_code == 422
    assert "no such devices on platform 'plant-1': nope" in unknown.json()["detail"]
    undeclared = await api.post(url, json={"devices": {"d-1": HUAWEI}})
    assert undeclared.status_code == 422
    assert f"not declared by platform 'plant-1' (declare them first): {HUAWEI}" in undeclared.text
    found = (await api.get(f"/platforms/{platform}/devices/d-1/enterprise")).json()
    assert found["enterprise"] is None


async def test_operators_see_only_their_platform_s_enterprises(
    api_as: ApiAs, make_key: KeyMaker, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1")
    await upsert_platform(db, "plant-2")
    async with (
        api_as(await make_key(Role.OPERATOR, "plant-1")) as one,
        api_as(await make_key(Role.OPERATOR, "plant-2")) as two,
    ):
        await declare(one, "plant-1", byd(name="BYD as plant-1 knows it"))
        await declare(
            one, "plant-1", byd(code=ALIBABA, name="Alibaba", industry="65", above_size=False)
        )
        await declare(two, "plant-2", byd(name="BYD as plant-2 knows it"))
        mine = (await two.get("/platforms/plant-2/enterprises")).json()["items"]
        assert [(e["code"], e["name"]) for e in mine] == [(BYD, "BYD as plant-2 knows it")]
        for path in ("/enterprises", f"/enterprises/{BYD}", f"/enterprises/{ALIBABA}"):
            assert (await two.get(f"/platforms/plant-1{path}")).status_code == 404
        assert (await two.get(f"/platforms/plant-2/enterprises/{ALIBABA}")).status_code == 404
        assert (await two.delete(f"/platforms/plant-1/enterprises/{BYD}")).status_code == 404
        assert (await one.get(f"/platforms/plant-1/enterprises/{BYD}")).json()["name"] == (
            "BYD as plant-1 knows it"
        )
    async with api_as(await make_key(Role.VIEWER, "plant-1")) as viewer:
        refused = await viewer.post(
            "/platforms/plant-1/enterprises", json={"enterprises": [byd(code=CNPC)]}
        )
        assert refused.status_code == 403


async def test_the_migration_maps_platforms_industry_text_and_flags_the_rest(
    database_url: str, unique: str
) -> None:
    """Platforms registered before migration 0031 keep their text; what it cannot map is
    flagged, and an administrator's mapping applies to every platform with that text."""
    schema = f"m_{unique}"
    texts = {
        "cars": "Automotive",
        "named": " 汽车制造业 ",
        "coded": "C36",
        "division": "39",
        "section": "c",
        "chinese-word": "钢铁",
        "widgets": "Widgets & Gadgets",
        "old-default": "unspecified",
        "widgets-2": "widgets & gadgets",
    }
    store = StoreSettings(database_url=database_url, database_schema=schema)
    earlier = [m for m in available_migrations() if m.version < 31]
    async with await connect(store, autocommit=True) as conn:
        try:
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            for migration in earlier:
                await conn.execute(migration.text.encode())
            for platform, text in texts.items():
                await conn.execute(
                    "INSERT INTO platforms (id, name, industry) VALUES (%s, %s, %s)",
                    (platform, platform, text),
                )
            (mapping,) = [m for m in available_migrations() if m.version == 31]
            await conn.execute(mapping.text.encode())
            cur = await conn.execute(
                "SELECT p.id, p.industry, i.industry, i.flagged FROM platforms p "
                "JOIN platform_industries i ON i.platform_id = p.id ORDER BY p.id"
            )
            found = {row[0]: row[1:] for row in await cur.fetchall()}
            assert found == {
                "cars": ("Automotive", "36", False),
                "named": (" 汽车制造业 ", "36", False),
                "coded": ("C36", "36", False),
                "division": ("39", "39", False),
                "section": ("c", "C", False),
                "chinese-word": ("钢铁", "31", False),
                "widgets": ("Widgets & Gadgets", None, True),
                "old-default": ("unspecified", None, True),
                "widgets-2": ("widgets & gadgets", None, True),
            }
            unmapped = await industry_mappings.unmapped(conn)
            assert {u.text: u.platform_ids for u in unmapped} == {
                "unspecified": ["old-default"],
                "Widgets & Gadgets": ["widgets"],
                "widgets & gadgets": ["widgets-2"],
            }
            await industry_mappings.map_text(conn, "WIDGETS & gadgets", "40")
            assert [u.text for u in await industry_mappings.unmapped(conn)] == ["unspecified"]
            assert (await industry_mappings.platform_industry(conn, "widgets")).industry == "40"
        finally:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def test_a_platform_s_classification_has_names_beside_codes(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "jiangsu-cars", region="320000", industry="automotive")
    found = (await api.get("/platforms/jiangsu-cars/classification")).json()
    assert found["region"]["name"] == "江苏省"
    assert found["industry"]["name"] == "汽车制造业"
    assert found["industry_flagged"] is False
    await upsert_platform(db, "odd", industry="stuff")
    assert (await api.get("/platforms/odd/classification")).json()["industry_flagged"] is True
    unmapped = (await api.get("/classification/unmapped-industries")).json()
    assert [u["text"] for u in unmapped] == ["stuff"]
    mapped = await api.put(
        "/classification/industry-mappings", json={"text": "Stuff", "industry": "c"}
    )
    assert mapped.json() == {"text": "Stuff", "industry": "C"}
    found = (await api.get("/platforms/odd/classification")).json()
    assert found["industry"] == {
        "code": "C",
        "name": "制造业",
        "section": "C",
        "section_name": "制造业",
    }
    assert (await api.get("/classification/unmapped-industries")).json() == []
    # The platform's own record carries the same names beside its codes.
    record = (await api.get("/platforms/jiangsu-cars")).json()
    assert (record["region_name"], record["industry_code"], record["industry_name"]) == (
        "江苏省",
        "36",
        "汽车制造业",
    )
    listed = {p["id"]: p for p in (await api.get("/platforms")).json()["items"]}
    assert (listed["odd"]["industry_code"], listed["odd"]["industry_name"]) == ("C", "制造业")
    created = await api.post("/platforms", json={"id": "new-one", "name": "N", "industry": "x y"})
    assert (created.json()["industry_code"], created.json()["region_name"]) == (None, "全国")
    divisions = (await api.get("/classification/industries")).json()
    assert len(divisions) == 117
