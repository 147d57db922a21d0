"""The cluster configs in cluster/ parse, pass schema checks and keep the secure defaults.

No cluster is started. Ray's own code checks what Ray reads: the launcher YAML goes through
``prepare_config`` + ``validate_config`` (ray/autoscaler/ray-schema.json), and each KubeRay cluster
spec goes through the translation the in-tree autoscaler applies to a RayCluster CR
(``_derive_autoscaling_config_from_ray_cr``, which validates its result against the same schema).
The KubeRay field names are checked by small pydantic models (``extra="forbid"``) of the subset of
the ray.io/v1 CRDs (KubeRay v1.6 fields) and of the Kubernetes pod spec that the manifests use, so
a misspelled field fails here instead of being pruned by the API server. The Serve config inside
rayservice.yaml is checked with Serve's own schema and the apps' own argument models.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "launcher" / "selfmoa-aws.yaml"
KUBERAY = CLUSTER / "kuberay"
RAY_VERSION = "2.60.0"
AUTH_SECRET = "selfmoa-ray-auth"
SHARED_MOUNT = "/mnt/selfmoa"
PART_OF = {"app.kubernetes.io/part-of": "selfmoa-ray"}

# Manifests whose Ray dashboard listens on the pod network instead of 127.0.0.1, and why. This is
# the explicit opt-in: any other file that binds it to 0.0.0.0 fails test_dashboard_not_exposed.
DASHBOARD_ON_POD_NETWORK = {
    "rayjob.yaml": "the submitter Job and the KubeRay operator use the job API via the head Service",
    "rayservice.yaml": "the KubeRay operator deploys serveConfigV2 via the head Service",
}

# Ray Serve's own models use pydantic v1-style Field extras; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")

YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            yield path, doc


def _one(name: str) -> dict[str, Any]:
    (doc,) = _docs(KUBERAY / name)
    return doc


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(file, RayClusterSpec) for RayCluster, RayJob.rayClusterSpec, RayService.rayClusterConfig."""
    specs = []
    for path, doc in _kuberay_docs():
        kind = doc.get("kind")
        if kind == "RayCluster":
            specs.append((path.name, doc["spec"]))
        elif kind == "RayJob":
            specs.append((path.name, doc["spec"]["rayClusterSpec"]))
        elif kind == "RayService":
            specs.append((path.name, doc["spec"]["rayClusterConfig"]))
    return specs


CLUSTER_SPECS = _cluster_specs()
SPEC_IDS = [name for name, _ in CLUSTER_SPECS]


def _groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    # KubeRay (and Ray's autoscaler) take the first container as the Ray container.
    return group["template"]["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _autoscaling_config(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """What Ray's in-tree autoscaler reads from a RayCluster with this spec (validated by Ray)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        # The API server fills metadata.namespace; the manifests leave it to `kubectl -n`.
        "metadata": {"name": name.removesuffix(".yaml"), "namespace": "selfmoa"},
        "spec": copy.deepcopy(spec),
    }
    return _derive_autoscaling_config_from_ray_cr(cr)


def _launcher() -> dict[str, Any]:
    (doc,) = _docs(LAUNCHER)
    return doc


def _launcher_prepared() -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_launcher()))
    validate_config(config)
    return config


# --------------------------------------------------------------------------- pydantic models
# The subset of the Kubernetes pod spec and of the KubeRay ray.io/v1 CRDs (field names of KubeRay
# v1.6, from its CRD API reference) that the manifests use. extra="forbid" everywhere: an unknown
# or misspelled field is an error.


class K8s(BaseModel):
    model_config = ConfigDict(extra="forbid")


Quantity = Annotated[
    str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
]
DnsLabel = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
]


class ObjectMeta(K8s):
    name: DnsLabel
    namespace: DnsLabel | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class TemplateMeta(K8s):
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class SecretKeySelector(K8s):
    name: DnsLabel
    key: str
    optional: bool | None = None


class EnvVarSource(K8s):
    secretKeyRef: SecretKeySelector | None = None
    configMapKeyRef: SecretKeySelector | None = None


class EnvVar(K8s):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    value: str | None = None
    valueFrom: EnvVarSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.valueFrom is None):
            raise ValueError(f"env {self.name}: set exactly one of value and valueFrom")
        return self


class ResourceRequirements(K8s):
    limits: dict[str, Quantity] = {}
    requests: dict[str, Quantity] = {}


class ContainerPort(K8s):
    containerPort: int = Field(ge=1, le=65535)
    name: Annotated[str, StringConstraints(max_length=15)] | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] | None = None


class VolumeMount(K8s):
    name: str
    mountPath: str
    readOnly: bool | None = None
    subPath: str | None = None


class Capabilities(K8s):
    add: list[str] = []
    drop: list[str] = []


