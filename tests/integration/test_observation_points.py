"""One record per conversation: a pod-to-pod conversation crossing two veths of the node.

Two namespaces (the pods) are joined through the root namespace (the node) by routing,
as Calico-style CNIs do: pod A's packets enter the node on A's veth and leave on B's.
The agent is attached to both veths. Expected values come from the packets the test
sends: their count and frame sizes, and the TTL each veth must see (64 as the pod sent
it; 63 once the node forwarded it).
"""

import pytest
from harness import flow_between, running_agent
from netns import SLOT, _teardown, make_hosts, route_between, sh, udp_conversation
from netns import TestHost as NsHost  # not a test class

pytestmark = [pytest.mark.root, pytest.mark.slow]
ETH, IP4, UDP = 14, 20, 8
SEND = [10, 200, 1000, 50, 1400, 3, 700, 64]
REPLY = [n // 2 + 1 for n in SEND]


@pytest.fixture(scope="module")
def pods():
    with make_hosts(91, 92, ipv6=False) as (a, b):
        route_between(a, b)
        yield a, b


def converse(a, b, port: int, b_ip: str | None = None) -> None:
    """Pod A sends SEND to pod B (at b_ip in namespace b), which answers each datagram
    with REPLY."""
    udp_conversation(a, b, b_ip or b.ns_ip, port, SEND, REPLY)


FWD = [ETH + IP4 + UDP + n for n in SEND]
REV = [ETH + IP4 + UDP + n for n in REPLY]


def exact_counts(r) -> None:
    assert (r["src2dst_packets"], r["dst2src_packets"]) == (len(SEND), len(REPLY))
    assert (r["src2dst_bytes"], r["dst2src_bytes"]) == (sum(FWD), sum(REV))
    assert (r["src2dst_min_ps"], r["src2dst_max_ps"]) == (min(FWD), max(FWD))


def test_pod_to_pod_across_two_veths_is_one_record(pods):
    a, b = pods
    port = 47001
    with running_agent([a.host_if, b.host_if], idle_timeout_s=1.0) as (_, sink):
        converse(a, b, port)
        sink.wait_rows("flow", flow_between(a.ns_ip, b.ns_ip, 17, port))
    # the agent has stopped: every record left the table; a second row would be here now
    rows = [r for r in sink.rows("flow") if flow_between(a.ns_ip, b.ns_ip, 17, port)(r)]
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_ip"], r["dst_port"]) == (a.ns_ip, b.ns_ip, port)
    exact_counts(r)
    # reported: pod A's veth, where A's packets entered the node (TTL still 64)
    assert r["interface"] == a.host_if and (r["src2dst_ttl"], r["dst2src_ttl"]) == (64, 63)
    assert r["seen_on"] == f"{a.host_if}:ingress {b.host_if}:egress"
    assert r["observation_points"] == 2
    assert r["expiration_id"] == 0  # idle, both records in one scan


def test_per_interface_setting_keeps_one_record_per_veth(pods):
    a, b = pods
    port = 47002
    with running_agent([a.host_if, b.host_if], idle_timeout_s=1.0, record_per="interface") as (_, sink):
        converse(a, b, port)
        sink.wait_rows("flow", flow_between(a.ns_ip, b.ns_ip, 17, port), count=2)
    rows = [r for r in sink.rows("flow") if flow_between(a.ns_ip, b.ns_ip, 17, port)(r)]
    by_if = {r["interface"]: r for r in rows}
    assert len(rows) == 2 and set(by_if) == {a.host_if, b.host_if}, rows
    for r in rows:
        assert (r["src_ip"], r["dst_ip"]) == (a.ns_ip, b.ns_ip)
        exact_counts(r)
        assert r["observation_points"] == 1
    ra, rb = by_if[a.host_if], by_if[b.host_if]
    assert ra["seen_on"] == f"{a.host_if}:ingress" and rb["seen_on"] == f"{b.host_if}:egress"
    assert (ra["src2dst_ttl"], ra["dst2src_ttl"]) == (64, 63)
    assert (rb["src2dst_ttl"], rb["dst2src_ttl"]) == (63, 64)


@pytest.fixture(scope="module")
def overlay():
    """Pod A (a namespace) behind the node's veth; the node routes it into a VXLAN device
    whose underlay is a second veth to a remote node (a namespace) holding pod B's address
    on its own VXLAN device. The node's three interfaces see the conversation: pod A's veth
    and the VXLAN device unencapsulated, the underlay veth encapsulated."""
    vx = f"xdv{SLOT}s98"
    vni = 4200 + SLOT
    net = f"10.{201 + SLOT}.98"
    with make_hosts(96, 97, ipv6=False) as (a, remote):
        try:
            sh(
                f"ip link add {vx} address 02:00:5e:{SLOT:02x}:98:01 type vxlan id {vni} local {remote.host_ip} "
                f"remote {remote.ns_ip} dstport 4789 dev {remote.host_if}"
            )
            sh(f"sysctl -qw net.ipv6.conf.{vx}.disable_ipv6=1")
            sh(f"ip addr add {net}.1/24 dev {vx}")
            sh(f"ip link set {vx} up")
            remote.run("sysctl -qw net.ipv6.conf.default.disable_ipv6=1")
            remote.run(
                f"ip link add vx0 address 02:00:5e:{SLOT:02x}:98:02 type vxlan id {vni} "
                f"local {remote.ns_ip} remote {remote.host_ip} dstport 4789 dev eth0"
            )
            remote.run(f"ip addr add {net}.2/24 dev vx0")
            remote.run("ip link set vx0 up")
            sh(f"ip neigh replace {net}.2 lladdr 02:00:5e:{SLOT:02x}:98:02 dev {vx}")
            remote.run(f"ip neigh replace {net}.1 lladdr 02:00:5e:{SLOT:02x}:98:01 dev vx0")
            for dev in (a.host_if, vx):
                sh(f"sysctl -qw net.ipv4.conf.{dev}.forwarding=1")
            a.run(f"ip route add {net}.0/24 via {a.host_ip}")
            remote.run(f"ip route add {a.ns_ip.rsplit('.', 1)[0]}.0/24 via {net}.1")
            yield a, remote, vx, vni, f"{net}.2"
        finally:
            sh(f"ip link del {vx}", check=False)


VXLAN = ETH + IP4 + UDP + 8  # outer headers: the datapath counts the frame as on the wire


def test_pod_to_pod_across_a_veth_the_vxlan_device_and_the_underlay_is_one_record(overlay):
    a, remote, vx, vni, b_ip = overlay
    port = 47003
    with running_agent([a.host_if, vx, remote.host_if], idle_timeout_s=1.0) as (_, sink):
        converse(a, remote, port, b_ip)
        sink.wait_rows("flow", flow_between(a.ns_ip, b_ip, 17, port))
    rows = [r for r in sink.rows("flow") if flow_between(a.ns_ip, b_ip, 17, port)(r)]
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_ip"], r["dst_port"]) == (a.ns_ip, b_ip, port)
    exact_counts(r)  # pod A's frames as it sent them: its veth reports
    assert r["interface"] == a.host_if and (r["src2dst_ttl"], r["dst2src_ttl"]) == (64, 63)
    assert r["seen_on"] == f"{a.host_if}:ingress {vx}:egress {remote.host_if}:egress"
    assert r["observation_points"] == 3
    # the tunnel it crossed, from the underlay's (encapsulated) observation
    assert (r["tunnel_type"], r["tunnel_id"]) == ("vxlan", vni)
    assert (r["outer_src_ip"], r["outer_dst_ip"]) == (remote.host_ip, remote.ns_ip)


def test_per_interface_across_the_overlay_gives_three_exact_records(overlay):
    a, remote, vx, vni, b_ip = overlay
    port = 47004
    with running_agent([a.host_if, vx, remote.host_if], idle_timeout_s=1.0, record_per="interface") as (_, sink):
        converse(a, remote, port, b_ip)
        sink.wait_rows("flow", flow_between(a.ns_ip, b_ip, 17, port), count=3)
    rows = [r for r in sink.rows("flow") if flow_between(a.ns_ip, b_ip, 17, port)(r)]
    by_if = {r["interface"]: r for r in rows}
    assert len(rows) == 3 and set(by_if) == {a.host_if, vx, remote.host_if}, rows
    for name in (a.host_if, vx):
        exact_counts(by_if[name])
        assert by_if[name]["tunnel_type"] == "none"
    u = by_if[remote.host_if]
    assert (u["src2dst_packets"], u["dst2src_packets"]) == (len(SEND), len(REPLY))
    assert (u["src2dst_bytes"], u["dst2src_bytes"]) == (sum(FWD) + VXLAN * len(FWD), sum(REV) + VXLAN * len(REV))
    assert (u["tunnel_type"], u["tunnel_id"], u["outer_src_ip"]) == ("vxlan", vni, remote.host_ip)
    assert by_if[vx]["seen_on"] == f"{vx}:egress" and u["seen_on"] == f"{remote.host_if}:egress"


@pytest.fixture(scope="module")
def hairpin():
    """Pods A and B behind one veth of the node: both live behind a namespace S (a switch or
    a second node) whose policy routing sends every pod packet up to the node, which routes
    it back out of the same veth (a hairpin). The node's veth sees each packet twice: at TC
    ingress and again at TC egress."""
    with make_hosts(93, ipv6=False) as (s,):
        pods = [NsHost(193), NsHost(194)]
        try:
            s.run(
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 "
                "net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0"
            )
            for p, dev in zip(pods, ("pa", "pb"), strict=True):
                _teardown(p)
                sh(f"ip netns add {p.ns}")
                p.run("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
                s.run(f"ip link add {dev} type veth peer name eth0 netns {p.ns}")
                s.run(f"sysctl -qw net.ipv6.conf.{dev}.disable_ipv6=1 net.ipv4.conf.{dev}.rp_filter=0")
                s.run(f"ip addr add {p.host_ip}/24 dev {dev}")
                s.run(f"ip link set {dev} up")
                p.run(f"ip addr add {p.ns_ip}/24 dev eth0")
                p.run("ip link set eth0 up")
                p.run("ip link set lo up")
                p.run(f"ip route add default via {p.host_ip}")
                s.run(f"ip rule add iif {dev} lookup 100 priority 100")  # up to the node, always
                sh(f"ip route add {p.ns_ip.rsplit('.', 1)[0]}.0/24 via {s.ns_ip} dev {s.host_if}")
            s.run(f"ip route add default via {s.host_ip} dev eth0 table 100")
            sh(f"sysctl -qw net.ipv4.conf.{s.host_if}.forwarding=1")
            yield s, pods[0], pods[1]
        finally:
            for p in pods:
                _teardown(p)


def test_hairpin_is_ingress_plus_egress_on_one_veth_counted_once(hairpin):
    s, a, b = hairpin
    port = 47005
    with running_agent([s.host_if], idle_timeout_s=1.0) as (agent, sink):
        converse(a, b, port)
        sink.wait_rows("flow", flow_between(a.ns_ip, b.ns_ip, 17, port))
        kernel = agent.datapath.counters()
    rows = [r for r in sink.rows("flow") if flow_between(a.ns_ip, b.ns_ip, 17, port)(r)]
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_ip"], r["dst_port"]) == (a.ns_ip, b.ns_ip, port)
    exact_counts(r)  # once per packet, though the veth's hooks saw each one twice
    assert r["interface"] == s.host_if and r["observation_points"] == 1
    assert r["seen_on"] == f"{s.host_if}:ingress+egress"
    # the first sighting is ingress: after S forwarded it (64 - 1), before the node did
    assert (r["src2dst_ttl"], r["dst2src_ttl"]) == (63, 63)
    assert kernel["hairpin"] == len(SEND) + len(REPLY)
