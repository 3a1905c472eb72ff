"""The deploy files, checked without a container engine (none runs here): Kubernetes manifests
against the Kubernetes schemas, and compose, Prometheus, Grafana, EMQX and the Dockerfile
against the CLI, the settings and the metrics that exist."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import typer.main
import yaml

from api.app import create_app
from api.settings import ApiSettings
from iiot.cli import app as cli_app
from iiot.logs import LogSettings
from iiot.stack import RunSettings
from ingest.settings import IngestSettings
from registry.settings import COUNTER_SHARDS

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_DIR = DEPLOY / "compose"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES_VERSION = "1.30.0"
IMAGE = {"iiot", "iiot:local"}


def settings_env() -> set[str]:
    fields = {*RunSettings.model_fields, *LogSettings.model_fields}
    return {f"IIOT_{name.upper()}" for name in fields}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return loaded


def compose_profile(profile: str) -> dict[str, dict[str, Any]]:
    """The services `docker compose` starts with COMPOSE_PROFILES=<profile>."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if profile in service.get("profiles", [profile])
    }


def example_env() -> dict[str, str]:
    lines = (COMPOSE_DIR / "example.env").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def git_ignored(path: Path) -> bool:
    done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
    return done.returncode == 0


def cli_invocations(command: list[str]) -> list[list[str]]:
    """The `iiot` argument lists a container runs: its args, or each `iiot ...` in `sh -c`."""
    if command[:2] == ["sh", "-c"] or command[:1] == ["sh"]:
        script = command[-1]
        return [shlex.split(part)[1:] for part in script.split("&&") if part.strip()]
    return [command]


def check_cli(args: list[str]) -> None:
    """Fails unless `iiot <args>` names a real command with options it accepts."""
    command: Any = typer.main.get_command(cli_app)
    args = list(args)
    path = ["iiot"]
    while hasattr(command, "commands"):  # a group (typer carries its own copy of click)
        assert args, f"{' '.join(path)} needs a subcommand"
        name = args.pop(0)
        ctx = command.make_context(" ".join(path), [], resilient_parsing=True)
        found = command.get_command(ctx, name)
        assert found is not None, f"no command `{' '.join([*path, name])}`"
        command, path = found, [*path, name]
    command.make_context(" ".join(path), args)  # raises on unknown or missing options


def containers(doc: dict[str, Any], kind: str = "containers") -> list[dict[str, Any]]:
    """A workload's containers (or `initContainers`)."""
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) or spec.get("jobTemplate", {})
    found: list[dict[str, Any]] = pod.get(kind, []) if pod else []
    return found


def workloads() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for _, doc in manifests()
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet")
    }


def from_env_names(command: list[str]) -> set[str]:
    return set(re.findall(r"--from-env[ =](\w+)", " ".join(command)))


@pytest.mark.parametrize(
    "args",
    [["ingest", "mqttx"], ["ingest", "mqtt", "--bogus"], ["keys", "import", "--role", "broker"]],
)
def test_the_command_check_refuses_what_the_cli_would(args: list[str]) -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 - click's errors, or our assertion
        check_cli(args)


