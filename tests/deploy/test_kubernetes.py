"""deploy/kubernetes/ checked offline against Kubernetes' schemas, KEDA's, and the code it runs.

- Every manifest the kustomization lists validates against Kubernetes' own schemas
  (kubernetes-validate, strict: an unknown field fails, as `kubectl apply` rejects it), for the
  oldest release these manifests claim and the newest the package ships.
- The ScaledObject, a KEDA custom resource that kubernetes-validate cannot know, validates
  against KEDA's ScaledObject CRD kept beside this file (made strict the same way), and its
  triggers, the commented cluster variant too, use only metadata that KEDA's redis-streams
  scalers read.
- What the manifests run exists: each command is a command of the CLI taking the options given,
  each probe path a route that answers a kubelet (a pod IP as Host, no key), each container
  port the port its command listens on, each `EMBEDSTREAM_*` variable a Settings field whose
  value parses.
- The stream KEDA watches is the one the workers read: `Keys(prefix).queue(model, "bulk")` for
  the prefix and model the manifests configure, GROUP its consumer group, on the workers' Redis.

Only the probe test talks to a server: the app in-process, on the suite's embedded Valkey.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.main import get_command

from embedstream.cli import app as cli_app
from embedstream.logs import LOG_FORMATS
from embedstream.processes import server_config
from mcp_server.app import JANITOR_STOP_S, create_app
from pipeline.keys import GROUP, Keys
from pipeline.settings import PREFIX, Settings
from tests.support.rest import serving
from workers.cache import cache_scope

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
KEDA_CRD = Path(__file__).with_name("keda-scaledobject-crd.yaml")
# The oldest Kubernetes these manifests claim (policy/v1, autoscaling/v2 behavior in KEDA's
# HPA), and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())

# Trigger metadata KEDA's Redis Streams scalers read (keda.sh/docs/2.21/scalers/redis-streams
# and redis-cluster-streams): anything else is ignored by KEDA, so a typo would pass silently.
STREAM_KEYS = frozenset({
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
})
TRIGGER_KEYS = {
    "redis-streams": STREAM_KEYS | {"address", "host", "port", "addressFromEnv", "hostFromEnv",
                                    "portFromEnv"},
    "redis-cluster-streams": STREAM_KEYS | {"addresses", "hosts", "ports", "addressesFromEnv",
                                            "hostsFromEnv", "portsFromEnv"},
}
COUNTS = ("pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
          "databaseIndex")
# What each command writes, measured by running it as these manifests do (uid 10001, read-only
# root): `serve` writes no file, `worker` its ONNX export; torch, exporting, writes /tmp.
WRITTEN = {"serve": ("/tmp",), "worker": ("/tmp", "data_dir", "export_dir")}
CREDENTIALS = ("api_keys", "admin_keys", "metrics_token")
STAND_IN = "stand-in"  # the value of a variable from a Secret, a field or a resource
REFERENCE = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kustomization() -> dict[str, Any]:
    """deploy/kubernetes/kustomization.yaml."""
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return loaded


def manifests() -> list[dict[str, Any]]:
    """Every object of every file the kustomization lists, in order."""
    found = []
    for name in kustomization()["resources"]:
        found += [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]
    return found


def find(kind: str, name: str) -> dict[str, Any]:
    """The one object of `kind` named `name`."""
    (match,) = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return match


def deployments() -> list[dict[str, Any]]:
    return [m for m in manifests() if m["kind"] == "Deployment"]


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) of every container of every Deployment."""
    for deployment in deployments():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield pod, container


def container_of(deployment: str) -> dict[str, Any]:
    """The first container of a Deployment (the one KEDA reads variables from)."""
    container: dict[str, Any] = find("Deployment", deployment)["spec"]["template"]["spec"][
        "containers"][0]
    return container


def source_values(source: dict[str, Any]) -> dict[str, str]:
    """The variables an `envFrom` entry brings: a ConfigMap's data, a Secret's stringData."""
    if "configMapRef" in source:
        return dict(find("ConfigMap", source["configMapRef"]["name"])["data"])
    return dict(find("Secret", source["secretRef"]["name"]).get("stringData", {}))


def expand(value: str, known: dict[str, str]) -> str:
    """Kubernetes' `$(NAME)` expansion; a reference to an unknown name stays as written."""
    return REFERENCE.sub(lambda m: known.get(m.group(1), m.group(0)), value)