class SecurityContext(K8s):
    allowPrivilegeEscalation: bool | None = None
    capabilities: Capabilities | None = None
    readOnlyRootFilesystem: bool | None = None
    runAsNonRoot: bool | None = None
    runAsUser: int | None = None
    runAsGroup: int | None = None


class Container(K8s):
    name: DnsLabel
    image: str
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] = []
    resources: ResourceRequirements = ResourceRequirements()
    ports: list[ContainerPort] = []
    securityContext: SecurityContext | None = None
    volumeMounts: list[VolumeMount] = []


class SeccompProfile(K8s):
    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]


class PodSecurityContext(K8s):
    runAsNonRoot: bool | None = None
    runAsUser: int | None = None
    runAsGroup: int | None = None
    fsGroup: int | None = None
    seccompProfile: SeccompProfile | None = None


class Toleration(K8s):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PVCVolumeSource(K8s):
    claimName: DnsLabel
    readOnly: bool | None = None


class EmptyDirVolumeSource(K8s):
    medium: Literal["", "Memory"] | None = None
    sizeLimit: Quantity | None = None


class Volume(K8s):
    name: DnsLabel
    persistentVolumeClaim: PVCVolumeSource | None = None
    emptyDir: EmptyDirVolumeSource | None = None


class PodSpec(K8s):
    containers: list[Container] = Field(min_length=1)
    volumes: list[Volume] = []
    tolerations: list[Toleration] = []
    nodeSelector: dict[str, str] = {}
    securityContext: PodSecurityContext | None = None
    serviceAccountName: str | None = None
    automountServiceAccountToken: bool | None = None

    @model_validator(mode="after")
    def _mounts_have_volumes(self) -> PodSpec:
        names = {v.name for v in self.volumes}
        for c in self.containers:
            missing = {m.name for m in c.volumeMounts} - names
            if missing:
                raise ValueError(f"container {c.name} mounts undeclared volumes {sorted(missing)}")
        return self


class PodTemplateSpec(K8s):
    metadata: TemplateMeta | None = None
    spec: PodSpec


class AuthOptions(K8s):
    mode: Literal["disabled", "token"] | None = None
    secretName: DnsLabel | None = None
    enableK8sTokenAuth: bool | None = None


class AutoscalerOptions(K8s):
    resources: ResourceRequirements | None = None
    image: str | None = None
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    securityContext: SecurityContext | None = None
    idleTimeoutSeconds: int | None = Field(None, ge=0)
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None
    version: Literal["v1", "v2"] | None = None
    env: list[EnvVar] = []


class HeadGroupSpec(K8s):
    template: PodTemplateSpec
    rayStartParams: dict[str, str] = {}
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None
    enableIngress: bool | None = None
    resources: dict[str, str] | None = None
    labels: dict[str, str] | None = None


class WorkerGroupSpec(K8s):
    groupName: DnsLabel
    replicas: int | None = Field(None, ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=0)
    idleTimeoutSeconds: int | None = Field(None, ge=0)
    numOfHosts: int | None = Field(None, ge=1)
    resources: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    rayStartParams: dict[str, str] = {}
    template: PodTemplateSpec

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroupSpec:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"{self.groupName}: minReplicas > maxReplicas")
        if self.replicas is not None and not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(f"{self.groupName}: replicas outside [minReplicas, maxReplicas]")
        return self


class RayClusterSpec(K8s):
    rayVersion: str
    enableInTreeAutoscaling: bool | None = None
    autoscalerOptions: AutoscalerOptions | None = None
    authOptions: AuthOptions | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = []
    suspend: bool | None = None

    @model_validator(mode="after")
    def _unique_groups(self) -> RayClusterSpec:
        names = Counter(g.groupName for g in self.workerGroupSpecs)
        if dupes := [n for n, k in names.items() if k > 1]:
            raise ValueError(f"duplicate worker groups {dupes}")
        return self


class RayCluster(K8s):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: ObjectMeta
    spec: RayClusterSpec


class SubmitterConfig(K8s):
    backoffLimit: int | None = Field(None, ge=0)


class RayJobSpec(K8s):
    entrypoint: str = Field(min_length=1)
    runtimeEnvYAML: str | None = None
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = (
        None
    )
    shutdownAfterJobFinishes: bool | None = None
    ttlSecondsAfterFinished: int | None = Field(None, ge=0)
    activeDeadlineSeconds: int | None = Field(None, ge=1)
    backoffLimit: int | None = Field(None, ge=0)
    submitterConfig: SubmitterConfig | None = None
    entrypointNumCpus: float | None = None
    entrypointNumGpus: float | None = None
    rayClusterSpec: RayClusterSpec

    @model_validator(mode="after")
    def _ttl_needs_shutdown(self) -> RayJobSpec:
        if self.ttlSecondsAfterFinished and not self.shutdownAfterJobFinishes:
            raise ValueError("ttlSecondsAfterFinished only works with shutdownAfterJobFinishes")
        return self


