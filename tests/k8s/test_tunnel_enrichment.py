"""Pod enrichment on inner addresses: pod-to-pod traffic between two nodes crosses the
agent's node encapsulated (VXLAN, Geneve), and the exported flows name both pods.

Two namespaces are the nodes (node-a, node-b), their eth0 the node NICs, joined through
the root namespace by routing: the agent is attached to the root-side veth of each,
which carry only encapsulated traffic. The fake API server holds pods on both nodes.

- VXLAN: the kernel's own vxlan device in each node namespace (VNI 4242 + slot) holds
  that node's pod address, so the kernel makes the encapsulated packets.
- Geneve: this kernel is built without CONFIG_GENEVE, so a user-space tunnel endpoint in
  each node namespace sends and answers Geneve packets (with one 8-byte option) through
  an ordinary UDP socket on port 6081: the outer IPv4/UDP packets are the kernel's, the
  Geneve header and the inner Ethernet frame are built here (scapy) and parsed back by
  the other end before it answers.

Expected values are the test's own: the pods it created, the packets it sent and their
frame sizes, the tunnel ids and the node addresses it configured.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
from netns import SLOT, make_hosts, route_between, udp_conversation
from xdpml.agent.kubernetes import KubeAgentOptions

from .conftest import agentconfig_object, kube_agent, pod, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(240)]
ETH, IP4, UDP = 14, 20, 8
SEND = [10, 300, 1200, 64, 5]
REPLY = [n // 2 + 7 for n in SEND]
NET = f"10.{201 + SLOT}"
VNI, GENEVE_VNI = 4242 + SLOT, 4343 + SLOT
VXLAN_HDR = ETH + IP4 + UDP + 8  # outer frame headers around the inner Ethernet frame
GENEVE_HDR = ETH + IP4 + UDP + 8 + 8  # ... Geneve's 8 bytes and its one 8-byte option


@pytest.fixture(scope="module")
def nodes():
    with make_hosts(93, 94, ipv6=False) as (na, nb):
        route_between(na, nb)
        for i, (h, other) in enumerate(((na, nb), (nb, na)), start=1):
            h.run("sysctl -qw net.ipv6.conf.default.disable_ipv6=1")  # a silent overlay: no ND, no MLD
            h.run(
                f"ip link add vx0 address 02:00:5e:{SLOT:02x}:95:0{i} type vxlan id {VNI} "
                f"local {h.ns_ip} remote {other.ns_ip} dstport 4789 dev eth0"
            )
            h.run(f"ip addr add {NET}.95.{i}/24 dev vx0")
            h.run("ip link set vx0 up")
        na.run(f"ip neigh replace {NET}.95.2 lladdr 02:00:5e:{SLOT:02x}:95:02 dev vx0")
        nb.run(f"ip neigh replace {NET}.95.1 lladdr 02:00:5e:{SLOT:02x}:95:01 dev vx0")
        yield na, nb


def vxlan_conversation(na, nb, port: int) -> None:
    """Pod A (node-a's vx0 address) sends SEND to pod B (node-b's), which answers REPLY."""
    udp_conversation(na, nb, f"{NET}.95.2", port, SEND, REPLY, src=f"{NET}.95.1")


# A user-space Geneve endpoint: "serve" answers each inner UDP datagram with the next
# REPLY size, "talk" sends the SEND sizes and waits for each answer.
GENEVE_ENDPOINT = textwrap.dedent(
    """
    import socket, struct, sys
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    role, me, peer, vni, src, dst, sport, dport, sizes = sys.argv[1:10]
    vni, sport, dport = int(vni), int(sport), int(dport)
    sizes = [int(x) for x in sizes.split(",")]
    OPTION = struct.pack("!HBB", 0x0102, 0x80, 1) + b"opt!"  # class, type, length 1 word, data
    HEADER = struct.pack("!BBH", len(OPTION) // 4, 0, 0x6558) + struct.pack("!I", vni << 8)

    def frame(s, d, sp, dp, n):
        inner = Ether(src="02:00:5e:00:96:01", dst="02:00:5e:00:96:02") / IP(src=s, dst=d, ttl=64)
        return bytes(inner / UDP(sport=sp, dport=dp) / (b"g" * n))

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((me, 6081))
    sock.settimeout(20)
    if role == "serve":
        print("ready", flush=True)
        for n in sizes:
            data, _ = sock.recvfrom(65535)
            assert data[:8] == HEADER and data[8:16] == OPTION, data[:16]
            pkt = Ether(data[16:])
            sock.sendto(HEADER + OPTION + frame(pkt[IP].dst, pkt[IP].src, pkt[UDP].dport, pkt[UDP].sport, n),
                        (peer, 6081))
    else:
        for n in sizes:
            sock.sendto(HEADER + OPTION + frame(src, dst, sport, dport, n), (peer, 6081))
            data, _ = sock.recvfrom(65535)
            assert data[:8] == HEADER, data[:8]
    """
)


def geneve_conversation(na, nb, tmp_path, port: int) -> tuple[str, str]:
    script = tmp_path / "geneve_endpoint.py"
    script.write_text(GENEVE_ENDPOINT)
    pod_a, pod_b = f"{NET}.96.1", f"{NET}.96.2"
    common = [str(GENEVE_VNI), pod_b, pod_a, str(port), "40001"]
    server = nb.popen(
        [sys.executable, str(script), "serve", nb.ns_ip, na.ns_ip, *common, ",".join(map(str, REPLY))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        client = na.popen(
            [
                sys.executable,
                str(script),
                "talk",
                na.ns_ip,
                nb.ns_ip,
                str(GENEVE_VNI),
                pod_a,
                pod_b,
                "40001",
                str(port),
                ",".join(map(str, SEND)),
            ]
        )
        assert client.wait(30) == 0
        assert server.wait(30) == 0
    finally:
        for p in (server,):
            if p.poll() is None:
                p.kill()
                p.wait()
    return pod_a, pod_b


def test_pods_on_two_nodes_are_named_from_the_inner_addresses(fake_api, api_client, nodes, tmp_path):
    from harness import MemorySink, flow_between

    na, nb = nodes
    pods = {
        f"{NET}.95.1": ("web-0", "shop", "node-a", na.ns_ip),
        f"{NET}.95.2": ("db-0", "data", "node-b", nb.ns_ip),
        f"{NET}.96.1": ("api-0", "shop", "node-a", na.ns_ip),
        f"{NET}.96.2": ("cache-0", "data", "node-b", nb.ns_ip),
    }
    for ip, (name, ns, node, host_ip) in pods.items():
        fake_api.create(
            "pods", pod(name, ip=ip, namespace=ns, node=node, host_ip=host_ip, owner=("StatefulSet", name[:-2]))
        )
    fake_api.create(
        "agentconfigs",
        agentconfig_object(
            {
                "interfaces": [{"names": [na.host_if, nb.host_if]}],
                "timeouts": {"idleSeconds": 1, "scanIntervalSeconds": 0.2},
                "enrichment": {"clusterWide": True},
            }
        ),
    )
    sink = MemorySink()
    sup = kube_agent(api_client, KubeAgentOptions(namespace="xdpml", node_name="node-a", extra_sinks=[sink]))
    runner = threading.Thread(target=sup.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: sup.agent is not None and sup.enrich.synced(), 90, "agent attached, cache synced")
        vxlan_conversation(na, nb, 7101)
        pod_a, pod_b = geneve_conversation(na, nb, tmp_path, 7102)
        vx = flow_between(f"{NET}.95.1", f"{NET}.95.2", 17, 7101)
        gn = flow_between(pod_a, pod_b, 17, 7102)
        sink.wait_rows("flow", vx)
        sink.wait_rows("flow", gn)
    finally:
        sup.stop_event.set()
        runner.join(60)
    assert not runner.is_alive()
    fwd_inner = [ETH + IP4 + UDP + n for n in SEND]
    rev_inner = [ETH + IP4 + UDP + n for n in REPLY]
    for pred, kind, vni, hdr, (src, dst) in (
        (vx, "vxlan", VNI, VXLAN_HDR, (f"{NET}.95.1", f"{NET}.95.2")),
        (gn, "geneve", GENEVE_VNI, GENEVE_HDR, (pod_a, pod_b)),
    ):
        rows = [r for r in sink.rows("flow") if pred(r)]
        assert len(rows) == 1, (kind, rows)  # one conversation, seen on both veths
        r = rows[0]
        assert (r["src_ip"], r["dst_ip"]) == (src, dst), kind
        s_name, s_ns, s_node, _ = pods[src]
        d_name, d_ns, d_node, _ = pods[dst]
        assert (r["src_pod"], r["src_namespace"], r["src_node"]) == (s_name, s_ns, s_node), kind
        assert (r["dst_pod"], r["dst_namespace"], r["dst_node"]) == (d_name, d_ns, d_node), kind
        assert (r["src_workload_kind"], r["dst_workload_kind"]) == ("StatefulSet", "StatefulSet")
        assert (r["tunnel_type"], r["tunnel_id"]) == (kind, vni)
        assert (r["outer_src_ip"], r["outer_dst_ip"]) == (na.ns_ip, nb.ns_ip), kind
        assert r["seen_on"] == f"{na.host_if}:ingress {nb.host_if}:egress", kind
        assert (r["src2dst_packets"], r["dst2src_packets"]) == (len(SEND), len(REPLY)), kind
        assert r["src2dst_bytes"] == sum(fwd_inner) + hdr * len(SEND), kind
        assert r["dst2src_bytes"] == sum(rev_inner) + hdr * len(REPLY), kind