def environment(container: dict[str, Any]) -> dict[str, str]:
    """A container's variables as Kubernetes builds them (values from elsewhere: STAND_IN)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(source_values(source))
    for variable in container.get("env", []):
        raw = variable.get("value", STAND_IN if "valueFrom" in variable else "")
        env[variable["name"]] = expand(raw, env)
    return env


def settings_of(container: dict[str, Any], **overrides: Any) -> Settings:
    """The Settings a container's process reads from its environment."""
    env = {k: v for k, v in environment(container).items() if k.startswith(PREFIX)}
    return Settings.from_env(env, **overrides)


def argv(container: dict[str, Any]) -> list[str]:
    """What the container runs, references expanded as Kubernetes does."""
    env = environment(container)
    return [expand(part, env) for part in [*container.get("command", []),
                                           *container.get("args", [])]]


def parse_command(container: dict[str, Any]) -> tuple[str, Any]:
    """The CLI subcommand a container runs, and its options parsed as the CLI parses them."""
    program, name, *options = argv(container)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts, f"{program!r} is not a script the image installs"
    command = get_command(cli_app).commands.get(name)  # type: ignore[attr-defined]
    assert command is not None, f"`embedstream {name}` is not a command"
    return name, command.make_context(name, options)


def scaled_object() -> dict[str, Any]:
    (found,) = [m for m in manifests() if m["kind"] == "ScaledObject"]
    return found


