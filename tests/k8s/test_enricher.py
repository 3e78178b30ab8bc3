"""Enricher and workload/service resolution, fed through the fake API server."""

from __future__ import annotations

import numpy as np
import pytest
from xdpml.agent.enrich import EndpointInfo, Enricher, PodCache, VethMap, metadata_column_names

from xdpml.kube.podcache import PodRecord, pod_record, workload_of
from xdpml.kube.reflector import Backoff
from xdpml.wire.columns import ColumnBatch, ColumnSpec, ip_from_str

from .conftest import pod, wait_for

pytestmark = pytest.mark.timeout(60)


def svc(name: str, *, selector: dict, cluster_ip: str, namespace: str = "default") -> dict:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": selector, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [{"port": 80}]},
    }


def owned(kind: str, name: str, owner: tuple[str, str] | None, *, namespace: str = "default") -> dict:
    meta: dict = {"name": name, "namespace": namespace}
    if owner:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "uid": "u-" + owner[1], "controller": True}
        ]
    spec = {"selector": {"matchLabels": {"x": "y"}}, "template": {}} if kind == "replicasets" else {"template": {}}
    return {"metadata": meta, "spec": spec}


@pytest.fixture
def cluster(fake_api):
    api = fake_api
    api.create(
        "pods",
        pod(
            "web-7d9f8b6c5d-abcde",
            ip="10.1.0.10",
            owner=("ReplicaSet", "web-7d9f8b6c5d"),
            labels={"app": "web", "pod-template-hash": "7d9f8b6c5d", "app.kubernetes.io/name": "webapp"},
        ),
    )
    api.create("pods", pod("api-x1", ip="10.1.0.11", owner=("ReplicaSet", "api-rs"), labels={"app": "api"}))
    api.create("pods", pod("backup-29000000-q", ip="10.1.0.12", owner=("Job", "backup-29000000")))
    api.create(
        "pods",
        pod(
            "db-0", ip="10.2.0.20", node="node-b", namespace="data", owner=("StatefulSet", "db"), host_ip="192.168.50.2"
        ),
    )
    api.create("pods", pod("bare", ip="10.1.0.13", labels={"app": "web"}))
    api.create(
        "pods", pod("kube-proxy-z", host_network=True, owner=("DaemonSet", "kube-proxy"), namespace="kube-system")
    )
    api.create("services", svc("web-svc", selector={"app": "web"}, cluster_ip="10.96.0.10"))
    api.create("services", svc("web-canary", selector={"app": "web", "track": "canary"}, cluster_ip="10.96.0.11"))
    api.create("services", svc("all-web", selector={"app": "web"}, cluster_ip="10.96.0.12"))
    api.create("replicasets", owned("replicasets", "api-rs", ("Deployment", "api-server")))
    api.create("jobs", owned("jobs", "backup-29000000", ("CronJob", "nightly-backup")))
    return api


def start_cache(api_client, **kw) -> PodCache:
    cache = PodCache(
        api_client, node_name="node-a", watch_timeout_s=5, backoff_factory=lambda: Backoff(base_s=0.05, cap_s=0.2), **kw
    ).start()
    assert cache.wait_synced(5)
    return cache


def flows(pairs: list[tuple[str, str]]) -> ColumnBatch:
    src = np.array([ip_from_str(s) for s, _ in pairs], dtype="S16")
    dst = np.array([ip_from_str(d) for _, d in pairs], dtype="S16")
    return ColumnBatch(
        "flow",
        {"src_ip": src, "dst_ip": dst, "src2dst_packets": np.arange(len(pairs), dtype="u8")},
        {"src2dst_packets": ColumnSpec("src2dst_packets", "u8")},
    )