def monitoring_manifests() -> list[tuple[str, dict[str, Any]]]:
    text = (PROMETHEUS / "monitoring.yaml").read_text()
    return [("monitoring.yaml", doc) for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize(
    ("name", "doc"),
    [*manifests(), *monitoring_manifests()],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_each_kubernetes_manifest_is_valid_for_its_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_kubernetes_workloads_run_real_commands_with_real_settings() -> None:
    config = {
        (doc["kind"], doc["metadata"]["name"]): {**doc.get("data", {}), **doc.get("stringData", {})}
        for _, doc in manifests()
        if doc["kind"] in ("ConfigMap", "Secret")
    }
    known = settings_env()
    checked = 0
    for name, doc in manifests():
        for container in [*containers(doc, "initContainers"), *containers(doc)]:
            command = [*container.get("command", []), *container.get("args", [])]
            for invocation in cli_invocations(command):
                check_cli(invocation)
            env = {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                ref = source.get("configMapRef") or source.get("secretRef")
                env |= set(config[(kind, ref["name"])])
            unknown = env - known - from_env_names(command)
            assert not unknown, f"{name}: no setting reads {sorted(unknown)}"
            checked += 1
            if doc["kind"] in ("Deployment", "StatefulSet") and container in containers(doc):
                _check_probes_and_grace(name, doc, container, config)
    assert checked >= 8


def _check_probes_and_grace(
    name: str,
    doc: dict[str, Any],
    container: dict[str, Any],
    config: dict[tuple[str, str], dict[str, str]],
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = config[("ConfigMap", "iiot")]
    values = settings | {e["name"]: e.get("value") for e in container.get("env", [])}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, name
        port = ports[get["port"]]
        expected = values.get("IIOT_API_PORT") if "api" in container["args"] else None
        expected = expected or values["IIOT_METRICS_PORT"]
        assert str(port) == str(expected), f"{name}: {probe} on {port}, served on {expected}"
    grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(settings["IIOT_SHUTDOWN_GRACE_SECONDS"]), name
    assert container["resources"]["requests"], name
    assert container["resources"]["limits"], name
    assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, name


def test_ingest_mqtt_keeps_stable_client_ids_and_one_sparkplug_consumer() -> None:
    docs = {
        name: doc
        for name, doc in workloads().items()
        if containers(doc)[0]["args"] == ["ingest", "mqtt"]
    }
    assert set(docs) == {"iiot-ingest-mqtt", "iiot-ingest-sparkplug"}
    assert {doc["kind"] for doc in docs.values()} == {"StatefulSet"}
    for doc in docs.values():
        (container,) = containers(doc)
        env = {e["name"]: e for e in container["env"]}
        assert env["IIOT_MQTT_CLIENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert docs["iiot-ingest-sparkplug"]["spec"]["replicas"] == 1
    groups = {
        name: {e["name"]: e.get("value") for e in containers(docs[name])[0]["env"]}[
            "IIOT_SPARKPLUG_GROUPS"
        ]
        for name in ("iiot-ingest-mqtt", "iiot-ingest-sparkplug")
    }
    assert groups == {"iiot-ingest-mqtt": "", "iiot-ingest-sparkplug": "*"}
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_compose_services_run_real_commands_with_real_settings() -> None:
    services = compose()["services"]
    known = settings_env()
    ours = {name: s for name, s in services.items() if s.get("image") in IMAGE}
    assert {"migrate", "keys", "api", "ingest-mqtt-0", "ingest-kafka-0", "ingest-kafka-1"} <= set(
        ours
    )
    for name, service in ours.items():
        command = [*service.get("entrypoint", []), *service["command"]]
        invocations = cli_invocations(command) if command[0] == "sh" else [service["command"]]
        for invocation in invocations:
            check_cli(invocation)
        env = set(service.get("environment", {}))
        unknown = env - known - from_env_names(command)
        assert not unknown, f"{name}: no setting reads {sorted(unknown)}"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on a missing {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not git_ignored(COMPOSE_DIR / source):
                assert (COMPOSE_DIR / source).resolve().exists(), f"{name}: {source}"
    # MQTT ingest processes need distinct client ids, and one consumer for Sparkplug.
    mqtt = [s["environment"] for n, s in ours.items() if n.startswith("ingest-mqtt")]
    assert len({e["IIOT_MQTT_CLIENT_ID"] for e in mqtt}) == len(mqtt)
    assert [e["IIOT_SPARKPLUG_GROUPS"] for e in mqtt].count("*") == 1


def test_prometheus_scrapes_the_services_on_their_metrics_ports() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_target = jobs["iiot-api"]["static_configs"][0]["targets"][0]
    assert api_target == f"api:{services['api']['environment']['IIOT_API_PORT']}"
    assert jobs["iiot-api"]["authorization"]["credentials_file"].endswith("prometheus_key")
    scraped = set()
    for job in ("iiot-ingest-mqtt", "iiot-ingest-kafka"):
        for target in jobs[job]["static_configs"][0]["targets"]:
            host, port = target.split(":")
            assert services[host]["environment"]["IIOT_METRICS_PORT"] == port
            scraped.add(host)
    assert scraped == {name for name in services if name.startswith("ingest-")}


def exported_metrics() -> set[str]:
    """Every metric iiot's /metrics endpoints export (without _total, _bucket... suffixes)."""
    exported = set()
    for source in ("ingest/metrics.py", "ingest/stats.py", "ingest/certificates.py"):
        exported |= set(re.findall(r'"(iiot_[a-z0-9_]+)"', (ROOT / source).read_text()))
    api_metrics = (ROOT / "api" / "routes" / "metrics.py").read_text()
    exported |= set(re.findall(r'"(iiot_[a-z0-9_]+)"', api_metrics))
    exported |= {f"iiot_devices_{name}" for name in re.findall(r'\("(\w+)", "', api_metrics)}
    return exported


def test_grafana_panels_query_metrics_that_exist() -> None:
    exported = exported_metrics()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "iiot.json").read_text())
    queried = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"iiot_[a-z0-9_]+", target["expr"])
    }
    assert len(queried) >= 8
    assert queried <= exported, sorted(queried - exported)


def test_emqx_calls_hooks_that_exist() -> None:
    paths = create_app(ApiSettings(database_url="postgresql://unused")).openapi()["paths"]
    conf = (DEPLOY / "emqx" / "emqx.conf").read_text()
    urls = re.findall(r'url = "http://api:8000(/[^"]+)"', conf)
    assert sorted(urls) == ["/broker/authenticate", "/broker/authorize"]
    assert all("post" in paths[url] for url in urls)


def test_the_image_runs_iiot_as_a_non_root_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["iiot"]' in dockerfile
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), source
    copied = set(re.findall(r"^COPY (api|ingest|registry|iiot) ", dockerfile, re.MULTILINE))
    assert copied == {"api", "ingest", "registry", "iiot"}  # the packages pyproject installs


@pytest.mark.parametrize("profile", ["emqx", "mosquitto"])
def test_compose_ingest_uses_the_broker_its_profile_starts(profile: str) -> None:
    services = compose_profile(profile)
    brokers = [
        name
        for name, service in services.items()
        if "broker" in service.get("networks", {}).get("default", {}).get("aliases", [])
    ]
    assert brokers == [profile]
    assert profile in compose()["services"][profile]["profiles"]  # never started by default
    users = {n: s for n, s in services.items() if "IIOT_MQTT_URL" in s.get("environment", {})}
    assert {"ingest-mqtt-0", "ingest-mqtt-1"} <= set(users)
    for name, service in users.items():
        url = urlsplit(re.sub(r"\$\{[^}]*\}", "secret", service["environment"]["IIOT_MQTT_URL"]))
        assert url.hostname == "broker", f"{name} connects to {url.hostname}"
        assert url.port == 1883  # the broker's listener on the compose network
        assert service["depends_on"][profile]["condition"] == "service_healthy", name
    # Nothing names a service this profile does not start, except as not required.
    for name, service in services.items():
        dependencies = service.get("depends_on", {})
        for dependency in dependencies:
            how = dependencies[dependency] if isinstance(dependencies, dict) else {}
            assert dependency in services or how.get("required") is False, (name, dependency)
        for value in map(str, service.get("environment", {}).values()):
            for host in re.findall(r"@([a-z][a-z0-9-]*):\d+", value):
                assert host in services or host == "broker", f"{name}: {host}"
    assert example_env()["COMPOSE_PROFILES"] in ("emqx", "mosquitto")


def test_compose_mosquitto_is_for_development_on_loopback() -> None:
    mosquitto = compose()["services"]["mosquitto"]
    assert all(str(port).startswith("127.0.0.1:") for port in mosquitto["ports"])


def test_compose_kafka_keeps_its_log_in_its_volume() -> None:
    kafka = compose()["services"]["kafka"]
    mounted = {
        volume.split(":")[1]
        for volume in kafka["volumes"]
        if volume.split(":")[0] in compose()["volumes"]  # a named volume, kept across restarts
    }
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"].split(",")
    assert log_dirs
    assert all(any(d.rstrip("/") == m.rstrip("/") for m in mounted) for d in log_dirs), (
        log_dirs,
        mounted,
    )


def _published(port: str) -> tuple[str, int]:
    """(host address, target port) of a compose port mapping (short syntax)."""
    parts = str(port).split(":")
    address = parts[0] if len(parts) == 3 else "0.0.0.0"  # what compose binds
    return address, int(parts[-1].split("/")[0])


def test_compose_publishes_plain_listeners_on_loopback_only() -> None:
    conf = (DEPLOY / "emqx" / "emqx.conf").read_text()
    tls = {int(port) for port in re.findall(r'listeners\.ssl\.\w+ \{\s*bind = "[^"]*:(\d+)"', conf)}
    assert tls == {8883}
    published = {
        (name, *_published(port))
        for name, service in compose()["services"].items()
        for port in service.get("ports", [])
    }
    assert published
    open_to_all = {(name, port) for name, address, port in published if address != "127.0.0.1"}
    assert open_to_all == {("emqx", port) for port in tls}


SECRET_NAME = re.compile(r"PASSWORD|KEY|COOKIE|SECRET|TOKEN")


def test_compose_secrets_come_from_an_ignored_env_file() -> None:
    assert git_ignored(COMPOSE_DIR / ".env")
    assert git_ignored(COMPOSE_DIR / "certs" / "server.key")
    conf = (DEPLOY / "emqx" / "emqx.conf").read_text()
    assert not re.search(r"^\s*cookie\s*=", conf, re.MULTILINE)
    assert "EMQX_NODE__COOKIE" in compose()["services"]["emqx"]["environment"]
    # Every secret is required from .env (`${NAME:?...}` refuses unset and empty), never a
    # value written here; the example leaves them empty, so a copy left unfilled does not start.
    checked = 0
    for name, service in compose()["services"].items():
        for variable, value in service.get("environment", {}).items():
            if SECRET_NAME.search(variable):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}: {variable}"
                checked += 1
    assert checked >= 5
    secrets = {name: value for name, value in example_env().items() if SECRET_NAME.search(name)}
    assert len(secrets) >= 6
    assert all(value == "" for value in secrets.values()), secrets