class RayJob(K8s):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: ObjectMeta
    spec: RayJobSpec


class RayServiceUpgradeStrategy(K8s):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] | None = None


class RayServiceSpec(K8s):
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec
    upgradeStrategy: RayServiceUpgradeStrategy | None = None
    rayClusterDeletionDelaySeconds: int | None = Field(None, ge=0)
    excludeHeadPodFromServeSvc: bool | None = None


class RayService(K8s):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: ObjectMeta
    spec: RayServiceSpec


class Secret(K8s):
    apiVersion: Literal["v1"]
    kind: Literal["Secret"]
    metadata: ObjectMeta
    type: Literal["Opaque"]
    stringData: dict[str, str]


class LabelSelector(K8s):
    matchLabels: dict[str, str] = {}


class NetworkPolicyPort(K8s):
    protocol: Literal["TCP", "UDP", "SCTP"] | None = None
    port: int | str | None = None


class NetworkPolicyPeer(K8s):
    podSelector: LabelSelector | None = None
    namespaceSelector: LabelSelector | None = None


class NetworkPolicyIngressRule(K8s):
    from_: list[NetworkPolicyPeer] = Field([], alias="from")
    ports: list[NetworkPolicyPort] = []


class NetworkPolicySpec(K8s):
    podSelector: LabelSelector
    policyTypes: list[Literal["Ingress", "Egress"]]
    ingress: list[NetworkPolicyIngressRule] = []


class NetworkPolicy(K8s):
    apiVersion: Literal["networking.k8s.io/v1"]
    kind: Literal["NetworkPolicy"]
    metadata: ObjectMeta
    spec: NetworkPolicySpec


class PVCSpec(K8s):
    accessModes: list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]]
    storageClassName: str | None = None
    resources: ResourceRequirements


class PersistentVolumeClaim(K8s):
    apiVersion: Literal["v1"]
    kind: Literal["PersistentVolumeClaim"]
    metadata: ObjectMeta
    spec: PVCSpec


MODELS: dict[str, type[K8s]] = {
    m.model_fields["kind"].annotation.__args__[0]: m  # type: ignore[union-attr]
    for m in (RayCluster, RayJob, RayService, Secret, NetworkPolicy, PersistentVolumeClaim)
}

# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{_rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{_rel(path)}: every document is a mapping"


def test_the_expected_files_exist() -> None:
    names = {_rel(p) for p in YAML_FILES}
    assert {
        "cluster/launcher/selfmoa-aws.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
        "cluster/kuberay/rayservice.yaml",
        "cluster/kuberay/secrets.example.yaml",
        "cluster/kuberay/networkpolicy.yaml",
        "cluster/kuberay/storage.yaml",
    } <= names
    assert (CLUSTER / "README.md").is_file() and (CLUSTER / "Dockerfile").is_file()


@pytest.mark.parametrize(
    ("path", "doc"),
    list(_kuberay_docs()),
    ids=[f"{p.name}:{d.get('kind')}" for p, d in _kuberay_docs()],
)
def test_kuberay_documents_match_their_schema(path: Path, doc: dict[str, Any]) -> None:
    assert doc.get("kind") in MODELS, f"{path.name}: no schema model for kind {doc.get('kind')}"
    MODELS[doc["kind"]].model_validate(doc)


@pytest.mark.parametrize(
    ("where", "bad_key"),
    [
        (("spec", "workerGroupSpecs", 0), "minReplica"),
        (("spec", "headGroupSpec"), "rayStartParam"),
        (("spec",), "enableInTreeAutoScaling"),
        (("spec", "authOptions"), "secret"),
        (("spec", "headGroupSpec", "template", "spec", "containers", 0), "resource"),
    ],
)
def test_schema_models_reject_misspelled_fields(where: tuple[Any, ...], bad_key: str) -> None:
    doc = copy.deepcopy(_one("raycluster.yaml"))
    node: Any = doc
    for part in where:
        node = node[part]
    node[bad_key] = "x"
    with pytest.raises(ValidationError, match=bad_key):
        RayCluster.model_validate(doc)


def test_schema_models_reject_unquoted_ray_start_params() -> None:
    doc = copy.deepcopy(_one("raycluster.yaml"))
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings
    with pytest.raises(ValidationError):
        RayCluster.model_validate(doc)


# --------------------------------------------------------------------------- launcher


def test_launcher_passes_rays_own_validation() -> None:
    config = _launcher_prepared()
    assert config["provider"]["type"] == "aws"
    assert set(config["available_node_types"]) == {"head", "cpu", "gpu-1b", "gpu-8b"}


