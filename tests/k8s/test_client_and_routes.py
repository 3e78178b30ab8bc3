"""The kubeconfig path to the API server, and reading pod routes from a real routing table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from xdpml.agent.enrich import PodCache

from xdpml.kube.client import KubeUnavailable, api_client
from xdpml.wire.columns import ip_from_str

from .conftest import pod

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pod_cache_through_a_kubeconfig(fake_api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
                "users": [{"name": "agent", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
            }
        )
    )
    fake_api.create("pods", pod("a", ip="10.1.0.1"))
    with api_client(kubeconfig=str(kubeconfig)) as c, PodCache(c, node_name="node-a") as cache:
        assert cache.wait_synced(5)
        assert cache.resolve(ip_from_str("10.1.0.1")).pod == "a"


def test_no_kubeconfig_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeUnavailable, match="pass --kubeconfig"):
        api_client(kubeconfig=str(tmp_path / "missing"))


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2")
def test_ip_route_source_reads_host_routes_in_a_netns():
    ns = f"xdpml-k8s-{uuid.uuid4().hex[:8]}"

    def run(*a):
        return subprocess.run(["ip", "netns", "exec", ns, *a], check=True, capture_output=True, text=True)

    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        # Host sides of two pod veths (the pod ends stay in this namespace: enough here).
        for host, peer in (("cali0a1b", "eth0b"), ("cali0a1c", "eth0c")):
            run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            run("ip", "link", "set", host, "up")
            run("ip", "link", "set", peer, "up")
        run("ip", "route", "add", "10.244.1.7/32", "dev", "cali0a1b")
        run("ip", "route", "add", "10.244.9.0/24", "dev", "cali0a1c")  # a subnet route: not a pod
        run("ip", "-6", "route", "add", "fd00::7/128", "dev", "cali0a1c")
        code = (
            "import json, socket; from xdpml.agent.enrich.veth import IpRouteSource; "
            "print(json.dumps([sorted(IpRouteSource().host_routes()), socket.if_nametoindex('cali0a1b'), "
            "socket.if_nametoindex('cali0a1c')]))"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        routes, b, c = json.loads(out)
        assert sorted(map(tuple, routes)) == sorted([(b, "10.244.1.7"), (c, "fd00::7")])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
