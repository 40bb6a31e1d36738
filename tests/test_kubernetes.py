"""deploy/kubernetes, proven offline (no cluster here or on CI).

- Schemas: every manifest validates strictly (unknown fields are errors) against the
  Kubernetes schemas kubernetes-validate bundles, for the oldest and newest versions the
  manifests claim. The KServe InferenceService validates against a schema written from
  KServe's v1beta1 API (tests/schemas; the kserve SDK would downgrade protobuf 7 -> 6 and
  pandas 3 -> 2 in this environment), with its inline PodSpec validated as a Pod.
- Drift: images are Dockerfile stages and carry the project's version; container ports,
  users and the liveness path are the image's EXPOSE, APP_UID and HEALTHCHECK; probes hit
  routes the app has; every THYROID_CAD_* variable is a Settings field and the ConfigMap
  parses as Settings; Secret and ConfigMap references resolve; Services, the Ingress, the
  PDB and the HPA point at what exists; MLflow admits the Host the API sends.
- NetworkPolicies, evaluated: only the ingress controller reaches the API; only the API
  (and KServe's predictor) reach PostgreSQL and MLflow; nothing else gets out but DNS.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from test_deploy import COMPOSE, DOCKERFILE, dockerfile_stages, load_yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
KSERVE = K8S / "kserve"
KSERVE_SCHEMA = Path(__file__).parent / "schemas" / "kserve-inferenceservice-v1beta1.json"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
VERSIONS = ("1.30", "1.37")  # preStop `sleep` needs 1.30; the newest schemas bundled
NAMESPACE = "thyroid-cad"
WORKLOADS = ("Deployment", "StatefulSet")

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (the dev extra)"
)


# -- reading the manifests ------------------------------------------------------------------
def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> dict[str, list[dict]]:
    """file (relative to deploy/kubernetes) -> its objects, the examples and KServe's too."""
    found = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            found[str(path.relative_to(K8S))] = documents(path)
    return found


def objects(kind: str | None = None) -> list[dict]:
    return [d for docs in manifests().values() for d in docs if kind in (None, d["kind"])]


def isvc() -> dict:
    (found,) = objects("InferenceService")
    return found


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(name, pod labels, pod spec) of every workload, KServe's predictor included."""
    specs = []
    for doc in objects():
        if doc["kind"] in WORKLOADS:
            template = doc["spec"]["template"]
            specs.append(
                (doc["metadata"]["name"], template["metadata"]["labels"], template["spec"])
            )
    predictor = isvc()["spec"]["predictor"]
    specs.append(("kserve-predictor", predictor["labels"], predictor))
    return specs


def containers() -> list[tuple[str, dict, dict]]:
    """(workload name, pod spec, container) for every container."""
    return [(name, spec, c) for name, _, spec in pod_specs() for c in spec["containers"]]


def image_parts(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":")
    return repo, tag


def app_uid() -> int:
    return int(re.search(r"^ARG APP_UID=(\d+)$", DOCKERFILE.read_text(), re.M)[1])


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# -- the kustomizations ---------------------------------------------------------------------
@pytest.mark.parametrize("folder", [K8S, KSERVE])
def test_kustomization_lists_every_manifest_and_pins_the_images(folder):
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == NAMESPACE
    used = set()
    for path in files:
        for doc in documents(folder / path):
            for c in re.findall(r"image: (\S+)", yaml.safe_dump(doc)):
                used.add(image_parts(c))
    ours = {(repo, tag) for repo, tag in used if repo.startswith("thyroid-cad/")}
    assert ours, f"{folder.name}: no thyroid-cad image"
    pinned = {i["name"]: i["newTag"] for i in kustomization["images"]}
    assert {repo: tag for repo, tag in ours} == pinned
    assert set(pinned.values()) == {project_version()}, "image tags follow the project version"


# -- schemas --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly_against_kubernetes_schemas(version):
    checked = 0
    for name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"].startswith("serving.kserve.io/"):
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")
            checked += 1
    assert checked >= 15
    # Strict means strict: a misspelt field is an error, not ignored.
    deployment = copy.deepcopy(objects("Deployment")[0])
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


def _kserve_validator(version: str = VERSIONS[-1]):
    import jsonschema
    from kubernetes_validate.utils import schema_contents

    schema = json.loads(KSERVE_SCHEMA.read_text())
    folder = f"kubernetes-json-schema/v{version}.0-local-strict"
    k8s = schema_contents(f"{folder}/_definitions.json", version)["$defs"]
    predictor = schema["$defs"]["kserve.PredictorSpec"]
    # The inline PodSpec: its fields are the predictor's too (checked as a Pod below).
    for field in k8s["io.k8s.api.core.v1.PodSpec"]["properties"]:
        predictor["properties"].setdefault(field, True)
    schema["$defs"] = {**k8s, **schema["$defs"]}
    return jsonschema.Draft202012Validator(schema)


