"""One step of `make capacity` (loadtests/capacity.py): a fleet of one size against a fresh
`iiot run` cell, judged by the capacity rule, with the CPU of each part of the cell and of the
load generator measured apart.

A process of its own per step: locust patches the standard library with gevent (loadtests.run
does it at import) and keeps its users' state in module globals, so one fleet per process.

1. storm: every gateway connects and sends a reading of each device; wait until the count API
   reports every device connected;
2. hold: one reading per device per `--reading-interval` for `--hold-seconds`, ingest lag
   (points sent, not stored) sampled every 5 s, CPU measured from the hold's start to its end;
3. end: the count must still be exact; the fleet stops; every point sent must be stored.
"""

import loadtests.run as _run  # noqa: I001 - first: it patches the standard library with gevent

import argparse
import json
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from locust.env import Environment

from bench.draining import process_cpu
from loadtests.capacity import judge
from loadtests.fleet import FleetPlan
from loadtests.locustfile import CONTROL, ApiUser, GatewayUser


class CellProcesses:
    """CPU seconds used so far by the cell's processes: `iiot run` (ingest, API and the
    registry's background work in one process), its embedded PostgreSQL server (the postmaster,
    its live backends and those it reaped) and its embedded broker; None for a service the
    cell was given rather than started (IIOT_DATABASE_URL, IIOT_MQTT_URL)."""

    def __init__(self, iiot_pid: int, state_dir: Path) -> None:
        self.iiot_pid = iiot_pid
        self.postgres_pid = _pid_in(state_dir / "postgres" / "postmaster.pid")
        self.broker_pid = _pid_in(state_dir / "mosquitto" / "mosquitto.pid")

    def cpu(self) -> dict[str, float | None]:
        return {
            "iiot_run": process_cpu(str(self.iiot_pid)),
            "postgres": None if self.postgres_pid is None else _tree_cpu(self.postgres_pid),
            "broker": None if self.broker_pid is None else process_cpu(str(self.broker_pid)),
            "load_generator": _own_cpu(),
            "machine": _machine_busy(),
        }


def _pid_in(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


_TICKS = os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    """A server's CPU: its own, its reaped children's (PostgreSQL's postmaster waits for its
    backends) and its live children's."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    used = sum(int(v) for v in fields[11:15]) / _TICKS
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                used += process_cpu(entry.name)
    return used


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> float:
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    idle = int(cpu[3]) + int(cpu[4])
    return (sum(int(v) for v in cpu[:8]) - idle) / _TICKS


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cores(
    before: dict[str, float | None], after: dict[str, float | None], seconds: float
) -> dict[str, float | None]:
    """Cores busy on average over `seconds`, per part."""
    found: dict[str, float | None] = {}
    for part, start in before.items():
        end = after[part]
        found[part] = None if start is None or end is None else round((end - start) / seconds, 3)
    return found


def measure(args: argparse.Namespace) -> dict[str, Any]:
    plan = FleetPlan(
        platform="capacity",
        gateways=args.devices // args.devices_per_gateway,
        devices_per_gateway=args.devices_per_gateway,
        sparkplug_every=args.sparkplug_every,
        topic_root=os.environ.get("IIOT_MQTT_TOPIC_ROOT", "iiot/v1"),
        reading_interval=args.reading_interval,
    )
    report = _run.Report(plan=asdict(plan) | {"devices": plan.devices}, started_at=_run._now())
    step: dict[str, Any] = {
        "devices": plan.devices,
        "gateways": plan.gateways,
        "reading_interval": plan.reading_interval,
        "points_per_reading": 1,  # the fleet's readings carry one metric each (loadtests/fleet.py)
        "hold_seconds": args.hold_seconds,
        "loadavg_at_step_start": _loadavg(),
    }
    os.environ["IIOT_STATE_DIR"] = str(args.state_dir)
    stack = _run.Stack()
    os.environ["IIOT_LOADTEST_API_KEY"] = stack.key
    assert stack.process is not None or "IIOT_LOADTEST_API_URL" in os.environ
    cell = CellProcesses(stack.process.pid if stack.process else 0, args.state_dir)
    CONTROL.plan, CONTROL.broker = plan, stack.mqtt
    api = _run.Api(stack.api, stack.key, plan.platform)
    GatewayUser.fixed_count = plan.gateways
    ApiUser.fixed_count = args.api_users
    classes: list[type[Any]] = [GatewayUser] + ([ApiUser] if args.api_users else [])
    env = Environment(user_classes=classes, host=stack.api)
    runner = env.create_local_runner()
    began = time.monotonic()
    try:
        api.ensure_platform(args.liveness_seconds)
        runner.start(plan.gateways + args.api_users, spawn_rate=max(1.0, plan.gateways / 10))
        if not _run.wait_for(lambda: len(CONTROL.online) >= plan.gateways, args.timeout):
            report.errors.append(f"only {len(CONTROL.online)} gateways connected")
        report.checks.append(_run.converge(api, "storm", plan.devices, args.timeout))
        step["storm_seconds"] = round(time.monotonic() - began, 1)
        step["hold_started_t"] = round(time.monotonic() - began, 1)
        step["loadavg_at_hold_start"] = _loadavg()
        before, hold_began = cell.cpu(), time.monotonic()
        _run.sample_lag(api, report, began, hold_began + args.hold_seconds)
        after = cell.cpu()
        held = time.monotonic() - hold_began
        step["cores"] = cores(before, after, held)
        step["loadavg_at_end_of_hold"] = _loadavg()
        report.checks.append(_run.converge(api, "end of hold", plan.devices, 60))
    finally:
        CONTROL.paused = True
        _run.wait_for(lambda: CONTROL.busy == 0, 60)
        runner.stop()
        runner.quit()
        try:
            _run.drain(args, api, report)
        finally:
            report.errors += CONTROL.errors[:50]
            stack.stop()
    step |= {
        "checks": [asdict(c) for c in report.checks],
        "lag": report.lag,
        "points_sent": report.points_sent,
        "points_stored": report.points_stored,
        "drain_seconds": report.drain_seconds,
        "errors": report.errors,
    }
    verdict = judge(step)
    step |= {"ok": verdict.ok, "reasons": verdict.reasons}
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--devices-per-gateway", type=int, default=1000)
    parser.add_argument("--sparkplug-every", type=int, default=10)
    parser.add_argument("--reading-interval", type=float, default=60.0)
    parser.add_argument("--hold-seconds", type=float, default=120.0)
    parser.add_argument("--liveness-seconds", type=int, default=900)
    parser.add_argument("--api-users", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="per phase")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    step = measure(args)
    args.out.write_text(json.dumps(step, indent=2) + "\n")


if __name__ == "__main__":
    main()