def config_map() -> dict[str, str]:
    (data,) = [doc["data"] for _, doc in manifests() if doc["kind"] == "ConfigMap"]
    found: dict[str, str] = data
    return found


def max_replicas(name: str, doc: dict[str, Any]) -> int:
    """What the workload may scale to: its autoscaler's maximum, else its replicas."""
    for _, other in manifests():
        if other["kind"] == "HorizontalPodAutoscaler":
            target = other["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) == (doc["kind"], name):
                return int(other["spec"]["maxReplicas"])
    return int(doc["spec"].get("replicas", 1))


def pod_env(doc: dict[str, Any], container: dict[str, Any], pod: str) -> dict[str, str]:
    """The settings a container of pod `pod` sees: its ConfigMaps' and Secrets' (envFrom),
    then its own env."""
    sources = {
        (manifest["kind"], manifest["metadata"]["name"]): {
            **manifest.get("data", {}),
            **manifest.get("stringData", {}),
        }
        for _, manifest in manifests()
        if manifest["kind"] in ("ConfigMap", "Secret")
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source.get("configMapRef") or source.get("secretRef")
        env.update(sources[(kind, ref["name"])])
    for item in container.get("env", []):
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field is not None:
            assert field == "metadata.name", field
            env[item["name"]] = pod
        elif "value" in item:
            env[item["name"]] = item["value"]
    return env


def pod_names(name: str, doc: dict[str, Any]) -> list[str]:
    count = max_replicas(name, doc)
    if doc["kind"] == "StatefulSet":
        return [f"{name}-{ordinal}" for ordinal in range(count)]
    # A Deployment's pods get a template hash and a random suffix.
    return [f"{name}-7d9c6b5f4-{'bcdfghjklm'[i % 10]}x{i:03x}q" for i in range(count)]


def counter_shards(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """The counter shards `iiot <args>` adds to with `env`, as iiot's own settings derive them."""
    for variable in list(os.environ):
        if variable.startswith("IIOT_"):
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, str(value))
    if args == ["api"]:
        return [ApiSettings().api_counter_shard]
    settings = IngestSettings()
    if args == ["ingest", "kafka"]:
        lanes = settings.kafka_write_lanes
        return [(settings.kafka_shard + lane) % COUNTER_SHARDS for lane in range(lanes)]
    assert args == ["ingest", "mqtt"], args
    return [settings.shard]


def test_counter_shards_are_disjoint_at_maximum_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pod of every workload, each at its maximum replicas, adds to shards of its own
    (and each Kafka write lane to one of its own): no two processes queue on one counter row."""
    taken: dict[int, str] = {}
    pods = 0
    for name, doc in workloads().items():
        if doc["kind"] == "Job":
            continue
        (container,) = containers(doc)
        for pod in pod_names(name, doc):
            env = pod_env(doc, container, pod)
            for shard in counter_shards(container["args"], env, monkeypatch):
                assert 0 <= shard < COUNTER_SHARDS
                assert shard not in taken, f"{pod} and {taken.get(shard)} share shard {shard}"
                taken[shard] = pod
            pods += 1
    assert pods >= 10 + 3 + 1 + 12


def test_compose_processes_add_to_counter_shards_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: dict[int, str] = {}
    for name, service in compose()["services"].items():
        if service.get("command", [None])[0] not in ("api", "ingest"):
            continue
        env = {k: re.sub(r"\$\{[^}]*\}", "x", str(v)) for k, v in service["environment"].items()}
        for shard in counter_shards(service["command"], env, monkeypatch):
            assert shard not in taken, f"{name} and {taken.get(shard)} share shard {shard}"
            taken[shard] = name
    assert len(taken) == 1 + 2 + 2 * 2


def test_a_pod_beyond_its_shard_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIOT_COUNTER_SHARDS", "30-53")
    monkeypatch.setenv("IIOT_KAFKA_WRITE_LANES", "2")
    monkeypatch.setenv("IIOT_POD_NAME", "iiot-ingest-kafka-11")
    assert IngestSettings().kafka_shard == 52
    monkeypatch.setenv("IIOT_POD_NAME", "iiot-ingest-kafka-12")
    with pytest.raises(ValueError, match="beyond IIOT_COUNTER_SHARDS=30-53"):
        _ = IngestSettings().kafka_shard
    monkeypatch.setenv("IIOT_POD_NAME", "iiot-ingest-kafka-7d9c6b5f4-x2q")  # no ordinal
    with pytest.raises(ValueError, match="IIOT_POD_NAME ending in the pod's ordinal"):
        _ = IngestSettings().kafka_shard
    monkeypatch.setenv("IIOT_COUNTER_SHARD", "5")  # an explicit shard wins
    assert IngestSettings().kafka_shard == 5
    monkeypatch.setenv("IIOT_COUNTER_SHARDS", "0-64")
    with pytest.raises(ValueError, match="within 0-63"):
        ApiSettings()


def test_every_workload_migrates_before_it_starts() -> None:
    """No Job with a fixed name to re-apply: each pod runs `iiot migrate` (idempotent, under an
    advisory lock) in an init container, so a new release's pods wait for its migrations."""
    found = workloads()
    assert not [name for name, doc in found.items() if doc["kind"] == "Job"]
    for name, doc in found.items():
        first = containers(doc, "initContainers")[0]
        command = [*first.get("command", []), *first.get("args", [])]
        assert cli_invocations(command)[0] == ["migrate"], name
        assert first["image"] == containers(doc)[0]["image"], name  # the same release
        for container in containers(doc):  # the pre-shared keys stay in the init container
            assert "iiot-keys" not in str(container.get("envFrom")), name
    importing = [
        name
        for name, doc in found.items()
        if any("keys" in str(c.get("args")) for c in containers(doc, "initContainers"))
    ]
    assert importing == ["iiot-api"]


def test_kubernetes_kafka_ingest_speaks_sasl_ssl_with_scram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settings the Kafka pods get are whole (IngestSettings validates them): SASL_SSL
    with SCRAM-SHA-512, the CA a mounted file, the password from a Secret."""
    doc = workloads()["iiot-ingest-kafka"]
    (container,) = containers(doc)
    env = pod_env(doc, container, "iiot-ingest-kafka-0")
    assert "IIOT_KAFKA_SASL_PASSWORD" not in config_map()  # from a Secret
    for variable in list(os.environ):
        if variable.startswith("IIOT_"):
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    settings = IngestSettings()
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_ca_file is not None
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(settings.kafka_ca_file.startswith(f"{m}/") for m in mounts)


def promtool(*args: str) -> str:
    """Runs Debian's promtool (`make test` installs it: the Makefile's promtool target; the
    alert rules' own checks are in tests/test_alerts.py)."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make promtool` (Debian's prometheus package)")
    done = subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_alert_is_unit_tested_on_metrics_that_exist() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {
        "IiotKafkaLagHigh",
        "IiotIngestDelayHigh",
        "IiotDeadLetterRateHigh",
        "IiotCounterDrift",
        "IngestStalled",
        "IiotMaintenanceStale",
        "IiotCertificateExpiresSoon",
    } <= set(alerts)
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == set(alerts)
    exported = exported_metrics() | {"up"}
    queried = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for rule in alerts.values()
        for name in re.findall(r"\b(iiot_[a-z0-9_]+|up)\b", rule["expr"])
    }
    assert queried <= exported, sorted(queried - exported)