def commented_triggers() -> list[dict[str, Any]]:
    """The trigger written out in comments in worker-scaledobject.yaml (the cluster variant)."""
    lines = (DEPLOY / "worker-scaledobject.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("# - type: "))
    block = []
    for line in lines[start:]:
        if not line.lstrip().startswith("#"):
            break
        block.append(re.sub(r"^\s*# ?", "", line))
    triggers: list[dict[str, Any]] = yaml.safe_load("\n".join(block))
    return triggers


def strict(schema: Any) -> Any:
    """`schema` with every object closed to fields it does not name, as `kubectl apply` is."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items()}
    if ("properties" in closed and "additionalProperties" not in closed
            and not closed.get("x-kubernetes-preserve-unknown-fields")):
        closed["additionalProperties"] = False
    return closed


def keda_schema() -> dict[str, Any]:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = strict(version["schema"]["openAPIV3Schema"])
    return schema


def test_the_kustomization_lists_every_manifest_of_its_folder() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_manifest_validates_strictly(version: str) -> None:
    kinds = set()
    for manifest in manifests():
        if manifest["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: checked against KEDA's CRD below
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: "
                        f"{exc.message}")
        kinds.add(manifest["kind"])
    assert kinds == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}


def test_every_deployment_has_a_disruption_budget() -> None:
    budgets = [m["spec"]["selector"]["matchLabels"] for m in manifests()
               if m["kind"] == "PodDisruptionBudget"]
    for deployment in deployments():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(b.items() <= labels.items() for b in budgets), deployment["metadata"]["name"]


def test_the_scaledobject_validates_against_kedas_crd() -> None:
    obj = scaled_object()
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    validator = jsonschema.Draft202012Validator(keda_schema())
    problems = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    assert not problems, problems
    # The CRD leaves metadata open: it is Kubernetes' ObjectMeta, checked as a ConfigMap's is.
    stand_in = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(stand_in, KUBERNETES_VERSIONS[0], strict=True)
    for trigger in commented_triggers():
        variant = copy.deepcopy(obj)
        variant["spec"]["triggers"] = [trigger]
        assert not list(validator.iter_errors(variant)), trigger


def test_the_strict_keda_schema_refuses_a_misspelt_field() -> None:
    obj = copy.deepcopy(scaled_object())
    obj["spec"]["minReplicas"] = 2
    validator = jsonschema.Draft202012Validator(keda_schema())
    assert any("minReplicas" in e.message for e in validator.iter_errors(obj))


def test_each_trigger_uses_only_what_kedas_redis_streams_scalers_read() -> None:
    triggers = [*scaled_object()["spec"]["triggers"], *commented_triggers()]
    assert [t["type"] for t in triggers] == ["redis-streams", "redis-cluster-streams"]
    for trigger in triggers:
        metadata = trigger["metadata"]
        unknown = set(metadata) - TRIGGER_KEYS[trigger["type"]]
        assert not unknown, f"{trigger['type']} does not read {sorted(unknown)}"
        assert metadata["stream"] and metadata["consumerGroup"]
        # The lag: entries not yet delivered to the group, the backlog a new worker can take.
        assert "lagCount" in metadata and "pendingEntriesCount" not in metadata
        for key in set(COUNTS) & set(metadata):
            assert metadata[key].isdigit(), f"{key}: {metadata[key]!r} is not a count"
        assert {"address", "addresses"} & set(metadata)


def test_the_scaledobject_scales_the_worker_deployment_reading_its_password() -> None:
    spec = scaled_object()["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    worker = find("Deployment", target["name"])
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["command"][1] == "worker"
    assert "replicas" not in worker["spec"], "an apply would undo KEDA's count"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    names = {v["name"] for v in container.get("env", [])}
    for trigger in [*spec["triggers"], *commented_triggers()]:
        for key, value in trigger["metadata"].items():
            if key.endswith("FromEnv"):
                assert value in names, f"{key}: the worker container has no {value}"


def test_the_stream_keda_watches_is_the_bulk_lane_the_workers_read() -> None:
    settings = settings_of(container_of("embedstream-worker"))
    lane = Keys(settings.key_prefix).queue(settings.model, "bulk")
    # One trigger watches one stream: the manifests keep the lane in one partition.
    assert settings.queue_partitions == 1
    for trigger in [*scaled_object()["spec"]["triggers"], *commented_triggers()]:
        assert trigger["metadata"]["stream"] == lane
        assert trigger["metadata"]["consumerGroup"] == GROUP


def test_keda_watches_the_redis_the_workers_use() -> None:
    url = urlsplit(settings_of(container_of("embedstream-worker")).redis_url or "")
    (trigger,) = scaled_object()["spec"]["triggers"]
    metadata = trigger["metadata"]
    host, _, port = metadata["address"].rpartition(":")
    service, namespace, *_ = host.split(".")
    assert (service, int(port)) == (url.hostname, url.port)
    assert namespace == kustomization()["namespace"], "KEDA connects from its own namespace"
    assert metadata.get("databaseIndex", "0") == (url.path.strip("/") or "0")


def test_every_command_is_a_command_of_the_cli_with_options_it_takes() -> None:
    commands = set()
    for _, container in containers():
        name, ctx = parse_command(container)
        commands.add(name)
        assert ctx.params.get("log_format", "text") in LOG_FORMATS
    assert commands == {"serve", "worker"}


def test_every_container_port_is_the_port_its_command_listens_on() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for _, container in containers():
        name, ctx = parse_command(container)
        ports = [p["containerPort"] for p in container.get("ports", [])]
        if name != "serve":
            assert not ports, f"`embedstream {name}` listens on no port"
            continue
        settings = settings_of(container)
        host, port = ctx.params["host"] or settings.host, ctx.params["port"] or settings.port
        assert ports == [port]
        assert f"EXPOSE {port}" in dockerfile
        assert not ipaddress.ip_address(host).is_loopback, "the Service could not reach it"


def test_every_service_targets_a_named_port_of_the_pods_it_selects() -> None:
    for service in (m for m in manifests() if m["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [d["spec"]["template"] for d in deployments()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        named = {(p["name"], p["containerPort"]) for pod in pods
                 for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {name for name, _ in named}


def probes() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(container, httpGet) of every probe."""
    return [(container, container[kind]["httpGet"]) for _, container in containers()
            for kind in ("readinessProbe", "livenessProbe", "startupProbe")
            if kind in container]


def test_every_probe_path_is_a_get_route_of_the_app_on_a_port_of_its_container() -> None:
    from starlette.routing import Match

    routes = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).routes
    assert {probe["path"] for _, probe in probes()} == {"/readyz", "/healthz"}
    for container, probe in probes():
        scope = {"type": "http", "path": probe["path"], "method": "GET"}
        assert any(r.matches(scope)[0] is Match.FULL for r in routes), probe["path"]
        assert probe["port"] in {p["name"] for p in container["ports"]}