def test_launcher_worker_types_start_at_zero() -> None:
    config = _launcher_prepared()
    workers = {
        k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]
    }
    assert workers
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name


def test_launcher_gpu_types_declare_gpus_and_the_head_none() -> None:
    config = _launcher_prepared()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head takes no tasks or actors"
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "CPU-only head"
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in start
    for name, node_type in config["available_node_types"].items():
        resources = node_type["resources"]
        if name.startswith("gpu"):
            assert resources.get("GPU", 0) >= 1, name
            assert any(k.startswith("accelerator_type:") for k in resources), name
            assert re.match(r"^(g|p)\d", node_type["node_config"]["InstanceType"]), name
            # cluster-gpu asks for 4 CPUs per GPU actor (engine and train workers).
            assert resources["CPU"] >= 4 * resources["GPU"], name
        else:
            assert "GPU" not in resources, name


def test_launcher_token_auth_and_local_dashboard() -> None:
    config = _launcher()
    run_options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd, cmd
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    everything = yaml.safe_dump(config)
    assert "0.0.0.0" not in everything, "nothing in the launcher config binds all interfaces"
    # The token comes from the user's machine, never from this file.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "aws_credentials" not in config["provider"]
    # Ray's AWS security group admits SSH and intra-cluster traffic; no rule adds more.
    assert not config["provider"].get("security_group", {}).get("IpPermissions")


def test_launcher_installs_the_project_with_the_pinned_ray() -> None:
    import ray
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = _launcher()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # pyproject states ranges; the image's version is what the two constraints files pin.
    rays = [
        Requirement(r)
        for r in pyproject["dependencies"] + pyproject["optional-dependencies"]["gpu"]
    ]
    rays = [r for r in rays if r.name == "ray"]
    assert sorted(sorted(r.extras) for r in rays) == [["data", "serve", "train"], ["llm"]]
    assert all(r.specifier.contains(RAY_VERSION) for r in rays)
    for name in ("constraints-cpu.txt", "constraints-gpu.txt"):
        assert f"ray=={RAY_VERSION}" in (ROOT / "requirements" / name).read_text().split()
    assert ray.__version__ == RAY_VERSION
    assert config["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")
    setup = " ".join(config["setup_commands"])
    assert "selfmoa[gpu]" in setup
    assert "requirements/data-packages.txt" in setup
    # What `pip install -e ~/selfmoa[gpu]` needs, and only that (no .venv, no runs/).
    mounted = {r: local for r, local in config["file_mounts"].items() if r.startswith("~/selfmoa/")}
    assert {r.removeprefix("~/selfmoa/") for r in mounted} == set(mounted.values())
    needed = {"pyproject.toml", "README.md", "requirements", "selfmoa_ray", "serve_apps", "jobs"}
    assert needed <= set(mounted.values())
    assert all((ROOT / local).exists() for local in mounted.values())


def test_launcher_shares_the_run_folder_between_nodes() -> None:
    config = _launcher()
    run_options = config["docker"]["run_options"]
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in run_options
    assert f"--env HF_HOME={SHARED_MOUNT}/hf" in run_options
    # Serve replicas on any node read their API keys from one file there (a path, not a key).
    assert f"--env SELFMOA_API_KEYS_FILE={SHARED_MOUNT}/secrets/api_keys" in run_options
    assert any(SHARED_MOUNT in cmd for cmd in config["initialization_commands"])


# --------------------------------------------------------------------------- KubeRay: Ray's view