def check_inferenceservice(doc: dict, version: str = VERSIONS[-1]) -> list[str]:
    """What is wrong with an InferenceService (empty: nothing)."""
    problems = [e.message for e in _kserve_validator(version).iter_errors(doc)]
    if problems:
        return problems
    predictor = doc["spec"]["predictor"]
    implementations = [k for k in ("model", "sklearn", "onnx", "triton") if k in predictor]
    names = [c["name"] for c in predictor.get("containers", [])]
    if implementations and "kserve-container" in names:
        problems.append(f"a custom container and {implementations}: exactly one predictor")
    if not implementations and "kserve-container" not in names:
        problems.append("a custom predictor's container must be named kserve-container")
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
    if high and low > high:
        problems.append("minReplicas > maxReplicas")
    podspec = {k: v for k, v in predictor.items() if k in _podspec_fields(version)}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": podspec}
    try:
        kubernetes_validate.validate(pod, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"predictor pod spec: {e.message}")
    return problems


def _podspec_fields(version: str) -> set[str]:
    from kubernetes_validate.utils import schema_contents

    folder = f"kubernetes-json-schema/v{version}.0-local-strict"
    defs = schema_contents(f"{folder}/_definitions.json", version)["$defs"]
    return set(defs["io.k8s.api.core.v1.PodSpec"]["properties"])


def test_inferenceservice_validates_against_kserve_v1beta1():
    doc = isvc()
    assert check_inferenceservice(doc) == []
    predictor = doc["spec"]["predictor"]
    assert [c["name"] for c in predictor["containers"]] == ["kserve-container"]
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"

    def broken(change) -> list[str]:
        bad = copy.deepcopy(doc)
        change(bad)
        return check_inferenceservice(bad)

    p = "predictor"
    assert broken(lambda d: d["spec"][p].update(minReplica=1))  # misspelt extension field
    assert broken(lambda d: d["spec"][p].update(maxReplicas="4"))
    assert broken(lambda d: d["spec"][p].update(minReplicas=9))  # above maxReplicas
    assert broken(lambda d: d["spec"][p]["containers"][0].update(healthcheck="/healthz"))
    assert broken(lambda d: d["spec"][p]["containers"][0].update(name="api"))
    assert broken(lambda d: d["spec"][p].update(onnx={"storageUri": "s3://x"}))
    assert broken(lambda d: d["metadata"].update(name="Thyroid_CAD"))
    assert broken(lambda d: d.update(apiVersion="serving.kserve.io/v1alpha1"))
    assert broken(lambda d: d["spec"].update(predictors={}))


# -- agreement with the Dockerfile ----------------------------------------------------------
def test_images_ports_users_and_health_agree_with_the_dockerfile():
    stages = dockerfile_stages()
    uid = app_uid()
    ours = 0
    for workload, spec, c in containers():
        repo, _ = image_parts(c["image"])
        if not repo.startswith("thyroid-cad/"):
            continue
        ours += 1
        stage = stages[repo.split("/", 1)[1]]  # thyroid-cad/serve -> the `serve` target
        where = f"{workload}/{c['name']}"
        ports = [p["containerPort"] for p in c["ports"]]
        assert ports == [int(stage.last("EXPOSE"))], where
        assert (
            spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["runAsNonRoot"]
        )
        health = re.search(r"127\.0\.0\.1:(\d+)(/\w+)", stage.last("HEALTHCHECK"))
        assert int(health[1]) == ports[0], where
        liveness = c["livenessProbe"]["httpGet"]["path"]
        if repo.endswith("/serve"):
            # The image's own CMD serves: same port, no command override.
            assert "command" not in c and "args" not in c, where
            cmd = stage.exec_form("CMD")
            assert int(cmd[cmd.index("--port") + 1]) == ports[0], where
            assert liveness in (health[2], "/v2/health/live"), where
            # A read-only root: THYROID_CAD_HOME (the model cache, the audit spool) is a volume.
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert stage.env()["THYROID_CAD_HOME"] in mounts and "/tmp" in mounts, where
            gpu = c["resources"]["limits"]["nvidia.com/gpu"]
            assert gpu == c["resources"]["requests"]["nvidia.com/gpu"] == "1", where
        else:
            assert liveness == health[2], where
    assert ours == 3  # the api, KServe's predictor, MLflow

    # MLflow runs compose's command: the same flags, hosts adapted to the cluster.
    (mlflow,) = [c for w, _, c in containers() if w == "thyroid-cad-mlflow"]
    compose = load_yaml(COMPOSE)["services"]["mlflow"]["command"]
    flags = lambda argv: [a for a in argv if a.startswith("--")]  # noqa: E731
    assert flags(mlflow["command"]) == flags(compose)
    env = {e["name"] for e in mlflow["env"]}
    assert env == set(load_yaml(COMPOSE)["services"]["mlflow"]["environment"])


