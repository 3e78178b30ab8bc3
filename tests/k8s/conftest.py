"""Fixtures: a fake API server on loopback and a real kubernetes ApiClient pointed at it."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from kubernetes import client as k8s_client

from xdpml.lab import private_bpffs

from .fakeapi import FakeKubeAPI


@pytest.fixture
def fake_api():
    with FakeKubeAPI(bookmark_interval_s=0.2) as api:
        yield api


@pytest.fixture
def bpffs():
    """A private BPF filesystem for one test's pins."""
    with private_bpffs("xdpml-k8s-bpffs-") as d:
        yield d


def make_client(api: FakeKubeAPI) -> k8s_client.ApiClient:
    cfg = k8s_client.Configuration(host=api.url)
    # The default urllib3 retries (3, with backoff) only slow the "server down" tests;
    # the reflector has its own backoff.
    cfg.retries = False
    return k8s_client.ApiClient(cfg)


@pytest.fixture
def api_client(fake_api):
    with make_client(fake_api) as c:
        yield c


def wait_for(cond: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def agentconfig_object(spec: dict, name: str = "main") -> dict:
    """An AgentConfig ``name`` in namespace xdpml with this spec, as the API server holds it."""
    return {
        "apiVersion": "xdpml.io/v1alpha1",
        "kind": "AgentConfig",
        "metadata": {"name": name, "namespace": "xdpml"},
        "spec": spec,
    }


def kube_agent(api_client, options, **kw):
    """A KubernetesAgent (options: KubeAgentOptions) whose pod cache and AgentConfig
    watcher re-watch every 5 s and retry after 0.05-0.2 s: quick to recover in tests."""
    from xdpml.agent.enrich.manager import EnrichmentManager
    from xdpml.agent.kubernetes import KubernetesAgent

    from xdpml.kube.reflector import Backoff

    def backoff():
        return Backoff(base_s=0.05, cap_s=0.2)

    return KubernetesAgent(
        api_client,
        options,
        enrich_factory=lambda api: EnrichmentManager(
            api, node_name=options.node_name, watch_timeout_s=5, backoff_factory=backoff
        ),
        watcher_kwargs={"node_labels": {}, "watch_timeout_s": 5, "backoff_factory": backoff},
        **kw,
    )


def pod(
    name: str,
    *,
    ip: str = "",
    node: str = "node-a",
    namespace: str = "default",
    labels: dict | None = None,
    owner: tuple[str, str] | None = None,
    host_network: bool = False,
    host_ip: str = "192.168.50.1",
    phase: str = "Running",
) -> dict:
    meta: dict = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if owner:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "uid": f"uid-{owner[1]}", "controller": True}
        ]
    status: dict = {"phase": phase, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}
    if host_network:
        ip = host_ip
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": "main", "image": "registry.local/app:1"}],
        },
        "status": status,
    }
