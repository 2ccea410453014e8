"""Offline checks of the Kubernetes deployment under k8s/ (no cluster, no network).

Two views of the manifests are checked:

- raw: every YAML file as committed (PyYAML), with the kustomizations' own bookkeeping
  (referenced files exist, nothing is orphaned) and the ConfigMap generators resolved here;
- rendered: `kubectl kustomize` (or `kustomize build`) of the base and each overlay, so that
  patches, generators and name references are checked as a cluster would receive them. Skipped
  with a reason when neither binary is on PATH.

Core kinds are validated with kubernetes-validate (strict: unknown fields fail) for the oldest
and newest Kubernetes versions we support; custom resources against the upstream CRD schemas in
../shared/crds (strict too: unknown fields fail, as with `kubectl apply --validate=strict`).
Settings, ports and metric names are checked against the code itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from services.common import settings as common_settings
from services.common.metrics import RequestMetrics
from services.inference.metrics import InferenceMetrics
from services.inference.settings import ENV_PREFIX as INFERENCE_PREFIX
from services.inference.settings import InferenceSettings
from services.priorgen.metrics import PriorGenMetrics
from services.priorgen.settings import ENV_PREFIX as PRIORGEN_PREFIX
from services.priorgen.settings import PriorGenSettings
from services.trainer.jobs.metrics import TrainerMetrics
from services.trainer.jobs.records import JobState
from services.trainer.settings import ENV_PREFIX as TRAINER_PREFIX
from services.trainer.settings import TrainerSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BASE = K8S / "base"
OVERLAYS = {"dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
CRD_DIR = REPO.parent / "shared" / "crds"  # beside the repository, here and in CI
DOCKERFILE = K8S / "image" / "Dockerfile"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

OLDEST_KUBERNETES = "1.29.0"  # built-in grpc probes are GA since 1.27; HPA v2, PDB v1 long before
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
CUSTOM_GROUPS = {"ray.io", "monitoring.coreos.com"}
PROJECT_IMAGE = "dreambooth-service"
NAMESPACE = "dreambooth"
REQUIRED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")

# `dreambooth-server SERVICE` -> the settings dataclass and prefix its main() reads.
SERVICES: dict[str, tuple[type, str]] = {
    "trainer": (TrainerSettings, TRAINER_PREFIX),
    "priorgen": (PriorGenSettings, PRIORGEN_PREFIX),
    "inference": (InferenceSettings, INFERENCE_PREFIX),
}
# Secrets a real cluster creates out of band (docs/deploy.md); the dev overlay generates them.
EXTERNAL_SECRETS = {
    "base": {"minio-credentials", "dreambooth-api-keys", "dreambooth-service-key"},
    "dev": set(),
    "gpu": {"minio-credentials", "dreambooth-api-keys", "dreambooth-service-key"},
}
# Labels KubeRay puts on the pods it creates from a RayCluster's templates.
RAY_NODE_LABELS = ("ray.io/cluster", "ray.io/node-type", "ray.io/group")
# Labels prometheus-operator attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


@functools.cache
def kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = load_yaml_documents(directory / "kustomization.yaml")
    return doc


def patch_paths(directory: Path) -> list[Path]:
    k = kustomization(directory)
    paths = [entry["path"] for entry in k.get("patches", []) if "path" in entry]
    paths += list(k.get("patchesStrategicMerge", [])) + [p["path"] for p in k.get("patchesJson6902", [])]
    return [directory / path for path in paths]


def generator_paths(directory: Path) -> list[Path]:
    k = kustomization(directory)
    paths: list[Path] = []
    for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        for entry in generator.get("envs", []) + generator.get("files", []):
            paths.append(directory / entry.split("=", 1)[-1])  # "key=path" names the key
    return paths


def resource_paths(directory: Path) -> list[Path]:
    return [directory / entry for entry in kustomization(directory).get("resources", [])]


def raw_resources() -> list[dict[str, Any]]:
    """Every complete object a kustomization lists as a resource file, as committed."""
    docs = []
    for directory in kustomization_dirs():
        namespace = kustomization(directory).get("namespace")
        for path in resource_paths(directory):
            if path.is_file():
                for doc in load_yaml_documents(path):
                    doc.setdefault("metadata", {}).setdefault("namespace", namespace or NAMESPACE)
                    docs.append(doc)
    return docs


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


BUILDS = {"base": BASE, **OVERLAYS}


@functools.cache
def rendered(build: str) -> tuple[dict[str, Any], ...]:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is on PATH: rendered manifests not checked")
    result = subprocess.run(
        [*command, str(BUILDS[build])], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kustomize build {build} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def views() -> list[str]:
    """`raw` plus one rendered view per kustomization a person deploys."""
    return ["raw", *(f"rendered:{build}" for build in BUILDS)]


def documents(view: str) -> list[dict[str, Any]]:
    if view == "raw":
        return raw_resources()
    return list(rendered(view.split(":", 1)[1]))


def build_of(view: str) -> str:
    return "base" if view == "raw" else view.split(":", 1)[1]


# ---------------------------------------------------------------------------------------------
# ConfigMap generators resolved without kustomize (create / merge / replace)
# ---------------------------------------------------------------------------------------------


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value
    return values


def generated_configmaps(directory: Path) -> dict[str, dict[str, str]]:
    """ConfigMap name -> data after this kustomization's bases and its own generators."""
    maps: dict[str, dict[str, str]] = {}
    for path in resource_paths(directory):
        if path.is_dir():
            maps.update(generated_configmaps(path))
    for generator in kustomization(directory).get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env in generator.get("envs", []):
            data.update(parse_env_file(directory / env))
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for entry in generator.get("files", []):
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (directory / path).read_text()
        behavior = generator.get("behavior", "create")
        name = generator["name"]
        if behavior == "merge":
            assert name in maps, f"{directory}: merges into unknown ConfigMap {name}"
            maps[name] = {**maps[name], **data}
        else:
            assert behavior == "replace" or name not in maps, f"{directory}: {name} generated twice"
            maps[name] = data
    return maps