def test_the_images_hold_every_package_the_project_ships():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = {p.rstrip("*") for p in packages["packages"]["find"]["include"]}
    source = dockerfile_stages()["source"].all("COPY")
    copied = {arg.split()[0].rstrip("/") for arg in source}
    assert include <= copied, "packages the Dockerfile's source stage does not copy"
    allowed = {
        line.strip().lstrip("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    }
    assert copied <= allowed, "copied but outside .dockerignore's allow-list"


# -- agreement with the service -------------------------------------------------------------
def _settings_env_names() -> set[str]:
    from service.config import Settings

    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"THYROID_CAD_{name.upper()}")
        alias = field.validation_alias
        names |= set(getattr(alias, "choices", []) or ([alias] if alias else []))
    return names


def _api_env() -> dict[str, str]:
    (config,) = [d for d in objects("ConfigMap") if d["metadata"]["name"] == "thyroid-cad-api"]
    return dict(config["data"])


def test_every_variable_is_a_setting_and_the_config_parses(monkeypatch):
    from service.config import Settings

    known = _settings_env_names() | {"THYROID_CAD_HOME", "MLFLOW_TRACKING_URI"}
    for workload, _, c in containers():
        if not image_parts(c["image"])[0].endswith("/serve"):
            continue
        names = {e["name"] for e in c.get("env", [])} | set(_api_env())
        assert names - known == set(), f"{workload}: unknown variables"
        assert {r["configMapRef"]["name"] for r in c["envFrom"]} == {"thyroid-cad-api"}
    for key, value in _api_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://u@h:5432/audit")
    settings = Settings()
    settings.runtime()  # providers, graph optimisation, batching: all valid
    assert settings.public_health, "the probes call /healthz and /readyz without a key"
    assert settings.key_cache_s <= 300 and settings.poll_interval_s <= 60


def test_probes_hit_routes_the_app_has():
    from service.api.app import create_app
    from service.config import Settings

    paths = create_app(Settings()).openapi()["paths"]
    routes = {path for path, methods in paths.items() if "get" in methods}
    checked = 0
    for workload, _, c in containers():
        if not image_parts(c["image"])[0].endswith("/serve"):
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = c[probe]["httpGet"]["path"]
            assert path in routes, f"{workload} {probe}: {path} is not a route"
            checked += 1
        assert c["readinessProbe"]["httpGet"]["path"] in ("/readyz", "/v2/health/ready")
    assert checked == 6


def test_secret_and_config_references_resolve():
    secrets = {d["metadata"]["name"]: d["stringData"] for d in documents(SECRETS_EXAMPLE)}
    configs = {d["metadata"]["name"]: d["data"] for d in objects("ConfigMap")}
    for workload, _, c in containers():
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]], f"{workload}: {ref}"
        for ref in c.get("envFrom", []):
            assert ref["configMapRef"]["name"] in configs
    # Placeholders only: no real secret in the repository.
    for values in secrets.values():
        for value in values.values():
            assert "REPLACE-ME" in value
    # The URLs name the PostgreSQL Service and the databases its first start creates.
    (init,) = [d for n, d in configs.items() if n == "thyroid-cad-postgres-init"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", "".join(init.values())))
    (postgres,) = [d for d in objects("Service") if d["metadata"]["name"] == "thyroid-cad-postgres"]
    port = postgres["spec"]["ports"][0]["port"]
    urls = [secrets["thyroid-cad-api"]["DATABASE_URL"]]
    urls.append(secrets["thyroid-cad-mlflow"]["MLFLOW_BACKEND_STORE_URI"])
    for url in urls:
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == ("thyroid-cad-postgres", port)
        assert parts.path.strip("/") in created
    assert created == {"mlflow", "audit"}


def _matches(selector: dict, labels: dict) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def test_services_ingress_pdb_and_hpa_point_at_what_exists():
    pods = pod_specs()
    for service in objects("Service"):
        selected = [
            (n, spec)
            for n, labels, spec in pods
            if _matches({"matchLabels": service["spec"]["selector"]}, labels)
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        named = {p["name"] for c in selected[0][1]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named
    services = {s["metadata"]["name"]: s for s in objects("Service")}
    (ingress,) = objects("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"]["name"] in {
        p["name"] for p in services[backend["name"]]["spec"]["ports"]
    }
    (deployment,) = [d for d in objects("Deployment") if d["metadata"]["name"] == "thyroid-cad-api"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (pdb,) = objects("PodDisruptionBudget")
    (hpa,) = objects("HorizontalPodAutoscaler")
    assert _matches(pdb["spec"]["selector"], labels)
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # A drain never blocks: more replicas than the budget keeps, and rollouts add first.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Ingress bodies fit the largest upload the API accepts.
    limit = int(_api_env()["THYROID_CAD_MAX_UPLOAD_BYTES"])
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body.rstrip("m")) * 2**20 > limit


def test_mlflow_admits_the_host_the_api_sends():
    uri = urlsplit(_api_env()["MLFLOW_TRACKING_URI"])
    (mlflow,) = [c for w, _, c in containers() if w == "thyroid-cad-mlflow"]
    argv = mlflow["command"]
    allowed = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert f"{uri.hostname}:{uri.port}" in allowed
    assert str(uri.port) == argv[argv.index("--port") + 1]
    assert uri.hostname in {s["metadata"]["name"] for s in objects("Service")}


# -- the NetworkPolicies, evaluated ---------------------------------------------------------
POD = dict  # {"ns": namespace, "labels": {...}}


def _peer_matches(peer: dict, policy_ns: str, pod: POD) -> bool:
    ns_labels = {"kubernetes.io/metadata.name": pod["ns"]}
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], ns_labels):
            return False
    elif pod["ns"] != policy_ns:
        return False
    return _matches(peer.get("podSelector", {}), pod["labels"])


def _port_matches(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(
        p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def _allowed_by(direction: str, pod: POD, other: POD, port: int, protocol: str) -> bool:
    """Whether the policies of pod's namespace let this direction through at pod."""
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        p for p in objects("NetworkPolicy")
        if p["metadata"]["namespace"] == pod["ns"] and direction in p["spec"]["policyTypes"]
        and _matches(p["spec"]["podSelector"], pod["labels"])
    ]  # fmt: skip
    if not selecting:
        return True  # no policy isolates this pod in this direction
    return any(
        _port_matches(rule, port, protocol)
        and any(_peer_matches(peer, p["metadata"]["namespace"], other) for peer in rule[peers])
        for p in selecting
        for rule in p["spec"].get(key, [])
    )


def allowed(src: POD, dst: POD, port: int, protocol: str = "TCP") -> bool:
    return _allowed_by("Egress", src, dst, port, protocol) and _allowed_by(
        "Ingress", dst, src, port, protocol
    )


def test_network_policies_let_only_the_intended_traffic_through():
    def ours(component: str) -> POD:
        return {
            "ns": NAMESPACE,
            "labels": {
                "app.kubernetes.io/name": "thyroid-cad",
                "app.kubernetes.io/component": component,
            },
        }

    api, predictor, pg, mlflow, trainer, stranger = (
        ours(c) for c in ("api", "kserve-predictor", "postgres", "mlflow", "trainer", "debug")
    )
    assert predictor["labels"] == isvc()["spec"]["predictor"]["labels"]
    ingress = {"ns": "ingress-nginx", "labels": {"app.kubernetes.io/name": "ingress-nginx"}}
    elsewhere = {"ns": "default", "labels": {"app": "anything"}}
    dns = {"ns": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    yes = [
        (ingress, api, 8000), (ingress, predictor, 8000),
        (api, pg, 5432), (api, mlflow, 5000), (predictor, pg, 5432), (predictor, mlflow, 5000),
        (mlflow, pg, 5432), (trainer, mlflow, 5000),
    ]  # fmt: skip
    no = [
        (elsewhere, api, 8000), (stranger, api, 8000), (api, api, 8000), (ingress, api, 5000),
        (ingress, pg, 5432), (ingress, mlflow, 5000), (elsewhere, pg, 5432),
        (elsewhere, mlflow, 5000), (stranger, pg, 5432), (trainer, pg, 5432),
        (api, pg, 5000), (api, elsewhere, 443), (pg, elsewhere, 443), (mlflow, api, 8000),
    ]  # fmt: skip
    name = lambda pod: pod["labels"].get("app.kubernetes.io/component") or pod["ns"]  # noqa: E731
    assert [(name(s), name(d), p) for s, d, p in yes if not allowed(s, d, p)] == []
    assert [(name(s), name(d), p) for s, d, p in no if allowed(s, d, p)] == []
    for pod in (api, predictor, pg, mlflow, trainer, stranger):
        assert allowed(pod, dns, 53, "UDP") and allowed(pod, dns, 53, "TCP")
