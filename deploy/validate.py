"""Check the manifests offline against the published schemas (kubernetes-validate, and KServe's CRD schema vendored
in deploy/schemas/), strictly, and that none leaves a serving pod open where token authorization is off:
cluster-local InferenceServices, ingress NetworkPolicies that let in no one by default, no NodePort."""
import argparse
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m deploy.validate
  python -m deploy.validate --config /mnt/models-rw/visual-search/release-2/config/config.properties
"""

DEPLOY = Path(__file__).resolve().parent
MANIFEST_DIRS = (DEPLOY / "kubernetes", DEPLOY / "kserve")
CRD_SCHEMAS = {("serving.kserve.io/v1beta1", "InferenceService"): DEPLOY / "schemas" / "inferenceservice-v1beta1.yaml"}
KUBERNETES_VERSION = "1.37.0"
RELEASE_CONFIG = DEPLOY / "storage" / "config" / "config.properties"
MILVUS_VALUES = DEPLOY / "milvus" / "values.yaml"
MILVUS_VALUES_SCHEMA = DEPLOY / "schemas" / "milvus-values.yaml"
MILVUS_URI_ENV = "VISUAL_SEARCH_MILVUS_URI"

# KServe: Serverless mode (Knative) reads the Knative label, RawDeployment mode the KServe one.
CLUSTER_LOCAL = "cluster-local"
KNATIVE_VISIBILITY = "networking.knative.dev/visibility"
KSERVE_VISIBILITY = "networking.kserve.io/visibility"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
VISIBILITY_BY_MODE = {"Serverless": (KNATIVE_VISIBILITY,), "Knative": (KNATIVE_VISIBILITY,),
                      "RawDeployment": (KSERVE_VISIBILITY,), "Standard": (KSERVE_VISIBILITY,)}
# The labels KServe puts on a predictor's pods, besides the InferenceService's own (less the Knative visibility).
ISVC_POD_LABEL = "serving.kserve.io/inferenceservice"
COMPONENT_LABEL = "component"


def strict(schema):
    """A copy of an OpenAPI v3 schema in which every object that lists its properties refuses other ones."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(path):
    schema = yaml.safe_load(Path(path).read_text())["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict(schema), format_checker=None)


def resource_name(document):
    return f"{document.get('kind', '?')}/{(document.get('metadata') or {}).get('name', '?')}"


def problems(document, kubernetes_version=KUBERNETES_VERSION):
    """The reasons `document` is invalid: [] when it is valid."""
    if not isinstance(document, dict) or "apiVersion" not in document or "kind" not in document:
        return ["not a Kubernetes resource (no apiVersion or kind)"]
    crd = CRD_SCHEMAS.get((document["apiVersion"], document["kind"]))
    if crd:
        return [f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
                for error in sorted(crd_validator(crd).iter_errors(document), key=lambda e: list(e.absolute_path))]
    try:
        kubernetes_validate.validate(document, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '(top)'}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {document['apiVersion']} {document['kind']} in Kubernetes {kubernetes_version} "
                f"or in deploy/schemas/"]
    return []


def read_config(path):
    """TorchServe's config.properties as {key: value}."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def token_authorization_off(props, container):
    """Whether TorchServe runs without token authorization: the config, the command line, or (with
    enable_envvars_config) the environment turns it off."""
    words = [*(container.get("command") or []), *(container.get("args") or [])]
    env = {e.get("name"): e.get("value") for e in container.get("env") or []}
    return (props.get("disable_token_authorization", "false").lower() == "true"
            or "--disable-token-auth" in words
            or (props.get("enable_envvars_config", "false").lower() == "true"
                and str(env.get("TS_DISABLE_TOKEN_AUTHORIZATION", "")).lower() == "true"))


def selects(selector, labels):
    """Whether a Kubernetes label selector matches `labels`; an empty selector matches every pod."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        if ((operator == "In" and labels.get(key) not in values)
                or (operator == "NotIn" and key in labels and labels[key] in values)
                or (operator == "Exists" and key not in labels)
                or (operator == "DoesNotExist" and key in labels)):
            return False
    return True