def configmaps_of(view: str) -> dict[str, dict[str, str]]:
    """Name (as containers reference it) -> data."""
    if view == "raw":
        return generated_configmaps(BASE)
    return {
        doc["metadata"]["name"]: doc.get("data", {}) for doc in documents(view) if doc["kind"] == "ConfigMap"
    }


# ---------------------------------------------------------------------------------------------
# Pods, containers, services
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PodTemplate:
    owner: str  # "Kind/name[/group]"
    metadata: dict[str, Any]
    spec: dict[str, Any]
    extra_labels: dict[str, str]  # what a controller adds to the pods it creates

    @property
    def labels(self) -> dict[str, str]:
        return {**self.metadata.get("labels", {}), **self.extra_labels}

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.spec.get("containers", []) + self.spec.get("initContainers", [])


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[PodTemplate]:
    for doc in docs:
        kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            yield PodTemplate(
                f"{kind}/{name}", spec["template"].get("metadata", {}), spec["template"]["spec"], {}
            )
        elif kind == "CronJob":
            template = spec["jobTemplate"]["spec"]["template"]
            yield PodTemplate(f"{kind}/{name}", template.get("metadata", {}), template["spec"], {})
        elif kind == "RayCluster":
            head = spec["headGroupSpec"]["template"]
            yield PodTemplate(
                f"{kind}/{name}/head",
                head.get("metadata", {}),
                head["spec"],
                {"ray.io/cluster": name, "ray.io/node-type": "head", "ray.io/group": "headgroup"},
            )
            for group in spec.get("workerGroupSpecs", []):
                template = group["template"]
                yield PodTemplate(
                    f"{kind}/{name}/{group['groupName']}",
                    template.get("metadata", {}),
                    template["spec"],
                    {
                        "ray.io/cluster": name,
                        "ray.io/node-type": "worker",
                        "ray.io/group": group["groupName"],
                    },
                )


def service_of(container: dict[str, Any]) -> str | None:
    """The service a container runs (`dreambooth-server SERVICE`: args[0] after the ENTRYPOINT)."""
    args = container.get("args", [])
    if container.get("command") is None and args and args[0] in SERVICES:
        return args[0]
    return None


