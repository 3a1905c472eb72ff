"""`make loadtest`: a bounded, headless load test that checks what it did.

Against the local stack (`iiot run`, started here unless IIOT_LOADTEST_API_URL names a running
API, with IIOT_LOADTEST_API_KEY and IIOT_LOADTEST_MQTT), it runs these phases with locust:

1. storm: every gateway connects within `--storm-seconds` and sends a reading of every device;
2. steady: each device reports every `--reading-interval` seconds, for `--steady-seconds`;
3. mass disconnect: `--drop` of the gateways lose their network (no DISCONNECT: Wills fire);
4. rebirth race: they reconnect with a new session, the old session's Will arrives late, and
   they back-fill what they missed as historical readings (the backlog flush);
5. drain: the fleet stops; ingest finishes what the broker holds.

After the storm, the disconnect and the rebirth, it waits for the count API to report exactly
the simulated connected devices; after the rebirth, for the platform's enterprise figures (the
penetration rate's numerators: every gateway belongs to a simulated enterprise) to equal its
own truth; after the drain, for the points stored (the usage ledger) to equal the points sent.
It writes report.json, report.md and locust's HTML report, and exits 1 if any check failed.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after gevent's patching, as locust needs
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.html import get_html_report  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402
from urllib3.util.retry import Retry  # noqa: E402

from iiot.demo_enterprises import simulated_enterprises  # noqa: E402
from loadtests.fleet import FleetPlan  # noqa: E402
from loadtests.locustfile import CONTROL, ApiUser, GatewayUser  # noqa: E402
from registry.enterprises import Declaration  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@dataclass
class Check:
    phase: str
    expected: int
    reported: int | None = None
    seconds: float | None = None
    ok: bool = False


@dataclass
class Report:
    plan: dict[str, Any]
    started_at: str
    phases: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    lag: list[dict[str, Any]] = field(default_factory=list)
    messages_sent: int = 0
    points_sent: int = 0
    historical_points_sent: int = 0
    points_stored: int | None = None
    drain_seconds: float | None = None
    errors: list[str] = field(default_factory=list)
    requests: dict[str, Any] = field(default_factory=dict)
    dropped_gateways: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            all(c.ok for c in self.checks)
            and self.points_stored == self.points_sent
            and not self.errors
        )


class Stack:
    """The API and broker to load: a running stack from the environment, or `iiot run`."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.api = os.environ.get("IIOT_LOADTEST_API_URL", "")
        self.key = os.environ.get("IIOT_LOADTEST_API_KEY", "")
        mqtt = os.environ.get("IIOT_LOADTEST_MQTT", "127.0.0.1:1883")
        self.log = RESULTS / "iiot-run.log"
        if not self.api:
            self._start()
        else:
            host, port = mqtt.rsplit(":", 1)
            self.mqtt = (host, int(port))

    def _start(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"IIOT_SIMULATE_DEVICES": "0", "IIOT_LOG_FORMAT": "console"}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "iiot.cli", "run"], env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            api = re.search(r"API: +(http://\S+)", text)
            key = re.search(r"Admin API key: +(iiot_\S+)", text)
            mqtt = re.search(r"MQTT broker: +mqtt://([^\s:]+):(\d+)", text)
            if api and key and mqtt and _ready(api.group(1)):
                self.api, self.key = api.group(1), key.group(1)
                self.mqtt = (mqtt.group(1), int(mqtt.group(2)))
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"iiot run exited:\n{text[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError("iiot run did not start within 120 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(60)


