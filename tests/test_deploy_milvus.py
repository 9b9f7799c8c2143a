"""The Milvus deployment, offline: the Helm values against the chart's keys (deploy/schemas/milvus-values.yaml) in
cluster mode with replicas, and every serving manifest pointing the handler at that release's proxy Service, with
an egress rule that lets its pods reach it and nothing more."""
from urllib.parse import urlsplit

import yaml

from deploy.validate import (
    MILVUS_VALUES,
    load_documents,
    manifest_files,
    milvus_uris,
    milvus_values_problems,
    serving_workloads,
)

RELEASE, NAMESPACE = "visual-search", "milvus"  # the helm install line in deploy/milvus/values.yaml


def values():
    return yaml.safe_load(MILVUS_VALUES.read_text())


def documents():
    return [d for path in manifest_files() for d in load_documents(path)]


def test_the_values_are_valid_for_the_chart_in_cluster_mode_with_replicas():
    assert milvus_values_problems(values()) == []
    assert values()["cluster"]["enabled"] is True
    settings = yaml.safe_load(values()["extraConfigFiles"]["user.yaml"])
    assert settings["queryCoord"]["clusterLevelLoadReplicaNumber"] >= 2


def test_a_standalone_or_single_replica_values_file_is_refused():
    single = {**values(), "cluster": {"enabled": False}, "queryNode": {"replicas": 1}, "etcd": {"replicaCount": 1}}
    found = milvus_values_problems(single)
    assert any("cluster.enabled" in p for p in found) and any("queryNode" in p for p in found)
    assert any("etcd" in p for p in found)
    assert any("Additional properties" in p for p in milvus_values_problems({**values(), "queryNodes": {}}))


def test_every_serving_workload_points_the_handler_at_the_release_s_proxy():
    for path in manifest_files():
        workloads = {name for name, *_ in serving_workloads(load_documents(path))}
        assert set(milvus_uris(load_documents(path))) == workloads, path
    for uri in milvus_uris(documents()).values():
        parts = urlsplit(uri)
        assert parts.hostname == f"{RELEASE}-milvus.{NAMESPACE}.svc.cluster.local"
        assert parts.port == values()["service"]["port"]


def test_the_network_policies_let_the_pods_reach_milvus_s_proxies_only_on_its_port():
    policies = [d for d in documents() if d["kind"] == "NetworkPolicy"]
    assert policies
    port = values()["service"]["port"]
    for policy in policies:
        rules = [r for r in policy["spec"]["egress"] if any(p["port"] == port for p in r.get("ports", []))]
        assert len(rules) == 1, policy["metadata"]["name"]
        (peer,) = rules[0]["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "milvus", "component": "proxy"}
        assert [p["port"] for p in rules[0]["ports"]] == [port]