def service_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[PodTemplate, dict[str, Any], str]]:
    for template in pod_templates(docs):
        for container in template.containers:
            service = service_of(container)
            if service:
                yield template, container, service


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", {})
    for key, value in match.items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def container_env(container: dict[str, Any], configmaps: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """What the container's environment holds: name -> value (None: from a Secret or a field)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value")
    return env


# ---------------------------------------------------------------------------------------------
# Settings and metrics the code defines
# ---------------------------------------------------------------------------------------------


def settings_env_names(cls: type, prefix: str) -> set[str]:
    """The variables `services.common.settings.from_env(cls, prefix)` reads, by the same walk."""
    names = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        target = hints[field.name]
        if dataclasses.is_dataclass(target):
            shared = (common_settings.StoreSettings, common_settings.AuthSettings)
            nested = common_settings.PREFIX if target in shared else prefix
            names |= settings_env_names(target, nested)
        else:
            names.add(f"{prefix}{field.name.upper()}")
    return names


STORE_ENV_NAMES = settings_env_names(common_settings.StoreSettings, common_settings.PREFIX)


def allowed_env_names(service: str | None) -> set[str]:
    """A service's settings; any other container of the image runs the CLI tools (store only)."""
    if service is None:
        return STORE_ENV_NAMES
    cls, prefix = SERVICES[service]
    return settings_env_names(cls, prefix)


def load_settings(service: str, env: dict[str, str | None]) -> Any:
    """The settings the service would build from this environment (secrets filled in)."""
    cls, prefix = SERVICES[service]
    filled = {name: "from-a-secret" if value is None else value for name, value in env.items()}
    return common_settings.from_env(cls, prefix, env=filled)


@functools.cache
def code_metrics() -> dict[str, frozenset[str]]:
    """Every series name the services expose -> its label names, from their metric classes."""
    registry = CollectorRegistry()
    holders: list[Any] = []
    for service in SERVICES:
        holders.append(RequestMetrics.create(registry, f"dreambooth_{service}"))
    trainer = TrainerMetrics(registry)
    trainer.watch_jobs(lambda: dict.fromkeys(JobState, 0))
    holders += [trainer, PriorGenMetrics.create(registry)]
    inference = InferenceMetrics.create(registry)
    holders += [inference, inference.cache]

    labels: dict[str, set[str]] = {}
    for holder in holders:
        for value in vars(holder).values():
            if isinstance(value, MetricWrapperBase):
                labels[value.describe()[0].name] = set(value._labelnames)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: dict[str, frozenset[str]] = {}
    for family in registry.collect():
        family_labels = set(labels.get(family.name, set()))
        for sample in family.samples:
            family_labels |= set(sample.labels)
        for suffix in suffixes.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = frozenset(family_labels | extra)
    return names


METRIC_REF = re.compile(r"\b(dreambooth[_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
LABEL_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_references(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched on it) for every dreambooth metric in a PromQL expr."""
    refs = []
    for match in METRIC_REF.finditer(expr):
        matchers = match.group(2) or ""
        refs.append((match.group(1), set(LABEL_MATCHER.findall(matchers))))
    return refs


def prometheus_rules() -> list[dict[str, Any]]:
    return [doc for doc in raw_resources() if doc["kind"] == "PrometheusRule"]


def dashboard_files() -> list[Path]:
    return sorted((BASE / "dashboards").glob("*.json"))


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL string in a dashboard: panel targets and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def check_metric_references(where: str, expr: str, recorded: set[str]) -> list[str]:
    problems = []
    known = code_metrics()
    for name, matched_labels in metric_references(expr):
        if name in recorded:
            continue
        if name not in known:
            problems.append(f"{where}: {name} is not a metric the services define")
            continue
        unknown = matched_labels - known[name] - TARGET_LABELS
        if unknown:
            problems.append(f"{where}: {name} has no label(s) {sorted(unknown)}")
    return problems


# ---------------------------------------------------------------------------------------------
# CRD schemas
# ---------------------------------------------------------------------------------------------


def strict_schema(schema: Any) -> Any:
    """Reject unknown fields wherever the CRD lists the fields (what --validate=strict does)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and isinstance(schema["properties"], dict)
    ):
        result["additionalProperties"] = False
    return result


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """A validator of the CRD's openAPIV3Schema for that version (files named {group}_{plural}.yaml)."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"CRD schemas not found at {CRD_DIR} (the shared folder beside the repository)")
    group, version = api_version.split("/")
    path = CRD_DIR / f"{group}_{kind.lower()}s.yaml"
    assert path.is_file(), f"no CRD schema for {kind} in {CRD_DIR}"
    with path.open() as handle:
        crd = yaml.load(handle, Loader=YAML_LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(strict_schema(served["schema"]["openAPIV3Schema"]))


def is_custom(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# ---------------------------------------------------------------------------------------------
# Files and kustomizations
# ---------------------------------------------------------------------------------------------


def test_kustomizations_exist() -> None:
    assert {BASE, *OVERLAYS.values()} <= set(kustomization_dirs())


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_exist(directory: Path) -> None:
    missing = [
        str(path.relative_to(K8S))
        for path in resource_paths(directory) + patch_paths(directory) + generator_paths(directory)
        if not path.exists()
    ]
    assert not missing, f"{directory.relative_to(K8S)}/kustomization.yaml names missing files: {missing}"
    for path in resource_paths(directory):
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), (
                f"{path} is a resource folder without a kustomization"
            )


def test_every_file_under_k8s_is_used() -> None:
    """No orphans: each YAML/JSON/env file is a kustomization, a resource, a patch or generator input."""
    used = set()
    for directory in kustomization_dirs():
        used.add(directory / "kustomization.yaml")
        used |= {p for p in resource_paths(directory) if p.is_file()}
        used |= set(patch_paths(directory)) | set(generator_paths(directory))
    manifests = [p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml", ".json", ".env")]
    orphans = sorted(
        str(p.relative_to(K8S)) for p in manifests if p.resolve() not in {u.resolve() for u in used}
    )
    assert not orphans, f"files no kustomization uses: {orphans}"


def test_every_yaml_file_parses() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        docs = load_yaml_documents(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            if isinstance(doc, dict) and "kind" in doc and path.name != "kustomization.yaml":
                assert "apiVersion" in doc and "metadata" in doc, (
                    f"{path}: {doc.get('kind')} lacks apiVersion/metadata"
                )


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view", views())
@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_core_resources_validate_strictly(view: str, kubernetes_version: str) -> None:
    failures = []
    for doc in documents(view):
        if is_custom(doc):
            continue
        try:
            kubernetes_validate.validate(doc, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(str(part) for part in err.path)
            failures.append(f"{name_of(doc)} at {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            failures.append(f"{name_of(doc)}: {err.message}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("view", views())
def test_custom_resources_match_crd_schemas(view: str) -> None:
    custom = [doc for doc in documents(view) if is_custom(doc)]
    kinds = {doc["kind"] for doc in custom}
    assert {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds
    failures = []
    for doc in custom:
        for error in crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc):
            path = "/".join(str(part) for part in error.absolute_path)
            failures.append(f"{name_of(doc)} at {path}: {error.message}")
    assert not failures, "\n".join(failures)


def test_strict_crd_validation_rejects_unknown_fields() -> None:
    """The CRD check has teeth: a misspelt field in a pod template fails it."""
    (cluster,) = [doc for doc in raw_resources() if doc["kind"] == "RayCluster"]
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = crd_validator(broken["apiVersion"], "RayCluster").iter_errors(broken)
    assert any("resource" in error.message for error in errors)


# ---------------------------------------------------------------------------------------------
# Labels, selectors and references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view", views())
def test_recommended_labels_everywhere(view: str) -> None:
    missing = []
    for doc in documents(view):
        labels = doc["metadata"].get("labels", {})
        missing += [f"{name_of(doc)}: {key}" for key in REQUIRED_LABELS if key not in labels]
        assert labels.get("app.kubernetes.io/part-of", "dreambooth") == "dreambooth", name_of(doc)
    for template in pod_templates(documents(view)):
        missing += [
            f"{template.owner} pod template: {key}" for key in REQUIRED_LABELS if key not in template.labels
        ]
    assert not missing, "labels missing:\n" + "\n".join(missing)


def test_generated_configmaps_carry_labels() -> None:
    for directory in kustomization_dirs():
        k = kustomization(directory)
        for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            if generator.get("behavior") == "merge":
                continue
            labels = generator.get("options", {}).get("labels", {})
            missing = [key for key in REQUIRED_LABELS if key not in labels]
            assert not missing, f"{directory.relative_to(K8S)} generator {generator['name']} lacks {missing}"


@pytest.mark.parametrize("view", views())
def test_selectors_match_pods(view: str) -> None:
    docs = documents(view)
    templates = list(pod_templates(docs))
    for doc in docs:
        kind = doc["kind"]
        if kind in ("Deployment", "StatefulSet", "Job") and "selector" in doc["spec"]:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selects(doc["spec"]["selector"], labels), f"{name_of(doc)} does not select its own pods"
        if kind in ("Service", "PodDisruptionBudget", "PodMonitor") and doc["spec"].get("selector"):
            selector = doc["spec"]["selector"]
            if kind == "Service":
                selector = {"matchLabels": selector}
            assert any(selects(selector, t.labels) for t in templates), f"{name_of(doc)} selects no pods"


@pytest.mark.parametrize("view", views())
def test_service_target_ports_exist(view: str) -> None:
    docs = documents(view)
    templates = list(pod_templates(docs))
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        pods = [t for t in templates if selects({"matchLabels": service["spec"]["selector"]}, t.labels)]
        ports = {
            (p.get("name"), p["containerPort"])
            for t in pods
            for c in t.containers
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in pair for pair in ports), (
                f"{name_of(service)} port {port['name']}: no {target!r}"
            )


@pytest.mark.parametrize("view", views())
def test_monitors_select_a_named_metrics_port(view: str) -> None:
    docs = documents(view)
    services = [doc for doc in docs if doc["kind"] == "Service"]
    templates = list(pod_templates(docs))
    monitors = [doc for doc in docs if doc["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert {doc["metadata"]["name"] for doc in monitors} >= {
        "dreambooth-inference",
        "dreambooth-priorgen",
        "dreambooth-trainer",
    }
    for monitor in monitors:
        spec = monitor["spec"]
        if monitor["kind"] == "ServiceMonitor":
            wanted = {endpoint["port"] for endpoint in spec["endpoints"]}
            assert wanted == {"metrics"}, f"{name_of(monitor)} must scrape the port named metrics"
            matched = [s for s in services if selects(spec["selector"], s["metadata"].get("labels", {}))]
            assert any("metrics" in {port.get("name") for port in s["spec"]["ports"]} for s in matched), (
                f"{name_of(monitor)} selects no Service with a port named metrics"
            )
        else:
            wanted = {endpoint["port"] for endpoint in spec["podMetricsEndpoints"]}
            matched_pods = [t for t in templates if selects(spec["selector"], t.labels)]
            assert matched_pods, f"{name_of(monitor)} selects no pods"
            for template in matched_pods:
                names = {p.get("name") for c in template.containers for p in c.get("ports", [])}
                assert wanted <= names, f"{name_of(monitor)}: {template.owner} has no port {wanted - names}"


@pytest.mark.parametrize("view", [v for v in views() if v != "raw"])
def test_references_resolve(view: str) -> None:
    """ConfigMaps, Secrets, ServiceAccounts and HPA targets named by the build are in it."""
    docs = documents(view)
    present = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    external = EXTERNAL_SECRETS[build_of(view)]
    missing = []

    def need(kind: str, name: str, owner: str) -> None:
        if (kind, name) not in present and not (kind == "Secret" and name in external):
            missing.append(f"{owner}: {kind}/{name}")

    for template in pod_templates(docs):
        if "serviceAccountName" in template.spec:
            need("ServiceAccount", template.spec["serviceAccountName"], template.owner)
        for container in template.containers:
            for source in container.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source:
                        need(kind, source[key]["name"], template.owner)
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in ref:
                        need(kind, ref[key]["name"], template.owner)
        for volume in template.spec.get("volumes", []):
            if "configMap" in volume:
                need("ConfigMap", volume["configMap"]["name"], template.owner)
            if "secret" in volume:
                need("Secret", volume["secret"]["secretName"], template.owner)
    for hpa in (doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        need(target["kind"], target["name"], name_of(hpa))
    assert not missing, "dangling references:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------
# Containers: probes, settings, security, images, GPUs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view", views())
def test_probe_ports_are_container_ports(view: str) -> None:
    for template in pod_templates(documents(view)):
        for container in template.containers:
            ports = {p["containerPort"] for p in container.get("ports", [])}
            ports |= {p["name"] for p in container.get("ports", []) if "name" in p}
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                if not probe:
                    continue
                for handler in ("grpc", "httpGet", "tcpSocket"):
                    if handler in probe:
                        port = probe[handler]["port"]
                        assert port in ports, (
                            f"{template.owner}/{container['name']} {probe_name}: port {port}"
                        )


@pytest.mark.parametrize("view", views())
def test_services_probe_grpc_health_on_their_grpc_port(view: str) -> None:
    seen = set()
    for template, container, service in service_containers(documents(view)):
        seen.add(service)
        grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_name, {})
            assert probe.get("grpc", {}).get("port") == grpc_port, (
                f"{template.owner}: {probe_name} must be a grpc probe on port {grpc_port}"
            )
    assert seen == set(SERVICES), f"services without a Deployment in {view}: {set(SERVICES) - seen}"


@pytest.mark.parametrize("view", views())
def test_env_names_are_real_settings(view: str) -> None:
    configmaps = configmaps_of(view)
    problems = []
    for template in pod_templates(documents(view)):
        for container in template.containers:
            allowed = allowed_env_names(service_of(container))
            for name in container_env(container, configmaps):
                if name.startswith(common_settings.PREFIX) and name not in allowed:
                    problems.append(f"{template.owner}/{container['name']}: {name}")
    assert not problems, "environment variables no settings field reads:\n" + "\n".join(problems)


def overlay_service_env(build: str, service: str) -> dict[str, str | None]:
    """A service container's environment in a build, from generators resolved here (raw view)."""
    configmaps = generated_configmaps(BUILDS[build])
    docs = raw_resources()
    (container,) = [c for _, c, s in service_containers(docs) if s == service]
    return container_env(container, configmaps)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("service", list(SERVICES))
def test_settings_load_from_the_manifests(build: str, service: str) -> None:
    """The values parse and pass each settings class's own checks; ports match the containers."""
    env = overlay_service_env(build, service)
    settings = load_settings(service, env)
    assert settings.server.host == "0.0.0.0" and settings.server.metrics_host == "0.0.0.0"
    assert settings.store.s3_endpoint, "services in k8s use the S3 store (MinIO)"
    assert env.get("DREAMBOOTH_S3_ACCESS_KEY", "") is None, "the access key comes from a Secret"
    assert env.get("DREAMBOOTH_S3_SECRET_KEY", "") is None, "the secret key comes from a Secret"
    # Bound to 0.0.0.0, a service without keys (or mTLS) refuses to start: the keys file is mounted.
    assert settings.auth.api_keys_file and not settings.auth.allow_unauthenticated
    (container,) = [c for _, c, s in service_containers(raw_resources()) if s == service]
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert str(Path(settings.auth.api_keys_file).parent) in mounts, "the keys file's folder is not mounted"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (settings.server.port, settings.server.metrics_port) == (ports["grpc"], ports["metrics"])


@pytest.mark.parametrize("view", [v for v in views() if v != "raw"])
def test_rendered_settings_match_containers(view: str) -> None:
    """Same as above on what kustomize renders: merged ConfigMaps, hashed names and patches."""
    configmaps = configmaps_of(view)
    docs = documents(view)
    for template, container, service in service_containers(docs):
        settings = load_settings(service, container_env(container, configmaps))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert (settings.server.port, settings.server.metrics_port) == (ports["grpc"], ports["metrics"])
        # Graceful shutdown: the preStop pause and the service's own grace fit in the pod's.
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = float(pre_stop[-1]) if pre_stop[:1] == ["sleep"] else 0.0
        grace = template.spec.get("terminationGracePeriodSeconds", 30)
        assert grace > pause + settings.server.grace_seconds, (
            f"{template.owner}: terminationGracePeriodSeconds {grace} <= preStop {pause} + "
            f"grace_seconds {settings.server.grace_seconds}"
        )


@pytest.mark.parametrize("view", [v for v in views() if v != "raw"])
def test_trainer_and_clients_address_real_services(view: str) -> None:
    configmaps = configmaps_of(view)
    docs = documents(view)
    service_ports = {
        doc["metadata"]["name"]: {p["port"] for p in doc["spec"]["ports"]}
        for doc in docs
        if doc["kind"] == "Service"
    }
    (trainer,) = [
        load_settings(s, container_env(c, configmaps))
        for _, c, s in service_containers(docs)
        if s == "trainer"
    ]
    host, _, port = trainer.priorgen_address.rpartition(":")
    assert int(port) in service_ports.get(host, set()), f"priorgen_address {trainer.priorgen_address}"
    store_host, _, store_port = trainer.store.s3_endpoint.rpartition(":")
    assert int(store_port) in service_ports.get(store_host, set()), f"s3_endpoint {trainer.store.s3_endpoint}"
    # Ray Client on the KubeRay head Service, "{cluster}-head-svc", at the head's client port.
    match = re.fullmatch(r"ray://([a-z0-9-]+)-head-svc:(\d+)", trainer.ray_address)
    assert match, f"ray_address {trainer.ray_address!r} is not ray://<cluster>-head-svc:<port>"
    (cluster,) = [doc for doc in docs if doc["kind"] == "RayCluster"]
    assert cluster["metadata"]["name"] == match.group(1)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": int(match.group(2))} in head["ports"]


@pytest.mark.parametrize("view", views())
def test_pods_are_locked_down(view: str) -> None:
    problems = []
    for template in pod_templates(documents(view)):
        pod = template.spec.get("securityContext", {})
        if template.spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{template.owner}: automountServiceAccountToken must be false")
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{template.owner}: seccompProfile RuntimeDefault")
        for container in template.containers:
            where = f"{template.owner}/{container['name']}"
            security = container.get("securityContext", {})
            if not (security.get("runAsNonRoot") or pod.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation false")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities.drop [ALL]")
            if "memory" not in container.get("resources", {}).get("limits", {}):
                problems.append(f"{where}: memory limit")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("view", views())
def test_writable_paths_are_volumes(view: str) -> None:
    """Read-only root: /tmp (HOME, Ray's session dir) and the model cache must be mounted."""
    configmaps = configmaps_of(view)
    docs = documents(view)
    (trainer,) = [container_env(c, configmaps) for _, c, s in service_containers(docs) if s == "trainer"]
    for template in pod_templates(docs):
        for container in template.containers:
            if PROJECT_IMAGE not in container["image"]:
                continue
            where = f"{template.owner}/{container['name']}"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: /tmp is not writable"
            # Ray workers materialise models under the cache dir the trainer passes them.
            ray_worker = template.extra_labels.get("ray.io/node-type") == "worker"
            cache_dir = (
                trainer["DREAMBOOTH_CACHE_DIR"]
                if ray_worker
                else container_env(container, configmaps).get("DREAMBOOTH_CACHE_DIR")
            )
            if cache_dir:
                assert cache_dir in mounts, f"{where}: {cache_dir} is not writable"


@pytest.mark.parametrize("build", [b for b in BUILDS if b != "base"])
def test_one_image_everywhere(build: str) -> None:
    """Every project container (services, Ray head and workers, jobs) runs the overlay's image."""
    (entry,) = [i for i in kustomization(BUILDS[build])["images"] if i["name"] == PROJECT_IMAGE]
    expected = f"{entry['newName']}:{entry['newTag']}"
    images = {
        (template.owner, container["image"])
        for template in pod_templates(list(rendered(build)))
        for container in template.containers
        if "minio" not in container["image"]
    }
    assert images and all(image == expected for _, image in images), images
    assert not any(image.endswith(":latest") or ":" not in image for _, image in images)


def gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("build", list(BUILDS))
def test_gpus_only_in_the_gpu_overlay(build: str) -> None:
    docs = list(rendered(build))
    configmaps = configmaps_of(f"rendered:{build}")
    gpus = {
        template.owner: gpu_limit(container)
        for template in pod_templates(docs)
        for container in template.containers
        if gpu_limit(container)
    }
    if build != "gpu":
        assert not gpus, f"{build} asks for GPUs: {gpus}"
        return
    assert gpus.keys() == {
        "Deployment/dreambooth-inference",
        "Deployment/dreambooth-priorgen",
        "RayCluster/dreambooth-ray/workers",
    }
    for template in pod_templates(docs):
        if template.owner in gpus:
            assert template.spec.get("nodeSelector"), f"{template.owner}: GPU pods need a node selector"
            assert any(t["key"] == "nvidia.com/gpu" for t in template.spec.get("tolerations", []))
    for _template, container, service in service_containers(docs):
        if service in ("inference", "priorgen"):
            settings = load_settings(service, container_env(container, configmaps))
            assert settings.device == "cuda", f"{service} has a GPU but device {settings.device!r}"


def test_ray_version_matches_the_image() -> None:
    import ray

    (cluster,) = [doc for doc in raw_resources() if doc["kind"] == "RayCluster"]
    dockerfile = DOCKERFILE.read_text()
    (pinned,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert cluster["spec"]["rayVersion"] == pinned, "rayVersion must name the Ray in the image"
    assert pinned == ray.__version__, "the image pins another Ray than the project is tested with"


def test_dockerfile_copies_existing_paths() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_trainer_is_a_singleton() -> None:
    """Two trainers would both resume the same unfinished jobs: one replica, Recreate."""
    for build in BUILDS:
        (deployment,) = [
            doc
            for doc in rendered(build)
            if doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("trainer")
        ]
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
        assert not [
            doc
            for doc in rendered(build)
            if doc["kind"] == "HorizontalPodAutoscaler"
            and doc["spec"]["scaleTargetRef"]["name"].endswith("trainer")
        ]


# ---------------------------------------------------------------------------------------------
# Metrics in rules and dashboards
# ---------------------------------------------------------------------------------------------


def test_code_metrics_are_collected() -> None:
    """Guard for the checks below: the registry walk finds the metrics it should."""
    names = code_metrics()
    assert {"dreambooth_inference_requests_total", "dreambooth_trainer_jobs"} <= names.keys()
    assert "dreambooth_inference_request_duration_seconds_bucket" in names
    assert names["dreambooth_inference_requests_total"] >= {"method", "code"}


def test_rule_metrics_are_defined_by_the_code() -> None:
    (rule,) = prometheus_rules()
    recorded = {r["record"] for group in rule["spec"]["groups"] for r in group["rules"] if "record" in r}
    problems = []
    for group in rule["spec"]["groups"]:
        for entry in group["rules"]:
            where = f"{group['name']}/{entry.get('alert') or entry.get('record')}"
            problems += check_metric_references(where, entry["expr"], recorded)
            assert metric_references(entry["expr"]) or entry["expr"].startswith("up{"), f"{where}: no metric"
    assert not problems, "\n".join(problems)


def test_rules_have_severity_and_descriptions() -> None:
    (rule,) = prometheus_rules()
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]
    names = {alert["alert"] for alert in alerts}
    assert len(names) == len(alerts), "alert names must be unique"
    assert {
        "DreamboothHighErrorRate",
        "DreamboothSlowRequests",
        "DreamboothRequestsRejected",
        "DreamboothTrainingJobsFailing",
        "DreamboothNoModelLoaded",
    } <= names
    for alert in alerts:
        assert alert["labels"]["severity"] in ("info", "warning", "critical"), alert["alert"]
        assert alert["annotations"].get("summary") and alert["annotations"].get("description"), alert["alert"]


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_metrics_are_defined_by_the_code(path: Path) -> None:
    board = json.loads(path.read_text())
    queries = list(dashboard_queries(board))
    assert queries, f"{path.name} has no queries"
    problems = []
    for query in queries:
        problems += check_metric_references(path.name, query, set())
    assert not problems, "\n".join(problems)


def test_dashboards_are_well_formed() -> None:
    boards = {path.name: json.loads(path.read_text()) for path in dashboard_files()}
    assert len(boards) >= 3
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids), "dashboard uids must be unique"
    for name, board in boards.items():
        assert board["title"] and board["schemaVersion"] and "dreambooth" in board["tags"], name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", f"{name}: no datasource variable"
        panel_ids = []

        def walk(panels: list[dict[str, Any]], board_name: str = name, ids: list[int] = panel_ids) -> None:
            for panel in panels:
                ids.append(panel["id"])
                if panel["type"] == "row":
                    walk(panel.get("panels", []))
                    continue
                assert panel["datasource"]["uid"] == "${datasource}", f"{board_name}: {panel['title']}"
                assert panel["targets"], f"{board_name}: {panel['title']} has no query"

        walk(board["panels"])
        assert len(set(panel_ids)) == len(panel_ids), f"{name}: duplicate panel ids"


