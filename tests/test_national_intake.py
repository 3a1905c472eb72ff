"""The aggregator's intake over HTTP, against `iiot national serve` in a process of its own:
accepted, duplicate, replayed, out-of-order, tampered, unknown-cell and invalid snapshots,
each refusal recorded; platform claims, conflicts, and a move between cells counted once."""

import asyncio
import hashlib
import re
from datetime import UTC, datetime

import pytest

from tests import national
from tests.national import Aggregator, SimCell, platform

aggregator = national.aggregator  # the fixture
pytestmark = pytest.mark.slow


async def test_a_snapshot_is_taken_once_in_order_and_every_refusal_is_recorded(
    aggregator: Aggregator,
) -> None:
    cell, stranger = SimCell("east"), SimCell("nowhere")
    await aggregator.register(cell)
    async with aggregator.client() as http:
        first = cell.body([platform("p1", connected=5)])
        answer = await cell.push(http, first)
        assert answer.status_code == 202, answer.text
        assert answer.json() == {
            "status": "accepted",
            "sequence": 1,
            "next_sequence": 2,
            "refused_platforms": [],
        }
        # The same bytes again (a retry after a lost response): a duplicate, nothing changes.
        again = await cell.push(http, first)
        assert again.status_code == 200, again.text
        assert again.json() == {"status": "duplicate", "next_sequence": 2}
        # Sequence 1 with other bytes: replayed.
        other = cell.body([platform("p1", connected=99)], sequence=1)
        replayed = await cell.push(http, other)
        assert replayed.status_code == 409, replayed.text
        assert replayed.headers["content-type"] == "application/problem+json"
        assert replayed.json()["type"].endswith("/replayed")
        assert replayed.json()["next_sequence"] == 2
        # Sequence 3 before 2: out of order.
        skipped = cell.body([platform("p1", connected=7)], sequence=3)
        out_of_order = await cell.push(http, skipped)
        assert out_of_order.status_code == 409, out_of_order.text
        assert out_of_order.json()["type"].endswith("/out-of-order")
        assert out_of_order.json()["next_sequence"] == 2
        # A byte changed after signing: tampered.
        second = cell.body([platform("p1", connected=6)], sequence=2)
        tampered = second.replace(b'"connected":6', b'"connected":600')
        assert tampered != second
        refused = await http.post("/snapshots", content=tampered, headers=cell.headers(second))
        assert refused.status_code == 401, refused.text
        assert refused.json()["type"].endswith("/bad-signature")
        # Signed well by a cell nobody registered.
        unknown = await stranger.push(http, stranger.body([platform("p9")]))
        assert unknown.status_code == 403, unknown.text
        assert unknown.json()["type"].endswith("/unknown-cell")
        # A good signature over something that is not a snapshot.
        garbage = b'{"format": "iiot-snapshot/1"}'
        invalid = await http.post("/snapshots", content=garbage, headers=cell.headers(garbage))
        assert invalid.status_code == 422, invalid.text
        assert invalid.json()["type"].endswith("/invalid-snapshot")
        # A time without an offset cannot be compared with ours: refused, with the reason.
        zoned = cell.body([platform("p1")], sequence=2)
        naive = re.sub(rb'"taken_at":"[^"]+"', b'"taken_at":"2026-12-04T10:00:00"', zoned)
        assert naive != zoned
        unzoned = await cell.push(http, naive)
        assert unzoned.status_code == 422, unzoned.text
        assert "UTC offset" in unzoned.json()["detail"]
        # The untampered second snapshot still goes in: nothing above moved the sequence.
        assert (await cell.push(http, second)).status_code == 202

        totals = (await http.get("/national/totals")).json()
        assert totals["totals"]["connected"] == 6
        listed = (await http.get("/national/refusals")).json()["refusals"]
        assert [(r["cell"], r["sequence"], r["reason"]) for r in listed] == [
            ("east", 1, "duplicate"),
            ("east", 1, "replayed"),
            ("east", 3, "out-of-order"),
            ("east", None, "bad-signature"),
            ("nowhere", None, "unknown-cell"),
            ("east", None, "invalid-snapshot"),
            ("east", 2, "invalid-snapshot"),
        ]
        assert listed[3]["body_sha256"] == hashlib.sha256(tampered).hexdigest()
        history = (await http.get("/national/cells/east/snapshots")).json()["snapshots"]
        assert [s["sequence"] for s in history] == [1, 2]
        # The stored bytes verify again under the cell's key.
        stored = await http.get("/national/cells/east/snapshots/2")
        assert stored.content == second
        metrics = (await http.get("/metrics")).text
        assert 'iiot_national_snapshots_refused_total{reason="replayed"} 1.0' in metrics
        assert 'iiot_national_snapshots_accepted_total{cell="east"} 2.0' in metrics