def is_empty(selector):
    return not selector or not (selector.get("matchLabels") or selector.get("matchExpressions"))


def namespace(document):
    return (document.get("metadata") or {}).get("namespace")


def serving_workloads(documents):
    """(name, namespace, pod labels, serving container, the resource) of each Deployment and InferenceService."""
    found = []
    for doc in documents:
        if not isinstance(doc, dict):
            continue
        meta = doc.get("metadata") or {}
        spec = doc.get("spec") or {}
        if doc.get("kind") == "Deployment":
            template = spec.get("template") or {}
            for container in (template.get("spec") or {}).get("containers") or []:
                found.append((f"{resource_name(doc)} ({container.get('name')})", namespace(doc),
                              dict((template.get("metadata") or {}).get("labels") or {}), container, doc))
        elif doc.get("kind") == "InferenceService":
            predictor = spec.get("predictor") or {}
            labels = {**{k: v for k, v in (meta.get("labels") or {}).items() if k != KNATIVE_VISIBILITY},
                      **(predictor.get("labels") or {}),
                      ISVC_POD_LABEL: meta.get("name"), COMPONENT_LABEL: "predictor"}
            found.append((resource_name(doc), namespace(doc), labels, predictor.get("model") or {}, doc))
    return found


def policy_types(policy):
    spec = policy.get("spec") or {}
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def admits_everyone(rule):
    """Why an ingress rule lets in every source, or None when it names whom it lets in."""
    peers = rule.get("from")
    if not peers:
        return "a rule without `from` lets in every source"
    for peer in peers:
        cidr = (peer.get("ipBlock") or {}).get("cidr", "")
        if cidr.endswith("/0"):
            return f"a rule lets in {cidr}"
        if "namespaceSelector" in peer and is_empty(peer["namespaceSelector"]) and is_empty(peer.get("podSelector")):
            return "a rule lets in every pod of every namespace (namespaceSelector: {})"
    return None


def exposure(documents, props):
    """[(workload, [reasons it is open], resource)] for every serving workload in `documents`, given the
    TorchServe config `props` its pods read; no reasons: closed."""
    policies = [d for d in documents if isinstance(d, dict) and d.get("kind") == "NetworkPolicy"]
    services = [d for d in documents if isinstance(d, dict) and d.get("kind") == "Service"]
    verdicts = []
    for name, ns, labels, container, doc in serving_workloads(documents):
        if not token_authorization_off(props, container):
            verdicts.append((name, [], doc))
            continue
        reasons = []
        if doc["kind"] == "InferenceService":
            meta = doc.get("metadata") or {}
            mode = (meta.get("annotations") or {}).get(DEPLOYMENT_MODE)
            needed = VISIBILITY_BY_MODE.get(mode, (KNATIVE_VISIBILITY, KSERVE_VISIBILITY))
            missing = [key for key in needed if (meta.get("labels") or {}).get(key) != CLUSTER_LOCAL]
            if missing:
                reasons.append("not cluster-local, so KServe publishes it through the ingress gateway: label it "
                               + ", ".join(f"{key}: {CLUSTER_LOCAL}" for key in missing))
        restricting = [p for p in policies if namespace(p) == ns and "Ingress" in policy_types(p)
                       and selects((p.get("spec") or {}).get("podSelector"), labels)]
        if not restricting:
            reasons.append("no NetworkPolicy restricts ingress to its pods "
                           f"({', '.join(f'{k}={v}' for k, v in sorted(labels.items()))})")
        for policy in restricting:
            for rule in (policy.get("spec") or {}).get("ingress") or []:
                why = admits_everyone(rule)
                if why:
                    reasons.append(f"{resource_name(policy)}: {why}")
        for service in services:
            selector = (service.get("spec") or {}).get("selector")
            kind = (service.get("spec") or {}).get("type", "ClusterIP")
            if selector and namespace(service) == ns and kind in ("NodePort", "LoadBalancer") \
                    and selects({"matchLabels": selector}, labels):
                reasons.append(f"{resource_name(service)} publishes its pods outside the cluster (type {kind})")
        verdicts.append((name, [f"token authorization is off and {reason}" for reason in reasons], doc))
    return verdicts