def test_enrich_columns_exact(cluster, api_client):
    cache = start_cache(api_client, cluster_wide=True, services=True, owners=True)
    try:
        enricher = Enricher(cache, labels=["app", "app.kubernetes.io/name"])
        batch = flows(
            [
                ("10.1.0.10", "10.96.0.10"),  # Deployment pod -> its ClusterIP
                ("10.1.0.11", "10.2.0.20"),  # Deployment via RS cache -> StatefulSet on node-b
                ("10.1.0.12", "192.168.50.1"),  # CronJob pod -> node-a (host network address)
                ("10.1.0.13", "8.8.8.8"),  # bare pod -> outside
                ("10.1.0.10", "10.1.0.13"),
                ("::ffff:10.1.0.11", "2001:db8::1"),
            ]
        )
        out = enricher.enrich(batch)
        assert list(out.columns)[:3] == ["src_ip", "dst_ip", "src2dst_packets"]
        assert list(out.columns)[3:] == metadata_column_names(["app", "app.kubernetes.io/name"])
        assert out["src_namespace"].tolist() == ["default"] * 6
        assert out["src_pod"].tolist() == [
            "web-7d9f8b6c5d-abcde",
            "api-x1",
            "backup-29000000-q",
            "bare",
            "web-7d9f8b6c5d-abcde",
            "api-x1",
        ]
        assert out["src_workload_kind"].tolist() == [
            "Deployment",
            "Deployment",
            "CronJob",
            "Pod",
            "Deployment",
            "Deployment",
        ]
        assert out["src_workload"].tolist() == ["web", "api-server", "nightly-backup", "bare", "web", "api-server"]
        assert out["src_node"].tolist() == ["node-a"] * 6
        assert out["src_service"].tolist() == ["all-web,web-svc", "", "", "all-web,web-svc", "all-web,web-svc", ""]
        assert out["src_label_app"].tolist() == ["web", "api", "", "web", "web", "api"]
        assert out["src_label_app_kubernetes_io_name"].tolist() == ["webapp", "", "", "", "webapp", ""]
        assert out["dst_namespace"].tolist() == ["default", "data", "", "", "default", ""]
        assert out["dst_pod"].tolist() == ["", "db-0", "", "", "bare", ""]
        assert out["dst_workload_kind"].tolist() == ["Service", "StatefulSet", "Node", "", "Pod", ""]
        assert out["dst_workload"].tolist() == ["web-svc", "db", "node-a", "", "bare", ""]
        assert out["dst_node"].tolist() == ["", "node-b", "node-a", "", "node-a", ""]
        assert out["dst_service"].tolist() == ["web-svc", "", "", "", "all-web,web-svc", ""]
        assert all(out[c].dtype == object for c in metadata_column_names(["app", "app.kubernetes.io/name"]))
        assert out.specs["dst_pod"].role == "meta" and out.specs["src2dst_packets"].dtype == "u8"
        assert len(list(out.rows())) == 6
    finally:
        cache.stop()


def test_naming_conventions_without_owner_watch(cluster, api_client):
    cache = start_cache(api_client)
    try:

        def kinds(ip):
            info = cache.resolve(ip_from_str(ip))
            return info.workload_kind, info.workload

        assert kinds("10.1.0.10") == ("Deployment", "web")  # RS name = deployment + pod-template-hash
        assert kinds("10.1.0.11") == ("ReplicaSet", "api-rs")  # no hash label: cannot know
        assert kinds("10.1.0.12") == ("CronJob", "backup")  # job name = cronjob + minutes
        assert cache.resolve(ip_from_str("10.2.0.20")) is None  # other node, not cluster-wide
        assert cache.resolve(ip_from_str("10.96.0.10")) is None  # services not watched
    finally:
        cache.stop()


def test_host_network_pod_maps_to_node_and_keeps_it(cluster, api_client):
    cache = start_cache(api_client)
    try:
        info = cache.resolve(ip_from_str("192.168.50.1"))
        assert (info.pod, info.workload_kind, info.node) == ("", "Node", "node-a")
        # Deleting the host-network pod leaves the node address known through other pods.
        cluster.delete("pods", "kube-system", "kube-proxy-z")
        wait_for(lambda: len(cache.local_pods) == 4)
        assert cache.resolve(ip_from_str("192.168.50.1")).node == "node-a"
    finally:
        cache.stop()


