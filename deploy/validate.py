"""Check Kubernetes manifests offline against the published schemas.

    python -m deploy.validate                    # every manifest in deploy/kubernetes/ and deploy/kserve/
    python -m deploy.validate deploy/kserve/inferenceservice.yaml

Core kinds (Deployment, Service, HorizontalPodAutoscaler, PersistentVolumeClaim, NetworkPolicy, ...) go to
kubernetes-validate, which holds the Kubernetes API's own schemas, for --kubernetes-version. KServe's
InferenceService goes to the part of KServe's CRD schema vendored in deploy/schemas/ (its header says which part
and from where). Both are strict: an unknown field is an error, as with `kubectl apply --validate=strict`.
Prints one line per resource and exits 1 when any is invalid.
"""
import argparse
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
MANIFEST_DIRS = (DEPLOY / "kubernetes", DEPLOY / "kserve")
CRD_SCHEMAS = {("serving.kserve.io/v1beta1", "InferenceService"): DEPLOY / "schemas" / "inferenceservice-v1beta1.yaml"}
KUBERNETES_VERSION = "1.37.0"


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


def manifest_files(paths=()):
    if paths:
        return [Path(p) for p in paths]
    return sorted(p for folder in MANIFEST_DIRS for p in folder.glob("*.yaml"))


def load_documents(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="manifests (default: deploy/kubernetes/*.yaml, deploy/kserve/*.yaml)")
    p.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = p.parse_args(argv)
    failed = 0
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
            name = resource_name(document) if isinstance(document, dict) else "?"
            print(f"{'invalid' if found else 'ok':8} {path}  {name}")
            for problem in found:
                print(f"         {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