def exposure_problems(documents, props):
    """The reasons any serving workload in `documents` is open: [] when every one is closed."""
    return [f"{name}: {reason}" for name, reasons, _ in exposure(documents, props) for reason in reasons]


def milvus_values_problems(values):
    """The reasons a values file for Milvus's Helm chart is not what the handler needs: keys the chart does not
    read or of the wrong type (deploy/schemas/milvus-values.yaml), no cluster mode, a single replica."""
    schema = yaml.safe_load(MILVUS_VALUES_SCHEMA.read_text())
    found = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
             for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
    if not (values.get("cluster") or {}).get("enabled"):
        found.append("cluster.enabled is not true: standalone Milvus is one pod")
    for component in ("proxy", "queryNode"):
        if int((values.get(component) or {}).get("replicas", 1)) < 2:
            found.append(f"{component}.replicas under 2: one pod lost stops every search")
    if int((values.get("etcd") or {}).get("replicaCount", 1)) < 3:
        found.append("etcd.replicaCount under 3: no quorum survives a lost member")
    return found


def milvus_uris(documents):
    """{workload: the Milvus URI its pods are given} for every serving workload that names one."""
    found = {}
    for name, _, _, container, _ in serving_workloads(documents):
        for env in container.get("env") or []:
            if env.get("name") == MILVUS_URI_ENV:
                found[name] = env.get("value")
    return found


def manifest_files(paths=()):
    if paths:
        return [Path(p) for p in paths]
    return sorted(p for folder in MANIFEST_DIRS for p in folder.glob("*.yaml"))


def load_documents(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("files", nargs="*", help="manifests (default: deploy/kubernetes/*.yaml, deploy/kserve/*.yaml)")
    p.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    p.add_argument("--config", default=str(RELEASE_CONFIG),
                   help="the TorchServe config the pods read: the template, or a release's config/config.properties")
    args = p.parse_args(argv)
    failed = 0
    every, origin = [], {}
    for path in manifest_files(args.files):
        try:
            documents = load_documents(path)
        except (OSError, yaml.YAMLError) as error:
            print(f"error: {path}: {error}")
            failed += 1
            continue
        for document in documents:
            found = problems(document, args.kubernetes_version)
            failed += bool(found)
            if not found:  # an invalid resource would not apply: the exposure check leaves it out
                every.append(document)
                origin[id(document)] = path
            name = resource_name(document) if isinstance(document, dict) else "?"
            print(f"{'invalid' if found else 'ok':8} {path}  {name}")
            for problem in found:
                print(f"         {problem}")
    try:
        values = yaml.safe_load(MILVUS_VALUES.read_text())
    except (OSError, yaml.YAMLError) as error:
        print(f"error: {MILVUS_VALUES}: {error}")
        return 1
    found = milvus_values_problems(values)
    failed += bool(found)
    print(f"{'invalid' if found else 'ok':8} {MILVUS_VALUES}  values of Milvus's Helm chart")
    for problem in found:
        print(f"         {problem}")
    try:
        props = read_config(args.config)
    except OSError as error:
        print(f"error: {args.config}: {error}")
        return 1
    for name, reasons, document in exposure(every, props):
        failed += bool(reasons)
        print(f"{'open' if reasons else 'closed':8} {origin[id(document)]}  {name}, pods reading {args.config}")
        for reason in reasons:
            print(f"         {reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