def _ready(base: str) -> bool:
    try:
        return requests.get(f"{base}/readyz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


class Api:
    def __init__(self, base: str, key: str, platform: str) -> None:
        self.base, self.platform = base, platform
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        # A busy server closes idle keep-alive connections: retry reads on a fresh one.
        retry = Retry(total=5, backoff_factor=0.5, allowed_methods=None, status_forcelist=[503])
        self.http.mount("http://", HTTPAdapter(max_retries=retry))

    def ensure_platform(self, liveness_seconds: int) -> None:
        body = {
            "id": self.platform,
            "name": f"Load test {self.platform}",
            "liveness_seconds": liveness_seconds,
            "auto_provision": True,
        }
        response = self.http.post(f"{self.base}/platforms", json=body, timeout=10)
        if response.status_code == 409:
            return
        response.raise_for_status()
        # Ingest subscribes to a platform's topics once the registry announces it, within
        # moments (docs/operations.md, "Cells"); what is published before goes to no one.
        time.sleep(1)

    def declare_enterprises(self, declared: list[Declaration]) -> None:
        items = [
            {"code": d.code, "name": d.name, "industry": d.industry, "above_size": d.above_size}
            for d in declared
        ]
        url = f"{self.base}/platforms/{self.platform}/enterprises"
        self.http.post(url, json={"enterprises": items}, timeout=30).raise_for_status()

    def link_gateways(self, links: dict[str, str]) -> str | None:
        """Links gateways to enterprises; the refusal's detail, or None."""
        url = f"{self.base}/platforms/{self.platform}/enterprise-links"
        response = self.http.post(url, json={"gateways": links}, timeout=60)
        return None if response.status_code == 200 else response.text[:300]

    def enterprise_figures(self) -> tuple[int, int]:
        """The platform's enterprises above designated size: served, and with a device
        connected in the last 30 days (its part of the penetration rate's numerators)."""
        response = self.http.get(f"{self.base}/penetration/indicators", timeout=30)
        response.raise_for_status()
        (row,) = [i for i in response.json()["items"] if i["platform"] == self.platform]
        return row["enterprises_above_size"], row["enterprises_connected_30d"]

    def connected(self) -> int:
        response = self.http.get(f"{self.base}/platforms/{self.platform}/devices/count", timeout=10)
        response.raise_for_status()
        connected: int = response.json()["connected"]
        return connected

    def points_stored(self) -> int:
        response = self.http.get(
            f"{self.base}/platforms/{self.platform}/usage",
            params={"start": "2000-01-01", "end": "2100-01-01"},
            timeout=30,
        )
        if response.status_code == 422:  # more than a year asked: ask for the last 366 days
            response = self.http.get(f"{self.base}/platforms/{self.platform}/usage", timeout=30)
        response.raise_for_status()
        return sum(day["points"] for day in response.json()["days"])


def converge(api: Api, phase: str, expected: int, timeout: float) -> Check:
    """Waits for the count API to report `expected` connected devices."""
    check = Check(phase, expected)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        check.reported = api.connected()
        if check.reported == expected:
            check.ok = True
            break
        gevent.sleep(0.5)
    check.seconds = round(time.monotonic() - started, 1)
    status = "ok" if check.ok else "MISMATCH"
    print(f"  {phase}: {check.reported:,} connected, expected {expected:,} ({status}, "
          f"{check.seconds} s)", flush=True)  # fmt: skip
    return check


def enterprise_plan(plan: FleetPlan) -> tuple[list[Declaration], dict[str, str]]:
    """The simulated enterprises and each gateway's: half as many enterprises as gateways
    own them in turn, and two more own none (served, never connected)."""
    owners = max(1, (plan.gateways + 1) // 2)
    declared = simulated_enterprises(owners + 2, prefix="LT")
    links = {plan.gateway_id(g): declared[g % owners].code for g in range(plan.gateways)}
    return declared, links


def check_enterprises(
    api: Api, declared: list[Declaration], owned: set[str], timeout: float
) -> list[Check]:
    """Waits for the platform's enterprise figures to equal the truth: every enterprise above
    designated size is served; those owning a gateway had a device connected."""
    served = Check("enterprises served", sum(d.above_size for d in declared))
    connected = Check(
        "enterprises connected 30 d", sum(d.above_size for d in declared if d.code in owned)
    )
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        served.reported, connected.reported = api.enterprise_figures()
        served.ok = served.reported == served.expected
        connected.ok = connected.reported == connected.expected
        if served.ok and connected.ok:
            break
        gevent.sleep(1)
    for check in (served, connected):
        check.seconds = round(time.monotonic() - started, 1)
        print(f"  {check.phase}: {check.reported}, expected {check.expected} "
              f"({'ok' if check.ok else 'MISMATCH'}, {check.seconds} s)", flush=True)  # fmt: skip
    return [served, connected]


def wait_for(condition: Any, timeout: float) -> bool:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return True
        gevent.sleep(0.2)
    return False


def sample_lag(api: Api, report: Report, started: float, until: float) -> None:
    while time.monotonic() < until:
        stored = api.points_stored()
        sent = CONTROL.tally.points
        report.lag.append(
            {"t": round(time.monotonic() - started, 1), "sent": sent, "stored": stored,
             "behind": sent - stored}
        )  # fmt: skip
        gevent.sleep(min(5.0, max(0.0, until - time.monotonic())))


def run(args: argparse.Namespace) -> Report:
    plan = FleetPlan(
        platform=args.platform,
        gateways=args.gateways,
        devices_per_gateway=args.devices_per_gateway,
        sparkplug_every=args.sparkplug_every,
        topic_root=os.environ.get("IIOT_MQTT_TOPIC_ROOT", "iiot/v1"),
        reading_interval=args.reading_interval,
    )
    report = Report(plan=asdict(plan) | {"devices": plan.devices}, started_at=_now())
    stack = Stack()
    os.environ["IIOT_LOADTEST_API_KEY"] = stack.key
    CONTROL.plan, CONTROL.broker = plan, stack.mqtt
    api = Api(stack.api, stack.key, plan.platform)
    # Fixed counts: exactly the gateways asked for, and the operators beside them.
    GatewayUser.fixed_count = plan.gateways
    ApiUser.fixed_count = args.api_users
    classes: list[type[Any]] = [GatewayUser] + ([ApiUser] if args.api_users else [])
    env = Environment(user_classes=classes, host=stack.api)
    runner = env.create_local_runner()
    try:
        api.ensure_platform(args.liveness_seconds)
        print(f"load test: {plan.gateways:,} gateways x {plan.devices_per_gateway:,} devices "
              f"= {plan.devices:,} devices on {stack.api}", flush=True)  # fmt: skip
        scenario(args, plan, api, runner, report)
    finally:
        # Let every gateway finish the message in hand, so what was sent is what was counted.
        CONTROL.paused = True
        wait_for(lambda: CONTROL.busy == 0, 60)
        runner.stop()
        runner.quit()
        try:
            drain(args, api, report)
        finally:
            report.errors += CONTROL.errors[:50]
            report.requests = _request_stats(env)
            _write(report, env, args.out)
            stack.stop()
    return report


def scenario(
    args: argparse.Namespace, plan: FleetPlan, api: Api, runner: Any, report: Report
) -> None:
    """Storm, steady, mass disconnect, rebirth race with backlog: each checked."""
    began = phase = time.monotonic()
    users = plan.gateways + args.api_users
    runner.start(users, spawn_rate=max(1.0, plan.gateways / args.storm_seconds))
    if not wait_for(lambda: len(CONTROL.online) >= plan.gateways, args.timeout):
        report.errors.append(f"only {len(CONTROL.online)} gateways connected")
    report.checks.append(converge(api, "storm", plan.devices, args.timeout))
    report.phases["storm"] = round(time.monotonic() - phase, 1)
    # The gateways are registered now: each joins its simulated enterprise.
    declared, links = enterprise_plan(plan)
    api.declare_enterprises(declared)
    refused = api.link_gateways(links)
    if refused:
        report.errors.append(f"gateways not linked to their enterprises: {refused}")

    phase = time.monotonic()
    sample_lag(api, report, began, time.monotonic() + args.steady_seconds)
    report.phases["steady"] = round(time.monotonic() - phase, 1)

    phase = time.monotonic()
    # The same gateways every run (a fixed seed): a run can be compared with another.
    chosen = random.Random(7).sample(range(plan.gateways), int(plan.gateways * args.drop))  # noqa: S311
    dropped = set(chosen)
    report.dropped_gateways = sorted(plan.gateway_id(g) for g in dropped)
    CONTROL.dropped = dropped
    wait_for(lambda: not (CONTROL.online & dropped), args.timeout)
    expected = plan.devices - len(dropped) * plan.devices_per_gateway
    report.checks.append(converge(api, "mass disconnect", expected, args.timeout))
    report.phases["mass disconnect"] = round(time.monotonic() - phase, 1)
    gevent.sleep(args.outage_seconds)  # the outage the back-fill will cover

    phase = time.monotonic()
    CONTROL.race = True
    CONTROL.dropped = set()
    wait_for(lambda: len(CONTROL.online) >= plan.gateways, args.timeout)
    report.checks.append(converge(api, "rebirth", plan.devices, args.timeout))
    report.phases["rebirth and backlog"] = round(time.monotonic() - phase, 1)

    phase = time.monotonic()
    report.checks += check_enterprises(api, declared, set(links.values()), args.timeout)
    report.phases["enterprises"] = round(time.monotonic() - phase, 1)


def drain(args: argparse.Namespace, api: Api, report: Report) -> None:
    """After the fleet stopped: waits until ingest stored what was sent."""
    phase = time.monotonic()
    report.messages_sent = CONTROL.tally.messages
    report.points_sent = CONTROL.tally.points
    report.historical_points_sent = CONTROL.tally.historical_points
    wait_for(lambda: api.points_stored() >= report.points_sent, args.timeout)
    report.points_stored = api.points_stored()
    report.drain_seconds = round(time.monotonic() - phase, 1)


def _request_stats(env: Environment) -> dict[str, Any]:
    return {
        f"{s.method} {s.name}": {
            "requests": s.num_requests,
            "failures": s.num_failures,
            "p50_ms": s.get_response_time_percentile(0.5),
            "p99_ms": s.get_response_time_percentile(0.99),
        }
        for s in env.stats.entries.values()
    }


def _write(report: Report, env: Environment, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(report) | {"ok": report.ok}
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "locust.html").write_text(get_html_report(env))
    lines = [
        f"# Load test {report.started_at}",
        "",
        f"- devices simulated: {report.plan['devices']:,} ({report.plan['gateways']:,} gateways"
        f" x {report.plan['devices_per_gateway']:,}; 1 gateway in "
        f"{report.plan['sparkplug_every']} speaks Sparkplug B)",
        f"- per device: one reading every {report.plan['reading_interval']:g} s",
        f"- messages sent: {report.messages_sent:,}; points sent: {report.points_sent:,} "
        f"(of which historical back-fill: {report.historical_points_sent:,})",
        f"- points stored: {report.points_stored if report.points_stored is None else format(report.points_stored, ',')}"  # noqa: E501
        f" (drain after the fleet stopped: {report.drain_seconds} s)",
        "",
        "| check | expected | the API reported | seconds to agree | ok |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c.phase} | {c.expected:,} | {c.reported if c.reported is None else format(c.reported, ',')} "  # noqa: E501
        f"| {c.seconds} | {'yes' if c.ok else 'NO'} |"
        for c in report.checks
    ]
    lines += ["", "Ingest lag (points sent but not yet stored):", ""]
    lines += [f"- t={s['t']} s: {s['behind']:,}" for s in report.lag]
    lines += ["", f"Phases (s): {report.phases}", f"Errors: {report.errors or 'none'}", ""]
    lines += [f"Result: {'PASS' if report.ok else 'FAIL'}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default="loadtest")
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--devices-per-gateway", type=int, default=1000)
    parser.add_argument("--sparkplug-every", type=int, default=10, help="0: JSON gateways only")
    parser.add_argument(
        "--reading-interval",
        type=float,
        default=300.0,
        help="seconds between two readings of a device (300: what 2 cores sustain for 1 M)",
    )
    parser.add_argument("--liveness-seconds", type=int, default=900)
    parser.add_argument("--storm-seconds", type=float, default=10.0)
    parser.add_argument("--steady-seconds", type=float, default=120.0)
    parser.add_argument("--drop", type=float, default=0.3, help="share of gateways dropped")
    parser.add_argument("--outage-seconds", type=float, default=30.0)
    parser.add_argument("--api-users", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or RESULTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = run(args)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
