"""The manifests under ``ops/kubernetes`` render, pass their schemas and agree with the code.

Each tree is rendered by ``kubectl kustomize``, as ``kubectl apply -k`` renders it. Core objects
are checked by kubernetes-validate against the Kubernetes API's schema in strict mode (an
unknown field fails, as the API server's strict field validation fails it); custom resources
against the ``openAPIV3Schema`` of their upstream CRD (``tests/fixtures/crd-schemas``), closed
the same way. Beyond the schemas: every ``BASTION_*`` variable is a setting and its value parses,
the probes and ports agree with the Service and the settings, durable files sit on a writable
volume, the pods run unprivileged, and the PrometheusRule is ``ops/prometheus/alerts.yml``.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "ops" / "kubernetes"
SCHEMAS = ROOT / "tests" / "fixtures" / "crd-schemas"
KUBERNETES_VERSION = "1.30"  # the oldest minor the manifests promise to apply to
TREES = ("base", "overlays/embedded", "overlays/replicas", "overlays/dev", "kserve")
GATEWAYS = TREES[:4]  # the trees with the Deployment, Service and ServiceMonitor
CORE_KINDS = frozenset(
    {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
)
# custom resources, each checked against tests/fixtures/crd-schemas/<group>_<version>_<kind>.json
CRD_KINDS = frozenset(
    {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("serving.kserve.io/v1beta1", "InferenceService"),
    }
)
SETTINGS = frozenset(f"BASTION_{name.upper()}" for name in Settings.model_fields)
STATE_DIR = "/var/lib/bastion"
OTHER_ENV = frozenset({"HOME"})  # numba's, torch's and Triton's caches: on the tmp emptyDir
HPA_METRIC = "bastion_requests_in_flight"


@functools.cache
def _render(tree: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: the Kustomize trees cannot be rendered")
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBE / tree)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {tree}: {done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def of_kind(tree: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _render(tree) if doc["kind"] == kind]


def only(tree: str, kind: str) -> dict[str, Any]:
    (doc,) = of_kind(tree, kind)
    return doc


def pods(tree: str) -> list[dict[str, Any]]:
    """Pod-like specs (``containers``, ``volumes``): Deployments' templates, ServingRuntimes."""
    specs = [d["spec"]["template"]["spec"] for d in of_kind(tree, "Deployment")]
    return specs + [d["spec"] for d in of_kind(tree, "ServingRuntime")]


def containers(tree: str) -> list[dict[str, Any]]:
    return [c for pod in pods(tree) for c in pod["containers"]]