def test_dashboards_become_labelled_configmaps() -> None:
    (generator,) = [
        g
        for g in kustomization(BASE)["configMapGenerator"]
        if any(f.endswith(".json") for f in g.get("files", []))
    ]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    assert generator["options"].get("disableNameSuffixHash") is True
    packaged = {Path(entry.split("=", 1)[-1]).name for entry in generator["files"]}
    assert packaged == {path.name for path in dashboard_files()}
    # A ConfigMap holds at most 1 MiB; client-side apply's annotation at most 256 KiB.
    assert sum(path.stat().st_size for path in dashboard_files()) < 200 * 1024


def doc_yaml_blocks() -> list[Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_deploy_doc_snippets_are_valid() -> None:
    """The HPA and prometheus-adapter examples in docs/deploy.md: valid, and on real metrics."""
    blocks = doc_yaml_blocks()
    objects = [doc for doc in blocks if "apiVersion" in doc]
    assert objects, "docs/deploy.md shows no manifest"
    for doc in objects:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    adapter_rules = [rule for doc in blocks for rule in doc.get("rules", {}).get("custom", [])]
    assert adapter_rules, "docs/deploy.md shows no prometheus-adapter rule"
    problems = []
    for rule in adapter_rules:
        problems += check_metric_references("deploy.md adapter rule", rule["seriesQuery"], set())
    assert not problems, "\n".join(problems)


def test_the_dev_service_key_is_an_internal_key_of_the_dev_keys_file() -> None:
    """The throw-away keys of the dev overlay work: the trainer's key verifies as a service."""
    from services.common.api_keys import parse_keys_file

    (keys_generator,) = [
        g for g in kustomization(OVERLAYS["dev"])["secretGenerator"] if g["name"] == "dreambooth-api-keys"
    ]
    keys_file = OVERLAYS["dev"] / keys_generator["files"][0].split("=", 1)[1]
    (service_generator,) = [
        g for g in kustomization(OVERLAYS["dev"])["secretGenerator"] if g["name"] == "dreambooth-service-key"
    ]
    service_key = service_generator["literals"][0].split("=", 1)[1]
    tenant = parse_keys_file(keys_file.read_text(), str(keys_file)).verify(service_key)
    assert tenant is not None and tenant.internal