@pytest.mark.parametrize(("name", "spec"), CLUSTER_SPECS, ids=SPEC_IDS)
def test_ray_reads_our_cluster_spec_as_meant(name: str, spec: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import validate_config

    config = _autoscaling_config(spec, name)
    validate_config(config)  # (the translation validated it already; say it here too)
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"], "no work on the head"
    assert types, "worker groups exist"
    for group, node_type in types.items():
        assert node_type["min_workers"] == 0, group
        assert node_type["max_workers"] >= 1, group
        if group.startswith("gpu"):
            assert node_type["resources"].get("GPU", 0) >= 1, group
        else:
            assert "GPU" not in node_type["resources"], group


@pytest.mark.parametrize(("name", "spec"), CLUSTER_SPECS, ids=SPEC_IDS)
def test_autoscaling_and_version(name: str, spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    images = {_ray_container(g)["image"] for _, g in _groups(spec)}
    assert len(images) == 1, f"{name}: one image for head and workers, got {images}"
    (image,) = images
    assert not image.endswith(":latest") and ":" in image, "a pinned image tag"


@pytest.mark.parametrize(("name", "spec"), CLUSTER_SPECS, ids=SPEC_IDS)
def test_gpu_groups_request_gpus_and_others_do_not(name: str, spec: dict[str, Any]) -> None:
    for group, group_spec in _groups(spec):
        resources = _ray_container(group_spec)["resources"]
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        assert "cpu" in limits and "memory" in limits, f"{name}:{group} sets limits"
        tolerated = {t.get("key") for t in group_spec["template"]["spec"].get("tolerations", [])}
        if group.startswith("gpu"):
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{name}:{group}"
            assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"], f"{name}:{group}"
            assert "nvidia.com/gpu" in tolerated, f"{name}:{group} tolerates GPU node taints"
            assert group_spec["rayStartParams"].get("num-gpus") in (None, limits["nvidia.com/gpu"])
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests
            assert "nvidia.com/gpu" not in tolerated, f"{name}:{group} stays off GPU nodes"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


# --------------------------------------------------------------------------- secure defaults


@pytest.mark.parametrize(("name", "spec"), CLUSTER_SPECS, ids=SPEC_IDS)
def test_token_auth_on_head_and_workers(name: str, spec: dict[str, Any]) -> None:
    assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    for group, group_spec in _groups(spec):
        env = _env(_ray_container(group_spec))
        assert env["RAY_AUTH_MODE"]["value"] == "token", f"{name}:{group}"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == AUTH_SECRET and ref["key"] == "auth_token", f"{name}:{group}"
        assert not ref.get("optional"), f"{name}:{group}: a missing token must stop the pod"


@pytest.mark.parametrize(("name", "spec"), CLUSTER_SPECS, ids=SPEC_IDS)
def test_dashboard_not_exposed(name: str, spec: dict[str, Any]) -> None:
    head = spec["headGroupSpec"]
    # Set explicitly: left out, KubeRay binds the dashboard to 0.0.0.0.
    host = head["rayStartParams"]["dashboard-host"]
    if host != "127.0.0.1":
        assert host == "0.0.0.0" and name in DASHBOARD_ON_POD_NETWORK, (
            f"{name}: dashboard-host {host!r} without an opt-in in DASHBOARD_ON_POD_NETWORK"
        )
    assert head["serviceType"] == "ClusterIP"
    assert not head.get("enableIngress")
    assert "headService" not in head


def _all_docs() -> Iterator[tuple[Path, Any]]:
    for path in YAML_FILES:
        for doc in _docs(path):
            yield path, doc


def _walk(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


SERVICE_OVERRIDES = {"serveService", "headService"}
EXPOSING_TYPES = {"NodePort", "LoadBalancer"}


def test_no_service_is_exposed_beyond_the_cluster() -> None:
    for path, doc in _all_docs():
        assert doc.get("kind") not in {"Service", "Ingress", "Gateway", "HTTPRoute"}, _rel(path)
        for where, node in _walk(doc):
            field = ".".join(map(str, where))
            if where and where[-1] in SERVICE_OVERRIDES:
                pytest.fail(f"{_rel(path)}: {field} overrides a Service KubeRay makes (ClusterIP)")
            if where and where[-1] in {"serviceType", "type"} and node in EXPOSING_TYPES:
                pytest.fail(f"{_rel(path)}: {field} = {node}")


# Variables whose value would be a secret; ``*_FILE`` / ``*_PATH`` ones name where a secret is.
SECRET_ENV = re.compile(
    r"(TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL)(?!\w*_(FILE|PATH)$)", re.IGNORECASE
)


def test_secrets_come_from_secret_refs_only() -> None:
    for path, doc in _all_docs():
        for where, node in _walk(doc):
            is_env = isinstance(node, dict) and "name" in node and where[-2:-1] == ("env",)
            if is_env and SECRET_ENV.search(node["name"]):
                assert "value" not in node, f"{_rel(path)}: {node['name']} has a literal value"
                assert "secretKeyRef" in node["valueFrom"], f"{_rel(path)}: {node['name']}"
    launcher = _launcher()
    inline = " ".join(
        launcher["docker"]["run_options"]
        + launcher["setup_commands"]
        + launcher["head_start_ray_commands"]
        + launcher["worker_start_ray_commands"]
    )
    for name in re.findall(r"\b([A-Z_]+)=", inline):
        assert not SECRET_ENV.search(name), f"{name}: no secret on a command line"


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


TOKEN_SHAPES = [
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style API keys
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[0-9a-f]{32,}\b"),  # hex secrets (openssl rand -hex)
]


@pytest.mark.parametrize(
    "path", [*YAML_FILES, CLUSTER / "README.md", CLUSTER / "Dockerfile"], ids=_rel
)
def test_no_literal_secrets(path: Path) -> None:
    text = path.read_text()
    for shape in TOKEN_SHAPES:
        assert not shape.search(text), f"{_rel(path)}: token-looking text {shape.search(text)[0]!r}"
    # Base64/random-looking runs (openssl rand -base64, generated tokens): long and high-entropy.
    for word in re.findall(r"[A-Za-z0-9+/_-]{32,}={0,2}", text):
        mixed = all(re.search(c, word) for c in ("[a-z]", "[A-Z]", "[0-9]"))
        assert not (mixed and _entropy(word) >= 4.5), f"{_rel(path)}: random-looking {word!r}"


def test_secret_template_holds_placeholders_and_every_secret_used() -> None:
    declared: dict[str, set[str]] = {}
    for doc in _docs(KUBERAY / "secrets.example.yaml"):
        Secret.model_validate(doc)
        declared[doc["metadata"]["name"]] = set(doc["stringData"])
        for key, value in doc["stringData"].items():
            assert re.fullmatch(r"<[^<>]+>", value), f"{key}: not an obvious placeholder"
            assert " " in value, f"{key}: placeholders must be unusable as real values"
    used: set[tuple[str, str]] = set()
    for _path, doc in _kuberay_docs():
        for _, node in _walk(doc):
            if isinstance(node, dict) and "secretKeyRef" in node:
                used.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if isinstance(node, dict) and node.get("mode") == "token" and "secretName" in node:
                used.add((node["secretName"], "auth_token"))  # the key KubeRay reads
    for name, key in used:
        assert key in declared.get(name, set()), f"secret {name}/{key} is not in the template"


def test_network_policy_covers_every_ray_pod() -> None:
    (policy,) = [d for _, d in _kuberay_docs() if d.get("kind") == "NetworkPolicy"]
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    selector = spec["podSelector"]["matchLabels"]
    assert selector == PART_OF
    for name, cluster_spec in CLUSTER_SPECS:
        for group, group_spec in _groups(cluster_spec):
            labels = group_spec["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{name}:{group} is not covered"
    for rule in spec["ingress"]:
        for peer in rule.get("from", []):
            assert "ipBlock" not in peer, "no address-range rules (e.g. 0.0.0.0/0)"
    # Everything outside the namespace is limited to the operator's ports.
    for rule in spec["ingress"]:
        if any("namespaceSelector" in peer for peer in rule["from"]):
            assert {p["port"] for p in rule["ports"]} <= {8265, 52365, 8000}


@pytest.mark.parametrize(("name", "spec"), CLUSTER_SPECS, ids=SPEC_IDS)
def test_pods_run_unprivileged_and_share_the_run_volume(name: str, spec: dict[str, Any]) -> None:
    (pvc,) = [d for _, d in _kuberay_docs() if d.get("kind") == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for group, group_spec in _groups(spec):
        pod = group_spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, f"{name}:{group}"
        container = _ray_container(group_spec)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        if group != "head":
            assert pod["automountServiceAccountToken"] is False, f"{name}:{group}"
        claims = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        shared = claims[mounts[SHARED_MOUNT]]
        assert shared["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert claims[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert _env(container)["HF_HOME"]["value"] == f"{SHARED_MOUNT}/hf"


# --------------------------------------------------------------------------- RayJob


def _rayjob_argv() -> list[str]:
    return shlex.split(_one("rayjob.yaml")["spec"]["entrypoint"])


def _rayjob_config():
    from selfmoa_ray.config import list_presets, load_config

    argv = _rayjob_argv()
    preset = argv[argv.index("--config") + 1]
    assert preset in list_presets()
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    return load_config(preset, overrides)


def test_rayjob_runs_the_loop_then_tears_down() -> None:
    spec = _one("rayjob.yaml")["spec"]
    argv = _rayjob_argv()
    assert argv[:2] == ["python", "/app/jobs/align.py"]
    assert (ROOT / "jobs" / "align.py").is_file()
    assert "--resume" in argv, "a retry continues the run instead of failing on it"
    assert argv[argv.index("--output-dir") + 1].startswith(f"{SHARED_MOUNT}/runs/")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    # The run joins the job's cluster instead of starting an embedded Ray.
    assert _rayjob_config().ray.address == "auto"


def _fits(shape: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in shape.items() if v)


def _cluster_gpu_shapes(config) -> dict[str, tuple[dict[str, float], int]]:
    """The per-actor resources of each GPU-capable stage, and how many at once."""
    return {
        "engine": (
            {"CPU": config.engine.num_cpus_per_actor, "GPU": config.engine.num_gpus_per_actor},
            config.engine.num_actors,
        ),
        "judge": (
            {"CPU": config.judge.num_cpus_per_actor, "GPU": config.judge.num_gpus_per_actor},
            config.judge.num_actors,
        ),
        "train": (
            {"CPU": config.train.cpus_per_worker, "GPU": config.train.gpus_per_worker},
            config.train.num_workers,
        ),
    }


def test_the_clusters_run_on_gpus_and_fit_the_cluster_gpu_run() -> None:
    config = _rayjob_config()
    # vLLM engines, model-backed judges and DeepSpeed workers must ask for GPUs: that request is
    # what keeps them on GPU nodes (head and CPU groups advertise none).
    assert config.engine.backend == "vllm" and config.engine.num_gpus_per_actor >= 1
    model_backed = {"llama_guard", "reward_model", "rubric"}
    if any(e.kind in model_backed for e in config.judge.evaluators):
        assert config.judge.num_gpus_per_actor > 0
    assert config.train.strategy == "deepspeed" and config.train.gpus_per_worker >= 1
    shapes = _cluster_gpu_shapes(config)

    launcher = _launcher_prepared()
    nodes_per_cluster = {
        "selfmoa-aws.yaml": {
            k: (v["resources"], v["max_workers"])
            for k, v in launcher["available_node_types"].items()
            if k != launcher["head_node_type"]
        }
    }
    for name, spec in CLUSTER_SPECS:
        if name == "rayservice.yaml":
            continue  # serving only; its placement is checked below
        translated = _autoscaling_config(spec, name)
        nodes_per_cluster[name] = {
            k: (v["resources"], v["max_workers"])
            for k, v in translated["available_node_types"].items()
            if k != translated["head_node_type"]
        }
    for cluster, nodes in nodes_per_cluster.items():
        for stage, (shape, count) in shapes.items():
            homes = [n for n, (res, _) in nodes.items() if _fits(shape, res)]
            assert homes, f"{cluster}: no worker type fits a {stage} actor {shape}"
            capacity = sum(
                max_n * min(res.get(k, 0) // v for k, v in shape.items() if v)
                for n, (res, max_n) in nodes.items()
                if n in homes
            )
            assert capacity >= count, f"{cluster}: room for {capacity} of {count} {stage} actors"


# --------------------------------------------------------------------------- RayService


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load(_one("rayservice.yaml")["spec"]["serveConfigV2"])


def _apps() -> dict[str, dict[str, Any]]:
    return {app["name"]: app for app in _serve_config()["applications"]}


def test_serve_config_passes_serves_own_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_serve_config())
    assert {a.name for a in schema.applications} == {"policy", "evaluator"}
    assert schema.http_options.port == 8000


def test_serve_apps_mirror_serve_apps() -> None:
    apps = _apps()
    assert apps["policy"]["import_path"] == "serve_apps.policy:build_app"
    assert apps["policy"]["route_prefix"] == "/policy"
    assert apps["evaluator"]["import_path"] == "serve_apps.evaluator:build_app"
    assert apps["evaluator"]["route_prefix"] == "/evaluator"
    reference = ROOT / "serve_apps" / "serve_config.yaml"
    if reference.is_file():  # the local Serve config, when present: same apps, same routes
        local = {a["name"]: a for a in yaml.safe_load(reference.read_text())["applications"]}
        for name, app in apps.items():
            if name in local:
                assert app["import_path"] == local[name]["import_path"], name
                assert app["route_prefix"] == local[name]["route_prefix"], name


def test_evaluator_args_validate_with_the_apps_model() -> None:
    from selfmoa_ray.config import load_config
    from serve_apps.evaluator import EvaluatorAppArgs

    args = EvaluatorAppArgs.model_validate(_apps()["evaluator"]["args"])
    assert not args.allow_unauthenticated
    judge = load_config(args.judge_config, args.overrides).judge
    (deployment,) = _apps()["evaluator"]["deployments"]
    assert deployment["name"] == "EvaluatorDeployment"
    if any(e.kind in {"llama_guard", "reward_model", "rubric"} for e in judge.evaluators):
        assert deployment["ray_actor_options"]["num_gpus"] >= 1, "model-backed judges on a GPU"
        assert args.dtype != "float32", "8B judges in half precision"


def test_policy_args_validate_with_the_apps_model() -> None:
    policy = pytest.importorskip("serve_apps.policy")
    if not hasattr(policy, "PolicyAppArgs"):
        pytest.skip("serve_apps.policy has no PolicyAppArgs yet")
    args = policy.PolicyAppArgs.model_validate(_apps()["policy"]["args"])
    assert not args.allow_unauthenticated
    assert args.backend == "vllm"
    assert args.model.startswith(f"{SHARED_MOUNT}/runs/"), "a run folder on the shared volume"


def _serve_placements() -> list[tuple[str, str, int]]:
    """(app, accelerator type, GPUs per replica) that the Serve apps ask for."""
    apps = _apps()
    policy_args = apps["policy"]["args"]
    (evaluator,) = apps["evaluator"]["deployments"]
    options = evaluator["ray_actor_options"]
    return [
        ("policy", policy_args["accelerator_type"], policy_args.get("tensor_parallel_size", 1)),
        ("evaluator", options["accelerator_type"], options["num_gpus"]),
    ]


def test_serve_replicas_land_on_gpu_groups_that_can_start_from_zero() -> None:
    spec = _one("rayservice.yaml")["spec"]["rayClusterConfig"]
    types = _autoscaling_config(spec, "rayservice.yaml")["available_node_types"]
    for app, accelerator, gpus in _serve_placements():
        homes = [
            name
            for name, t in types.items()
            if t["resources"].get(f"accelerator_type:{accelerator}")
            and t["resources"]["GPU"] >= gpus
        ]
        assert homes, f"{app}: no worker group declares accelerator_type:{accelerator}"
        assert all(types[h]["min_workers"] == 0 and types[h]["max_workers"] >= 1 for h in homes)


def test_policy_accelerator_reaches_the_vllm_config() -> None:
    policy = pytest.importorskip("serve_apps.policy")
    if not hasattr(policy, "vllm_llm_config"):
        pytest.skip("serve_apps.policy has no vllm_llm_config")
    args = policy.PolicyAppArgs.model_validate(
        {**_apps()["policy"]["args"], "served_model_name": "policy"}
    )
    llm = policy.vllm_llm_config(args, "/mnt/selfmoa/runs/x/policy")
    assert llm["accelerator_type"] == _apps()["policy"]["args"]["accelerator_type"]
    assert llm["engine_kwargs"]["tensor_parallel_size"] == args.tensor_parallel_size


def test_zero_downtime_upgrades() -> None:
    spec = _one("rayservice.yaml")["spec"]
    # NewCluster: a changed rayClusterConfig gets a new cluster; traffic moves once it is healthy.
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert spec["rayClusterDeletionDelaySeconds"] >= 30
    # At least two replicas of each app at all times: a rollout always has one serving, and one
    # replica's death costs retries, not an outage.
    apps = _apps()
    policy_scaling = apps["policy"]["args"]["deployment"]["autoscaling_config"]
    assert policy_scaling["min_replicas"] >= 2
    for deployment in apps["evaluator"]["deployments"]:
        assert deployment["autoscaling_config"]["min_replicas"] >= 2
    # Shed requests say when to come back.
    for deployment in [apps["policy"]["args"]["deployment"], *apps["evaluator"]["deployments"]]:
        assert deployment["backpressure_config"]["retry_after_s"] > 0


def test_serve_api_keys_come_from_a_secret_everywhere() -> None:
    spec = _one("rayservice.yaml")["spec"]["rayClusterConfig"]
    for group, group_spec in _groups(spec):
        ref = _env(_ray_container(group_spec))["SELFMOA_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "selfmoa-api-keys", "key": "keys"}, group
    for app in _apps().values():
        assert not app["args"].get("allow_unauthenticated")


GATED_INGRESS = "serve_apps.gate:GatedOpenAiIngress"
DIRECT_STREAMING = "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"


def test_the_vllm_policy_is_behind_the_key_gate() -> None:
    """Ray Serve LLM has no key check of its own: the policy's ingress must be our gate, with
    keys required, read from the Secret-backed env that every group sets (test above)."""
    policy = pytest.importorskip("serve_apps.policy")
    args = policy.PolicyAppArgs.model_validate(
        {**_apps()["policy"]["args"], "served_model_name": "policy"}
    )
    serving = policy.vllm_serving_args(args, f"{SHARED_MOUNT}/runs/x/policy")
    ingress = serving["ingress_cls_config"]
    assert ingress["ingress_cls"] == GATED_INGRESS
    gate = ingress["ingress_extra_kwargs"]["api_gate"]
    assert gate["allow_unauthenticated"] is False
    assert gate["api_keys_file"] is None or gate["api_keys_file"].startswith(SHARED_MOUNT)
    # An app built with ray.serve.llm directly must name the gate as its ingress too.
    for app in _serve_config()["applications"]:
        if app["import_path"].startswith("ray.serve.llm"):
            assert app["args"]["ingress_cls_config"]["ingress_cls"] == GATED_INGRESS, app["name"]
    # Direct streaming makes vLLM's own server the ingress, without the gate: never on.
    for app in _serve_config()["applications"]:
        assert DIRECT_STREAMING not in (app.get("runtime_env") or {}).get("env_vars", {})
    spec = _one("rayservice.yaml")["spec"]["rayClusterConfig"]
    for group, group_spec in _groups(spec):
        assert DIRECT_STREAMING not in _env(_ray_container(group_spec)), group