def test_the_prometheus_configurations_pass_promtool(tmp_path: Path) -> None:
    promtool("check", "config", "--syntax-only", "prometheus.yml")
    # Debian's promtool is built without Kubernetes discovery: the rest of kubernetes.yml is
    # checked with static targets in its place.
    config = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [
            {"role": "pod", "namespaces": {"names": ["iiot"]}}
        ]
        job["static_configs"] = [{"targets": ["pod:9100"]}]
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    checked = tmp_path / "kubernetes.yml"
    checked.write_text(yaml.safe_dump(config))
    promtool("check", "config", "--syntax-only", str(checked))


def test_kubernetes_scrapes_the_api_with_the_key_from_a_secret() -> None:
    """Annotations cannot carry a key: the API pods have none, and kubernetes.yml scrapes them
    with the viewer key the API's init container registers, mounted from the same Secret."""
    api = workloads()["iiot-api"]
    assert "prometheus.io/scrape" not in str(api["spec"]["template"]["metadata"])
    config = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    credentials = Path(jobs["iiot-api"]["authorization"]["credentials_file"])
    (prometheus,) = [d for _, d in monitoring_manifests() if d["kind"] == "StatefulSet"]
    (container,) = containers(prometheus)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(credentials.parent)]
    (volume,) = [
        v for v in prometheus["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    (item,) = volume["secret"]["items"]
    assert item["path"] == credentials.name
    secret, key = volume["secret"]["secretName"], item["key"]
    # The API's init container imports exactly that key as a national viewer.
    (init,) = containers(api, "initContainers")
    assert {"secretRef": {"name": secret}} in init["envFrom"]
    assert f"--role viewer --name prometheus --from-env {key}" in " ".join(init["args"])
    # Each job's relabelling keeps the pods it means, on the port that serves /metrics.
    for job, names in (
        ("iiot-api", {"iiot-api"}),
        ("iiot-ingest", {"iiot-ingest-mqtt", "iiot-ingest-sparkplug", "iiot-ingest-kafka"}),
    ):
        keep = {
            rule["source_labels"][0]: rule["regex"]
            for rule in jobs[job]["relabel_configs"]
            if rule.get("action") == "keep"
        }
        kept = set()
        for name, doc in workloads().items():
            labels = {
                "__meta_kubernetes_pod_label_" + re.sub(r"[^A-Za-z0-9_]", "_", label): value
                for label, value in doc["spec"]["template"]["metadata"]["labels"].items()
            }
            for port in (p["name"] for c in containers(doc) for p in c["ports"]):
                target = {**labels, "__meta_kubernetes_pod_container_port_name": port}
                if all(re.fullmatch(rx, target.get(label, "")) for label, rx in keep.items()):
                    kept.add(name)
        assert kept == names, job
    prom = yaml.safe_load((PROMETHEUS / "kustomization.yaml").read_text())
    assert prom["resources"] == ["monitoring.yaml"]
    (generator,) = prom["configMapGenerator"]
    assert generator["files"] == ["prometheus.yml=kubernetes.yml", "alerts.yml"]
    config_volume = [
        v for v in prometheus["spec"]["template"]["spec"]["volumes"] if "configMap" in v
    ]
    assert config_volume[0]["configMap"]["name"] == generator["name"]


# What an ingest process takes besides its id caches: the interpreter and libraries (about
# 80 MiB idle), the pool, queues and batches in flight; Kafka's fetch buffers on top.
PROCESS_MIB = 256
KAFKA_FETCH_MIB = 256


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_ingest_memory_limits_hold_the_id_caches_at_their_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limits come from the measured memory per cached id (bench/id_cache_memory.py): a
    pod whose caches fill to IIOT_DEVICE_CACHE_MAX stays within its limit."""
    measured = json.loads((ROOT / "bench" / "results" / "id_cache_memory-latest.json").read_text())

    def per_id(cache: str) -> float:
        return float(measured[cache]["peak_rss_growth_mib"]) / int(measured["devices"])

    checked = 0
    for name, doc in workloads().items():
        (container,) = containers(doc)
        if container["args"][0] != "ingest":
            continue
        for variable in list(os.environ):
            if variable.startswith("IIOT_"):
                monkeypatch.delenv(variable)
        for variable, value in pod_env(doc, container, f"{name}-0").items():
            monkeypatch.setenv(variable, value)
        settings = IngestSettings()
        assert "IIOT_DEVICE_CACHE_MAX" in config_map()  # set, not left to the default
        kafka = container["args"] == ["ingest", "kafka"]
        writers = settings.kafka_write_lanes if kafka else 1  # each writer keeps its renewals
        caches = settings.device_cache_max * (
            per_id("device_ids") + per_id("via_gateway") + writers * per_id("activity_renewals")
        )
        need = PROCESS_MIB + caches + (KAFKA_FETCH_MIB if kafka else 0)
        limit = mebibytes(container["resources"]["limits"]["memory"])
        assert limit >= need, f"{name}: limit {limit} MiB, caches alone {caches:.0f} MiB"
        assert mebibytes(container["resources"]["requests"]["memory"]) >= PROCESS_MIB + caches
        checked += 1
    assert checked == 3