@pytest.mark.anyio
async def test_every_probe_answers_a_kubelet_without_a_key_or_a_known_host(
        redis_url: str, tmp_path: Path) -> None:
    """The kubelet probes by the pod's IP and sends no key: neither may turn it away."""
    for container, probe in probes():
        settings = settings_of(container, redis_url=redis_url, data_dir=tmp_path,
                               api_keys=("probe-test-key",))
        async with serving(settings) as client:
            response = await client.get(probe["path"], headers={"host": "10.0.0.7:8000"})
        assert response.status_code in (200, 503), response.text
        assert response.json()["status"] in ("ok", "ready", "no_workers"), response.text


def test_every_embedstream_variable_is_a_setting_with_a_value_that_parses() -> None:
    variables = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    for path in [*DEPLOY.glob("*.yaml"), DEPLOY / "README.md"]:
        named = set(re.findall(rf"{PREFIX}[A-Z0-9_]+", path.read_text()))
        assert named <= variables, f"{path.name}: not settings: {sorted(named - variables)}"
    for _, container in containers():
        settings = settings_of(container)
        assert cache_scope(settings) in ("tenant", "global")
        assert settings.redis_url, "without a URL the process starts a Redis of its own"


def test_server_and_workers_agree_on_every_setting_but_the_credentials() -> None:
    server = dataclasses.asdict(settings_of(container_of("embedstream-server")))
    worker = dataclasses.asdict(settings_of(container_of("embedstream-worker")))
    differ = {name for name in server if server[name] != worker[name]}
    assert differ <= set(CREDENTIALS), sorted(differ)
    # Under "auto" the scope follows the keys, which the workers do not get.
    assert server["cache_scope"] != "auto"


def test_credentials_live_in_a_secret_and_the_server_never_runs_insecure() -> None:
    names = {PREFIX + field.upper() for field in CREDENTIALS}
    for manifest in manifests():
        if manifest["kind"] == "ConfigMap":
            assert not names & set(manifest["data"])
    for _, container in containers():
        assert not names & {v["name"] for v in container.get("env", [])}
        assert not settings_of(container).insecure
        assert "--insecure" not in argv(container)


def test_no_reference_is_left_unresolved() -> None:
    """Kubernetes leaves `$(NAME)` as written when nothing earlier defines NAME."""
    for _, container in containers():
        env = environment(container)
        for value in [*env.values(), *argv(container)]:
            assert not REFERENCE.search(value), value


def test_service_links_cannot_inject_embedstream_variables() -> None:
    variables = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    for service in (m for m in manifests() if m["kind"] == "Service"):
        stem = service["metadata"]["name"].upper().replace("-", "_")
        injected = {f"{stem}_PORT", f"{stem}_SERVICE_HOST", f"{stem}_SERVICE_PORT"}
        if injected & variables:
            for pod, _ in containers():
                assert pod.get("enableServiceLinks") is False


def test_clients_reaching_the_service_by_name_are_not_refused() -> None:
    namespace = kustomization()["namespace"]
    allowed = set(settings_of(container_of("embedstream-server")).allowed_hosts)
    for service in (m for m in manifests() if m["kind"] == "Service"):
        name = service["metadata"]["name"]
        assert {name, f"{name}.{namespace}", f"{name}.{namespace}.svc"} <= allowed


def test_containers_run_as_non_root_on_a_read_only_root_writing_only_to_volumes() -> None:
    for pod, container in containers():
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        scratch = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        mounted = [Path(m["mountPath"]) for m in container["volumeMounts"]
                   if m["name"] in scratch]
        settings = settings_of(container)
        paths = {"data_dir": settings.data_dir,
                 "export_dir": settings.export_dir or settings.data_dir / "onnx"}
        name, _ = parse_command(container)
        for written in WRITTEN[name]:
            path = Path(paths.get(written, written))
            assert path.is_absolute(), f"{path} depends on the working folder"
            assert any(path.is_relative_to(m) for m in mounted), f"{name} writes {path}"


def test_the_server_grace_period_outlasts_its_shutdown() -> None:
    deployment = find("Deployment", "embedstream-server")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _, pause = container["lifecycle"]["preStop"]["exec"]["command"]
    settings = settings_of(container, redis_url="redis://127.0.0.1:1/0")
    config = server_config(create_app(settings, with_mcp=False), settings, "info")
    shutdown_s = int(pause) + (config.timeout_graceful_shutdown or 0) + JANITOR_STOP_S
    assert pod["terminationGracePeriodSeconds"] > shutdown_s


def test_the_readme_names_every_manifest() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name in kustomization()["resources"]:
        assert f"`{name}`" in readme, name

