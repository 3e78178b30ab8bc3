"""The agent in Kubernetes mode, end to end: real datapath on test-host veths,
configured by an AgentConfig served by the fake API server through the real
client; flows carry pod metadata; config changes apply live."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from netns import make_hosts
from xdpml.agent.kubernetes import KubeAgentOptions

from xdpml.kube.agentconfig import EnrichmentSettings
from xdpml.obs.health import HealthServer

from .conftest import agentconfig_object, kube_agent, pod, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(240)]


def udp_once(h, port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((h.host_ip, port))
    srv.settimeout(5)
    t = threading.Thread(target=lambda: srv.sendto(b"pong", srv.recvfrom(100)[1]), daemon=True)
    t.start()
    h.run(
        f'/usr/bin/python3 -c "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); '
        f"s.settimeout(5); s.sendto(b'ping', ('{h.host_ip}', {port})); s.recvfrom(100)\""
    )
    t.join(5)
    srv.close()


def agentconfig(ifaces: list[str], **spec) -> dict:
    return agentconfig_object(
        {
            "interfaces": [{"names": ifaces}],
            "timeouts": {"idleSeconds": 1, "scanIntervalSeconds": 0.2},
            "enrichment": {"labels": ["app"]},
            **spec,
        }
    )


def readyz(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status
    except urllib.error.HTTPError as e:
        return e.code


def test_agentconfig_drives_the_datapath_live(fake_api, api_client):
    from harness import MemorySink, flow_between

    with make_hosts(31, 32) as (h1, h2):
        fake_api.create(
            "pods",
            pod(
                "web-7d9f8c6b5-x2x4q",
                ip=h1.ns_ip,
                namespace="shop",
                labels={"app": "web", "pod-template-hash": "7d9f8c6b5"},
                owner=("ReplicaSet", "web-7d9f8c6b5"),
            ),
        )
        fake_api.create(
            "pods", pod("db-0", ip=h2.ns_ip, namespace="data", labels={"app": "pg"}, owner=("StatefulSet", "db"))
        )
        fake_api.create("agentconfigs", agentconfig([h1.host_if]))
        sink = MemorySink()
        health = HealthServer(port=0, conditions=("programs_attached", "pod_cache_synced"))
        sup = kube_agent(
            api_client, KubeAgentOptions(namespace="xdpml", node_name="node-a", extra_sinks=[sink]), health=health
        )
        runner = threading.Thread(target=sup.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: sup.agent is not None and sup.enrich.synced(), 90, "agent attached, cache synced")
            wait_for(lambda: readyz(health.port) == 200, 5, "readyz 200")
            status = lambda: fake_api.get("agentconfigs", "xdpml", "main").get("status") or {}  # noqa: E731
            wait_for(lambda: status().get("nodes", {}).get("node-a", {}).get("ready") is True, 10, "status ready")
            assert status()["observedGeneration"] == 1
            first_datapath = sup.agent.datapath

            udp_once(h1, 7001)
            rows = sink.wait_rows("flow", flow_between(h1.ns_ip, h1.host_ip, 17, 7001))
            assert len(rows) == 1
            r = rows[0]
            assert (r["src_namespace"], r["src_pod"]) == ("shop", "web-7d9f8c6b5-x2x4q")
            assert (r["src_workload_kind"], r["src_workload"]) == ("Deployment", "web")
            assert r["src_label_app"] == "web" and r["src_node"] == "node-a"
            assert r["dst_pod"] == ""  # the host side is no pod

            # live: add the second interface -> attached without restarting the datapath
            fake_api.update(
                "agentconfigs",
                "xdpml",
                "main",
                lambda o: o["spec"]["interfaces"][0].update(names=[h1.host_if, h2.host_if]),
            )
            wait_for(
                lambda: set(sup.agent.plan) == {h1.host_if, h2.host_if} and len(sup.agent.datapath.attachments) == 2,
                20,
                "second interface attached",
            )
            assert sup.agent.datapath is first_datapath
            wait_for(lambda: status().get("observedGeneration") == 2, 10, "generation 2 observed")
            udp_once(h2, 7002)
            rows = sink.wait_rows("flow", flow_between(h2.ns_ip, h2.host_ip, 17, 7002))
            assert len(rows) == 1 and rows[0]["src_pod"] == "db-0" and rows[0]["src_workload_kind"] == "StatefulSet"

            # invalid: refused with a reason, the running config stays
            fake_api.update("agentconfigs", "xdpml", "main", lambda o: o["spec"].update(features={"firstN": 99}))
            wait_for(
                lambda: any(c.get("reason") == "InvalidSpec" for c in status().get("conditions", [])),
                10,
                "InvalidSpec condition",
            )
            assert sup.agent.datapath is first_datapath and len(first_datapath.attachments) == 2
            # the status and the event are written by the agent's writer thread one after the other:
            # the condition seen does not mean the event is written yet
            invalid_events = lambda: [e for e in fake_api.list("events") if e.get("reason") == "InvalidSpec"]  # noqa: E731
            wait_for(lambda: bool(invalid_events()), 10, "InvalidSpec event")
            events = invalid_events()
            assert len(events) == 1 and "firstN" in events[0]["message"]

            # a datapath change (first-N size) restarts the datapath, draining it first
            fake_api.update("agentconfigs", "xdpml", "main", lambda o: o["spec"].update(features={"firstN": 4}))
            wait_for(
                lambda: (
                    sup.agent is not None
                    and sup.agent.datapath is not None
                    and sup.agent.datapath is not first_datapath
                ),
                60,
                "datapath restarted",
            )
            assert sup.agent.settings.datapath.first_n == 4
            udp_once(h1, 7003)
            rows = sink.wait_rows("flow", flow_between(h1.ns_ip, h1.host_ip, 17, 7003))
            assert len(rows) == 1 and len(rows[0]["splt_ps"]) == 4 and rows[0]["src_pod"].startswith("web-")
        finally:
            sup.stop_event.set()
            runner.join(60)
            health.close()
        assert not runner.is_alive()


def test_pod_veths_rule_attaches_only_veths_routed_to_known_pods(fake_api, api_client):
    from netns import sh

    with make_hosts(33, 34) as (pod_host, other):
        # a routed CNI gives each pod a host route <pod IP>/32 via its veth; the other veth has none
        sh(f"ip route add {pod_host.ns_ip}/32 dev {pod_host.host_if}")
        try:
            fake_api.create("pods", pod("api-0", ip=pod_host.ns_ip, namespace="shop"))
            fake_api.create(
                "agentconfigs", agentconfig_object({"interfaces": [{"names": ["pod-veths"], "hooks": "tc"}]})
            )
            sup = kube_agent(api_client, KubeAgentOptions(namespace="xdpml", node_name="node-a"))
            # the pod cache must know the pod before the rule is resolved
            sup.enrich.apply(EnrichmentSettings())
            wait_for(sup.enrich.synced, 10, "pod cache synced")
            runner = threading.Thread(target=sup.run, daemon=True)
            runner.start()
            try:
                wait_for(lambda: sup.agent is not None, 90, "agent attached")
                assert list(sup.agent.plan) == [pod_host.host_if]
                assert other.host_if not in sup.agent.plan
            finally:
                sup.stop_event.set()
                runner.join(60)
        finally:
            sh(f"ip route del {pod_host.ns_ip}/32 dev {pod_host.host_if}", check=False)