def test_workload_of_units():
    def rec(owner=("", ""), labels=None, name="p") -> PodRecord:
        obj = pod(name, ip="10.0.0.1", labels=labels, owner=owner if owner[0] else None)
        return pod_record(obj)

    assert workload_of(rec()) == ("Pod", "p")
    assert workload_of(rec(("DaemonSet", "ds"))) == ("DaemonSet", "ds")
    assert workload_of(rec(("ReplicaSet", "a-b-5f6"), {"pod-template-hash": "5f6"})) == ("Deployment", "a-b")
    assert workload_of(rec(("ReplicaSet", "a-b-5f6"), {"pod-template-hash": "999"})) == ("ReplicaSet", "a-b-5f6")
    assert workload_of(rec(("Job", "migrate-2"))) == ("Job", "migrate-2")  # too few digits for a CronJob
    assert workload_of(rec(("Job", "report-28512345"))) == ("CronJob", "report")


class CountingResolver:
    def __init__(self, table: dict[str, EndpointInfo]):
        self.table = {ip_from_str(k): v for k, v in table.items()}
        self.calls: list[bytes] = []

    def resolve(self, ip: bytes):
        self.calls.append(ip)
        return self.table.get(ip)


def test_each_distinct_ip_resolved_once_per_batch():
    resolver = CountingResolver({"10.0.0.1": EndpointInfo(namespace="a", pod="p1", labels={"tier": "x"})})
    rng = np.random.default_rng(1)
    ips = [f"10.0.0.{i}" for i in range(1, 6)]
    pairs = [(ips[rng.integers(5)], ips[rng.integers(5)]) for _ in range(1000)]
    out = Enricher(resolver, labels=["tier"]).enrich(flows(pairs))
    assert len(resolver.calls) == len({s for s, _ in pairs}) + len({d for _, d in pairs})
    expect_pod = ["p1" if s == "10.0.0.1" else "" for s, _ in pairs]
    assert out["src_pod"].tolist() == expect_pod
    assert out["dst_label_tier"].tolist() == ["x" if d == "10.0.0.1" else "" for _, d in pairs]


def test_empty_batch_and_missing_ip_columns():
    e = Enricher(CountingResolver({}))
    out = e.enrich(flows([]))
    assert len(out) == 0 and out["dst_service"].dtype == object
    nokeys = ColumnBatch("window", {"x": np.zeros(3)})
    out = e.enrich(nokeys)
    assert out["src_pod"].tolist() == ["", "", ""]


def test_label_allowlist_collision_is_a_clear_error():
    with pytest.raises(ValueError, match="same column name"):
        Enricher(CountingResolver({}), labels=["app.kubernetes.io/name", "app_kubernetes_io/name"])


class StaticRoutes:
    def __init__(self, routes):
        self.routes = routes

    def host_routes(self):
        return self.routes


def test_veth_ifindex_maps_to_pod(cluster, api_client):
    cache = start_cache(api_client)
    try:
        routes = StaticRoutes([(7, "10.1.0.10"), (8, "10.1.0.13"), (9, "10.9.9.9"), (3, "192.168.50.1")])
        veths = VethMap(routes, cache)
        veths.refresh()
        assert veths.pod_for_ifindex(7).pod == "web-7d9f8b6c5d-abcde"
        assert veths.pod_for_ifindex(8).pod == "bare"
        assert veths.pod_for_ifindex(9) is None  # route to an unknown address
        assert veths.pod_for_ifindex(3) is None  # a node address is not a pod
        assert veths.pod_for_ifindex(42) is None
        assert {k: v.pod for k, v in veths.pod_veths().items()} == {7: "web-7d9f8b6c5d-abcde", 8: "bare"}
        # The pod behind ifindex 8 goes away: the veth no longer maps to it.
        cluster.delete("pods", "default", "bare")
        wait_for(lambda: veths.pod_for_ifindex(8) is None)
    finally:
        cache.stop()
