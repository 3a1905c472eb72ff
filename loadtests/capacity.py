"""`make capacity`: the largest fleet one cell holds at one reading per device a minute.

Steps through fleet sizes (`--fleets 100000,250000,500000,1000000`), each against a fresh
`iiot run` cell (embedded PostgreSQL and broker in a new state directory) in a process of its
own (loadtests/capacity_step.py), judged by the rule in loadtests/README.md; stops at the first
fleet that fails. Reports the largest fleet that passed, the cell's cores per million devices
(`iiot run`, PostgreSQL, the broker) and the load generator's own apart, and writes
bench/results/capacity-latest.json (`--results` to write elsewhere).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results" / "capacity-latest.json"
CELL_PARTS = ("iiot_run", "postgres", "broker")


LAG_ALLOWANCE_SECONDS = 30.0
"""The rule's bound on ingest lag in the hold's second half, in seconds of the fleet's traffic."""


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]


def judge(step: dict[str, Any], *, allowance_seconds: float = LAG_ALLOWANCE_SECONDS) -> Verdict:
    """The capacity rule (loadtests/README.md): a fleet is held when
    1. every device was counted connected after the storm, and again at the end of the hold;
    2. in the hold's second half, ingest's lag (points sent but not yet stored) never exceeded
       `allowance_seconds` of the fleet's traffic: a cell that keeps up is a few seconds of
       batching behind, one that does not falls further behind with every sample;
    3. after the fleet stopped, the points stored equal the points sent;
    4. the load generator reported no errors."""
    reasons = [
        f"{check['phase']}: {check['reported']} connected, expected {check['expected']}"
        for check in step["checks"]
        if not check["ok"]
    ]
    per_second = step["devices"] * step["points_per_reading"] / step["reading_interval"]
    limit = allowance_seconds * per_second
    hold_start = step["hold_started_t"]
    middle = hold_start + step["hold_seconds"] / 2
    late = [s["behind"] for s in step["lag"] if s["t"] >= middle]
    if not late:
        reasons.append("no lag sample in the hold's second half")
    elif max(late) > limit:
        reasons.append(
            f"lag {max(late):,} points in the hold's second half, over {limit:,.0f} "
            f"({allowance_seconds:g} s of traffic)"
        )
    if step["points_stored"] != step["points_sent"]:
        reasons.append(f"{step['points_stored']} points stored of {step['points_sent']} sent")
    reasons += [f"load generator: {e}" for e in step["errors"][:5]]
    return Verdict(not reasons, reasons)


def per_million(step: dict[str, Any]) -> dict[str, float | None]:
    """Cores per million devices, per part of the cell and for the cell as a whole."""
    scale = 1e6 / step["devices"]
    used = step.get("cores") or {}
    found: dict[str, float | None] = {
        part: None if used.get(part) is None else round(used[part] * scale, 3)
        for part in (*CELL_PARTS, "load_generator")
    }
    parts = [used.get(part) for part in CELL_PARTS]
    found["cell"] = None if None in parts else round(sum(p for p in parts if p) * scale, 3)
    return found


def run_step(devices: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"step-{devices}.json"
    command = [
        sys.executable, "-m", "loadtests.capacity_step", "--devices", str(devices),
        "--devices-per-gateway", str(args.devices_per_gateway),
        "--sparkplug-every", str(args.sparkplug_every),
        "--reading-interval", str(args.reading_interval),
        "--hold-seconds", str(args.hold_seconds), "--api-users", str(args.api_users),
        "--timeout", str(args.timeout), "--state-dir", str(work / f"state-{devices}"),
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, check=False)  # noqa: S603 - our own arguments
    if not out.exists():
        return {"devices": devices, "ok": False, "reasons": [f"the step exited {done.returncode}"]}
    step: dict[str, Any] = json.loads(out.read_text())
    step["cores_per_million_devices"] = per_million(step)
    return step


def summary(steps: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    passed = [s for s in steps if s["ok"]]
    largest = max(passed, key=lambda s: s["devices"], default=None)
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {"cores": os.cpu_count(), "note": args.note},
        "rule": {
            "reading_interval_seconds": args.reading_interval,
            "hold_seconds": args.hold_seconds,
            "lag_allowance_seconds_of_traffic": LAG_ALLOWANCE_SECONDS,
            "see": "loadtests/README.md, capacity",
        },
        "largest_fleet_held": largest["devices"] if largest else None,
        "cores_per_million_devices_at_largest": (
            largest["cores_per_million_devices"] if largest else None
        ),
        "first_fleet_failed": next((s["devices"] for s in steps if not s["ok"]), None),
        "steps": steps,
    }


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from the PATH
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip() or "unknown"


def _print(step: dict[str, Any]) -> None:
    cores = step.get("cores") or {}
    shown = ", ".join(f"{k} {v}" for k, v in cores.items() if v is not None)
    verdict = "PASS" if step["ok"] else "FAIL: " + "; ".join(step["reasons"])
    print(
        f"capacity: {step['devices']:,} devices: {verdict}\n"
        f"  cores busy in the hold: {shown or '-'}\n"
        f"  cores per million devices: {step.get('cores_per_million_devices')}\n"
        f"  load average at start / end of hold: {step.get('loadavg_at_hold_start')} / "
        f"{step.get('loadavg_at_end_of_hold')}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fleets",
        default="100000,250000,500000,1000000",
        help="fleet sizes (devices), comma-separated, smallest first",
    )
    parser.add_argument("--devices-per-gateway", type=int, default=1000)
    parser.add_argument("--sparkplug-every", type=int, default=10, help="0: JSON gateways only")
    parser.add_argument("--reading-interval", type=float, default=60.0)
    parser.add_argument("--hold-seconds", type=float, default=120.0)
    parser.add_argument("--api-users", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="per phase of a step")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep-going", action="store_true", help="run the larger fleets after a failure too"
    )
    args = parser.parse_args()
    fleets = sorted(int(f) for f in args.fleets.split(","))
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="iiot-capacity-") as work:
        for devices in fleets:
            step = run_step(devices, args, Path(work))
            steps.append(step)
            _print(step)
            if not step["ok"] and not args.keep_going:
                break
    result = summary(steps, args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    largest = result["largest_fleet_held"]
    print(
        f"capacity: largest fleet held {largest:,} devices at one reading every "
        f"{args.reading_interval:g} s; cores per million devices "
        f"{result['cores_per_million_devices_at_largest']}"
        if largest
        else "capacity: no fleet held",
        flush=True,
    )
    sys.exit(0 if largest else 1)


if __name__ == "__main__":
    main()
