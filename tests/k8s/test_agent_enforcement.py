"""Enforcement under the Kubernetes supervisor, end to end: an AgentConfig served by the
fake API server turns enforcement on (over mutual TLS to a real collector), a flood from
a pod becomes a rule that drops it (counted by the qdisc), the pod gets one Event, the
node's status shows the mode and counts, kube-system pods are never dropped, the API
server endpoints are allowlisted, and mode, limits and allowlist change live."""

from __future__ import annotations

import os
import threading

import pytest
from enforce.traffic import Receiver, qdisc_drops, send
from grpc_fixtures import PacketsModel
from netns import make_hosts
from xdpml.agent.kubernetes import KubeAgentOptions
from xdpml.collector.server import CollectorServer, CollectorSettings

from xdpml.lab import make_certs
from xdpml.wire.tls import ClientTls, ServerTls

from .conftest import agentconfig_object, kube_agent, pod, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]
PORT, MARK_PORT = 9, 9471


def agentconfig(ifaces, **enforcement) -> dict:
    return agentconfig_object(
        {
            "interfaces": [{"names": ifaces, "hooks": "tc"}],
            "timeouts": {"idleSeconds": 1, "scanIntervalSeconds": 0.2},
            "enforcement": enforcement,
        }
    )


def test_enforcement_from_the_agentconfig(fake_api, api_client, tmp_path, bpffs):
    pem = make_certs(tmp_path, server_name="collector.test")
    ca_pem, server, client = pem["ca"], (pem["server"], pem["server_key"]), (pem["client"], pem["client_key"])
    settings = CollectorSettings(
        listen="127.0.0.1:0", tls=ServerTls(*server, client_ca_file=ca_pem), action="drop", threshold=0.5
    )
    with make_hosts(72, 73, ipv6=False) as (h1, h2), CollectorServer(PacketsModel(), [], settings) as srv:
        outside1 = f"{h1.ns_ip.rsplit('.', 1)[0]}.99"
        outside2 = f"{h2.ns_ip.rsplit('.', 1)[0]}.99"
        h1.run(f"ip neigh replace {outside1} lladdr {h1.mac(False)} dev eth0")
        h2.run(f"ip neigh replace {outside2} lladdr {h2.mac(False)} dev eth0")
        fake_api.create("pods", pod("web-0", ip=h1.ns_ip, namespace="shop"))
        fake_api.create("pods", pod("coredns-0", ip=h2.ns_ip, namespace="kube-system"))
        fake_api.create(
            "endpoints",
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": "kubernetes", "namespace": "default"},
                "subsets": [{"addresses": [{"ip": "198.51.100.7"}], "ports": [{"port": 6443}]}],
            },
        )
        fake_api.create("agentconfigs", agentconfig([h1.host_if, h2.host_if], mode="enforce", allow=["203.0.113.0/24"]))
        sup = kube_agent(
            api_client,
            KubeAgentOptions(
                namespace="xdpml",
                node_name="node-a",
                collector=f"127.0.0.1:{srv.port}",
                collector_tls=ClientTls(
                    ca_file=ca_pem, cert_file=client[0], key_file=client[1], server_name="collector.test"
                ),
                pin_dir=os.path.join(bpffs, "k8s"),
            ),
        )
        runner = threading.Thread(target=sup.run, daemon=True)
        runner.start()
        rx = Receiver(h1.host_ip, MARK_PORT)
        try:
            wait_for(
                lambda: sup.agent is not None and sup.enrich.synced() and sup.enforcement.manager.table is not None,
                120,
                "agent attached, cache synced, enforcement attached",
            )
            man = sup.enforcement.manager
            table = man.table
            assert table.mode() == "enforce"
            allow = {str(n) for n in man.allowlist}
            assert {"198.51.100.7/32", "203.0.113.0/24"} <= allow  # API endpoints, operator CIDR

            # the pod in shop floods: a rule, then every following packet dropped
            send(h1, outside1, PORT, 100, sport=4480, tag="F")
            wait_for(lambda: table.rows(), 60, "a rule from the verdict")
            (row,) = table.rows()
            assert (row.src, row.dst, row.src_port, row.action) == (h1.ns_ip, outside1, 4480, "drop")
            before = qdisc_drops(h1.host_if)
            send(h1, outside1, PORT, 40, sport=4480, tag="F")
            send(h1, h1.host_ip, MARK_PORT, 1, sport=4481, tag="M")
            rx.take_until_marker()
            assert qdisc_drops(h1.host_if) - before == 40
            assert table.rows()[0].dropped == 40

            def pod_events():
                return [
                    e
                    for e in fake_api.list("events")
                    if e["metadata"].get("namespace") == "shop"
                    and e["involvedObject"].get("name") == "web-0"
                    and e["reason"] == "XdpmlDropping"
                ]

            wait_for(pod_events, 20, "an Event on the pod")
            status = lambda: (  # noqa: E731
                (fake_api.get("agentconfigs", "xdpml", "main").get("status") or {})
                .get("nodes", {})
                .get("node-a", {})
                .get("enforcement", {})
            )
            wait_for(lambda: status().get("dropped") == 40, 20, "status counts")
            st = status()
            assert (st["mode"], st["rules"], st["installed"]) == ("enforce", 1, 1)

            # the kube-system pod floods the same way: refused by the namespace policy
            send(h2, outside2, PORT, 100, sport=4482, tag="K")
            wait_for(lambda: man.stats.refused["namespace_policy"] >= 1, 60, "namespace_policy refusal")
            assert len(table.rows()) == 1
            assert len(pod_events()) == 1  # one Event per rule, not per packet

            # live: dry-run, tighter limits, another operator CIDR, no restart
            dp = sup.agent.datapath
            fake_api.update(
                "agentconfigs",
                "xdpml",
                "main",
                lambda o: o["spec"]["enforcement"].update(mode="dry-run", maxRules=7, allow=["192.0.2.0/24"]),
            )
            wait_for(lambda: table.mode() == "dry-run", 20, "mode dry-run")
            assert sup.agent.datapath is dp
            assert man.settings.max_rules == 7
            wait_for(lambda: "192.0.2.0/24" in {str(n) for n in man.allowlist}, 10, "new allowlist")
            assert "203.0.113.0/24" not in {str(n) for n in man.allowlist}
            assert "192.0.2.0/24" in table.allowlist()
            wait_for(lambda: status().get("mode") == "dry-run", 20, "status mode dry-run")
        finally:
            sup.stop_event.set()
            runner.join(60)