def environment(tree: str) -> dict[str, dict[str, Any]]:
    """Each variable a container gets, as an env entry; envFrom ConfigMaps' keys as values."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in of_kind(tree, "ConfigMap")}
    env: dict[str, dict[str, Any]] = {}
    for container in containers(tree):
        for source in container.get("envFrom", []):
            data = maps[source["configMapRef"]["name"]]
            env.update({k: {"name": k, "value": v} for k, v in data.items()})
        env.update({e["name"]: e for e in container.get("env", [])})
    return env


def settings_of(tree: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a pod of the tree starts with (secrets left out: they are not here)."""
    for name in [n for n in os.environ if n.startswith("BASTION_")]:
        monkeypatch.delenv(name)
    for name, entry in environment(tree).items():
        if name.startswith("BASTION_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    flags: dict[str, str] = {}
    for container in containers(tree):
        for arg in container.get("args", []):
            name, _, value = arg.removeprefix("--").partition("=")
            flags[name.replace("-", "_")] = value
    return Settings(**flags)


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD schema that refuses unknown fields, as the API server's strict field validation does
    (Kubernetes prunes them otherwise), and accepts ``null`` where OpenAPI's ``nullable`` says so.

    Logical junctors (allOf, anyOf, oneOf, not) only restate value checks in a structural schema
    (Kubernetes API conventions, "Specifying a structural schema"), so they are left as they are."""
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {k: _closed(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _closed(node[key])
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    return node


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    name = f"{api_version.replace('/', '_')}_{kind.lower()}.json"
    schema = json.loads((SCHEMAS / name).read_text())
    return jsonschema.Draft7Validator(_closed(schema))


def core_errors(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


def crd_errors(doc: dict[str, Any]) -> list[str]:
    errors = crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def _render_rules() -> Any:
    spec = importlib.util.spec_from_file_location("render_rules", KUBE / "render_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_every_rendered_object_has_a_schema_to_check(tree: str) -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in _render(tree)}
    unchecked = {k for k in kinds if k[1] not in CORE_KINDS and k not in CRD_KINDS}
    assert not unchecked, f"{tree} renders kinds no test validates: {sorted(unchecked)}"


@pytest.mark.parametrize("tree", TREES)
def test_core_objects_pass_the_kubernetes_schema_strictly(tree: str) -> None:
    for doc in _render(tree):
        if doc["kind"] in CORE_KINDS:
            assert core_errors(doc) == [], f"{tree}: {doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("tree", TREES)
def test_custom_resources_pass_their_upstream_crd_schema(tree: str) -> None:
    for doc in _render(tree):
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            assert crd_errors(doc) == [], f"{tree}: {doc['kind']} {doc['metadata']['name']}"


def test_validators_refuse_misspelt_and_mistyped_fields() -> None:
    deployment = copy.deepcopy(only("base", "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolice"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    service = copy.deepcopy(only("base", "Service"))
    service["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)

    monitor = copy.deepcopy(only("base", "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["bearerToken"] = "x"
    assert any("bearerToken" in e for e in crd_errors(monitor))
    runtime = copy.deepcopy(only("kserve", "ServingRuntime"))
    runtime["spec"]["protocolVersions"] = "v2"
    assert crd_errors(runtime)
    rule = copy.deepcopy(only("base", "PrometheusRule"))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    assert any("expr" in e for e in crd_errors(rule))


# -- settings ------------------------------------------------------------------------------------


def test_every_bastion_variable_in_the_manifests_is_a_setting() -> None:
    files = [p for p in KUBE.rglob("*") if p.is_file() and p.suffix not in {".md", ".py"}]
    written = {name for p in files for name in re.findall(r"\bBASTION_[A-Z0-9_]+", p.read_text())}
    rendered = {name for tree in TREES for name in environment(tree) if name.startswith("BASTION_")}
    assert written >= rendered
    assert sorted(written - SETTINGS) == []


@pytest.mark.parametrize("tree", TREES)
def test_only_home_is_set_besides_settings(tree: str) -> None:
    others = {name for name in environment(tree) if not name.startswith("BASTION_")}
    assert others <= OTHER_ENV


@pytest.mark.parametrize("tree", TREES)
def test_configured_values_are_valid_settings(tree: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(tree, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.allow_grpc


@pytest.mark.parametrize("tree", TREES)
def test_durable_files_and_home_are_on_writable_volumes(
    tree: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(tree, monkeypatch)
    files = [n for n, f in Settings.model_fields.items() if f.annotation is Path]
    secrets = {  # read-only mounts of Secrets: the shared incident signing key (replicas)
        m["mountPath"]
        for pod in pods(tree)
        for m in pod["containers"][0].get("volumeMounts", [])
        for v in pod["volumes"]
        if v["name"] == m["name"] and "secret" in v and m.get("readOnly")
    }
    for name in set(files) - {"model_repository"}:
        path = getattr(settings, name)
        if name == "incident_key_path" and str(path.parent) in secrets:
            continue  # read, never written: the key every replica signs with
        assert path.parent == Path(STATE_DIR), f"{name} = {path} is not in {STATE_DIR}"
    for pod in pods(tree):
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        (container,) = pod["containers"]
        writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in scratch]
        assert STATE_DIR in writable
        home = next(e["value"] for e in container["env"] if e["name"] == "HOME")
        assert home in writable


# -- ports, probes and the objects that point at each other ---------------------------------------


def _port(container: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p["name"] == ref)


@pytest.mark.parametrize("tree", TREES)
def test_probes_ask_the_health_routes_on_the_http_port(
    tree: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(tree, monkeypatch)
    for container in containers(tree):
        probes = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
        if tree != "kserve":
            probes["startupProbe"] = "/v2/health/live"
        for probe, path in probes.items():
            check = container[probe]["httpGet"]
            assert check["path"] == path, probe
            assert _port(container, check["port"]) == settings.port, probe


@pytest.mark.parametrize("tree", GATEWAYS)
def test_service_ports_reach_the_ports_the_gateway_listens_on(
    tree: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(tree, monkeypatch)
    (container,) = containers(tree)
    ports = {p["name"]: p for p in only(tree, "Service")["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    for name, port, listens in (("http", 8000, settings.port), ("grpc", 8001, settings.grpc_port)):
        assert ports[name]["port"] == port, name
        assert _port(container, ports[name]["targetPort"]) == listens, name
    assert ports["grpc"]["appProtocol"] == "grpc"


@pytest.mark.parametrize("tree", GATEWAYS)
def test_selectors_and_references_find_their_objects(tree: str) -> None:
    deployment, service = only(tree, "Deployment"), only(tree, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for pdb in of_kind(tree, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for monitor in of_kind(tree, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
        token = environment(tree)["BASTION_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]
        credentials = endpoint["authorization"]["credentials"]
        assert (credentials["name"], credentials["key"]) == (token["name"], token["key"])
    for hpa in of_kind(tree, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_the_autoscaler_metric_is_one_the_gateway_exports() -> None:
    (metric,) = only("base", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert (metric["type"], metric["pods"]["metric"]["name"]) == ("Pods", HPA_METRIC)
    metrics = Metrics(CollectorRegistry())  # the public registry: scraped with or without a token
    assert metrics.registry.get_sample_value(HPA_METRIC) is not None
    assert f"seriesQuery: '{HPA_METRIC}" in (KUBE / "README.md").read_text()


# -- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_tokens_come_from_the_secret_and_are_required(tree: str) -> None:
    env = environment(tree)
    required = ["BASTION_ADMIN_TOKEN"] + (["BASTION_METRICS_TOKEN"] if tree in GATEWAYS else [])
    for name in required:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["optional"]) == ("bastion", False), name


@pytest.mark.parametrize("tree", TREES)
def test_only_the_dev_overlay_carries_a_secret_and_its_values_say_so(tree: str) -> None:
    secrets = of_kind(tree, "Secret")
    if tree != "overlays/dev":
        assert secrets == []
        return
    (secret,) = secrets
    assert secret["metadata"]["name"] == "bastion"
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(values) == {"admin-token", "metrics-token"}
    assert all(v.startswith("dev-only-") for v in values.values())


# -- the PrometheusRule ------------------------------------------------------------------------


def test_the_committed_prometheus_rule_is_the_rendering_of_alerts_yml() -> None:
    alerts = (ROOT / "ops" / "prometheus" / "alerts.yml").read_text()
    committed = (KUBE / "base" / "prometheusrule.yaml").read_text()
    assert committed == _render_rules().render(alerts), (
        "stale: python ops/kubernetes/render_rules.py > ops/kubernetes/base/prometheusrule.yaml"
    )
    assert only("base", "PrometheusRule")["spec"]["groups"] == yaml.safe_load(alerts)["groups"]


# -- privileges ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_pods_run_as_an_unprivileged_user_on_a_read_only_root(tree: str) -> None:
    for container in containers(tree):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == 10001
        assert context["allowPrivilegeEscalation"] is False
        assert context.get("privileged", False) is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"requests", "limits"} <= container["resources"].keys()
    for deployment in of_kind(tree, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False


# -- the overlays and KServe ---------------------------------------------------------------------


def test_monitoring_objects_are_in_every_overlay_but_dev() -> None:
    for tree in GATEWAYS:
        kinds = {d["kind"] for d in _render(tree)}
        has = {"ServiceMonitor", "PrometheusRule"} <= kinds
        assert has is (tree != "overlays/dev"), tree


def test_embedded_overlay_is_one_pod_on_local_sqlite() -> None:
    deployment = only("overlays/embedded", "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert of_kind("overlays/embedded", "HorizontalPodAutoscaler") == []
    assert "BASTION_DATABASE_URL" not in environment("overlays/embedded")


def test_replicas_overlay_scales_three_to_ten_on_shared_postgres() -> None:
    hpa = only("overlays/replicas", "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 10)
    assert "replicas" not in only("overlays/replicas", "Deployment")["spec"]  # the HPA's to set
    pdb = only("overlays/replicas", "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", 0) >= 1
    ref = environment("overlays/replicas")["BASTION_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref["optional"]) == ("bastion", "database-url", False)


def test_replicas_overlay_takes_redis_from_the_secret_and_embedded_has_none() -> None:
    overlay = yaml.safe_load((KUBE / "overlays" / "replicas" / "kustomization.yaml").read_text())
    assert "../../components/redis" in overlay["components"]
    ref = environment("overlays/replicas")["BASTION_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref["optional"]) == ("bastion", "redis-url", False)
    assert "BASTION_REDIS_URL" not in environment("overlays/embedded")


def test_kserve_runtime_serves_the_mounted_repository_over_v2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, service = only("kserve", "ServingRuntime"), only("kserve", "InferenceService")
    assert runtime["metadata"]["name"] == "bastion"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    settings = settings_of("kserve", monkeypatch)
    assert (settings.model_repository, settings.port, settings.grpc_port) == (
        Path("/mnt/models"),
        8080,
        8081,
    )
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert [p["containerPort"] for p in container["ports"]] == [settings.port]
    model = service["spec"]["predictor"]["model"]
    assert (model["runtime"], model["protocolVersion"]) == ("bastion", "v2")
    formats = [
        {"name": f["name"], "version": f["version"]}
        for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert model["modelFormat"] in formats
    assert model["storageUri"]