async def test_a_platform_held_by_another_cell_is_refused_and_a_move_counts_it_once(
    aggregator: Aggregator,
) -> None:
    east, west = SimCell("east"), SimCell("west")
    await aggregator.register(east, west)
    async with aggregator.client() as http:

        async def national() -> tuple[int, list[str]]:
            answer = (await http.get("/national/totals")).json()
            return answer["totals"]["connected"], answer["moving_platforms"]

        await east.push(
            http, east.body([platform("p1", connected=10), platform("p2", connected=1)])
        )
        claim = await west.push(http, west.body([platform("p1", connected=10)]))
        assert claim.status_code == 202
        assert claim.json()["refused_platforms"] == ["p1"]
        assert await national() == (11, [])
        conflicts = (await http.get("/national/conflicts")).json()["conflicts"]
        assert [(c["platform"], c["claimed_by"], c["held_by"]) for c in conflicts] == [
            ("p1", "west", "east")
        ]
        assert "iiot_national_platform_conflicts_total 1.0" in (await http.get("/metrics")).text

        # East releases p1 to west (signed, in its snapshot) and stops listing it: its last
        # figures keep counting, once, until west claims it.
        release = {
            "platform": "p1",
            "to_cell": "west",
            "released_at": datetime.now(UTC).isoformat(),
        }
        await east.push(http, east.body([platform("p2", connected=1)], releases=[release]))
        assert await national() == (11, ["p1"])
        await west.push(http, west.body([]))  # west not yet serving it: still east's figures
        assert await national() == (11, ["p1"])
        await west.push(http, west.body([platform("p1", connected=12)]))
        assert await national() == (13, [])
        # East repeating its release changes nothing; east claiming p1 again is a conflict.
        await east.push(http, east.body([platform("p2", connected=1)], releases=[release]))
        refused = await east.push(http, east.body([platform("p1", connected=12), platform("p2")]))
        assert refused.json()["refused_platforms"] == ["p1"]
        rows = (await http.get("/national/platforms")).json()["platforms"]
        assert {(r["platform"], r["cell"], r["status"]) for r in rows} == {
            ("p1", "west", "counted"),
            ("p2", "east", "counted"),
        }
        moves = (await http.get("/national/moves")).json()["moves"]
        assert [(m["platform"], m["from_cell"], m["to_cell"]) for m in moves] == [
            ("p1", "east", "west")
        ]
        assert moves[0]["claimed_at"] is not None


async def test_two_cells_claiming_new_platforms_at_once_get_one_holder_each(
    aggregator: Aggregator,
) -> None:
    """Both snapshots are taken at the same moment; whichever commits first holds each
    platform, and the other's claim is refused and recorded, never silently overwritten."""
    east, west = SimCell("east"), SimCell("west")
    await aggregator.register(east, west)
    async with aggregator.client() as http:
        for round_ in range(5):
            listed = [platform(f"r{round_}-p{n}", connected=1) for n in range(20)]
            answers = await asyncio.gather(
                east.push(http, east.body(listed)), west.push(http, west.body(listed))
            )
            assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
            refused = [set(a.json()["refused_platforms"]) for a in answers]
            ids = {p["id"] for p in listed}
            # Each platform accepted from exactly one of them.
            assert refused[0] | refused[1] == ids, refused
            assert not refused[0] & refused[1]
            rows = (await http.get("/national/platforms")).json()["platforms"]
            holders = {r["platform"]: r["cell"] for r in rows if r["platform"] in ids}
            assert holders == {p: ("west" if p in refused[0] else "east") for p in sorted(ids)}
            totals = (await http.get("/national/totals")).json()["totals"]
            assert totals["connected"] == 20  # each cell lists only this round's platforms
