"""Parser behaviour through BPF_PROG_TEST_RUN on the real compiled XDP program.

Every packet must return XDP_PASS (fail open); malformed packets move exactly the
expected counter and create no flow; well-formed ones land in the right flow."""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from xdpml.config import AgentSettings
from xdpml.datapath.loader import XDP_PROG, Datapath
from xdpml.datapath.maps import FlowMap
from xdpml.datapath.testrun import test_run as prog_test_run
from xdpml.wire.columns import ip_to_str

pytestmark = pytest.mark.root
XDP_PASS = 2
ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


@pytest.fixture(scope="module")
def dp():
    with Datapath(AgentSettings()) as d:
        yield d


@pytest.fixture()
def run(dp):
    table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    table.drain()

    def go(pkt) -> tuple[dict, list]:
        before = dp.counters()
        rc, _ = prog_test_run(dp.progs[XDP_PROG].fd, bytes(pkt))
        assert rc == XDP_PASS
        after = dp.counters()
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        keys, values = table.drain()
        return delta, list(zip(keys, values))

    return go


def tcp4(**kw):
    return Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2", **kw) / TCP(sport=1234, dport=80, flags="S")


def test_tcp_ipv4_makes_one_flow(run):
    delta, flows = run(tcp4())
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    ((k, v),) = flows
    assert (k["proto"], k["ip_version"], k["vlan_id"]) == (6, 4, 0)
    assert {ip_to_str(bytes(k["lo_ip"])), ip_to_str(bytes(k["hi_ip"]))} == {"10.0.0.1", "10.0.0.2"}
    assert sorted([k["lo_port"], k["hi_port"]]) == [80, 1234]
    d = v["dir"][0]
    assert d["packets"] == 1 and d["bytes"] == len(tcp4()) and d["flag_count"][1] == 1  # SYN


@pytest.mark.parametrize("cut", range(14, len(tcp4())))
def test_truncated_ipv4_tcp_at_every_offset(run, cut):
    delta, flows = run(bytes(tcp4())[:cut])
    if cut < 34:
        assert delta == {"pkt_xdp": 1, "err_trunc_ip": 1} and flows == []
    else:  # the L4 header is cut: a port-less TCP flow (tests/bpf/test_l4_bounds.py)
        assert delta == {"pkt_xdp": 1, "err_trunc_l4": 1, "flow_new": 1}
        ((k, _),) = flows
        assert (k["proto"], k["lo_port"], k["hi_port"]) == (6, 0, 0)


@pytest.mark.parametrize("cut", range(14, len(Ether(**ETH) / IPv6(src="fd00::1", dst="fd00::2") / UDP())))
def test_truncated_ipv6_udp_at_every_offset(run, cut):
    pkt = bytes(Ether(**ETH) / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5, dport=6))
    delta, flows = run(pkt[:cut])
    if cut < 54:
        assert delta == {"pkt_xdp": 1, "err_trunc_ip": 1} and flows == []
    else:
        assert delta == {"pkt_xdp": 1, "err_trunc_l4": 1, "flow_new": 1}
        ((k, _),) = flows
        assert (k["proto"], k["lo_port"], k["hi_port"]) == (17, 0, 0)


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ihl_below_five(run, ihl):
    delta, flows = run(tcp4(ihl=ihl))
    assert delta == {"pkt_xdp": 1, "err_bad_ihl": 1} and flows == []


def test_ihl_beyond_packet(run):
    pkt = bytearray(bytes(Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2", proto=253)))
    pkt[14] = 0x4F  # IHL 15 = 60 bytes, packet has only 20
    delta, flows = run(bytes(pkt))
    assert delta == {"pkt_xdp": 1, "err_bad_ihl": 1} and flows == []


def test_total_length_below_header(run):
    delta, flows = run(tcp4(len=12))
    assert delta == {"pkt_xdp": 1, "err_bad_ip_len": 1} and flows == []


def test_ipv4_options_are_skipped(run):
    delta, flows = run(
        Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01" * 8) / UDP(sport=53, dport=5353)
    )
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    ((k, _),) = flows
    assert sorted([k["lo_port"], k["hi_port"]]) == [53, 5353]


def test_qinq_keeps_outer_vlan(run):
    pkt = Ether(**ETH) / Dot1AD(vlan=300) / Dot1Q(vlan=42) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)
    delta, flows = run(pkt)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    ((k, v),) = flows
    assert k["vlan_id"] == 300 and v["dir"][0]["bytes"] == len(pkt)


def test_single_vlan(run):
    delta, flows = run(Ether(**ETH) / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    ((k, _),) = flows
    assert k["vlan_id"] == 7


def test_three_vlan_tags_not_followed(run):
    pkt = Ether(**ETH) / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / IP() / UDP()
    delta, flows = run(pkt)
    assert delta == {"pkt_xdp": 1, "err_trunc_vlan": 1} and flows == []


def test_vlan_tag_cut_short(run):
    delta, flows = run(bytes(Ether(**ETH, type=0x8100))[:14] + b"\x00\x07")
    assert delta == {"pkt_xdp": 1, "err_trunc_vlan": 1} and flows == []


def test_first_fragment_has_ports_nonfirst_is_portless(run):
    delta, flows = run(
        Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", frag=0) / UDP(sport=9, dport=10) / (b"x" * 32)
    )
    assert delta == {"pkt_xdp": 1, "flow_new": 1} and len(flows) == 1
    delta, flows = run(Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2", proto=17, frag=5) / (b"x" * 32))
    assert delta == {"pkt_xdp": 1, "frag_nonfirst": 1, "flow_new": 1}
    ((k, _),) = flows
    assert (k["proto"], k["lo_port"], k["hi_port"]) == (17, 0, 0)


def test_ipv6_extension_chain(run):
    pkt = (
        Ether(**ETH)
        / IPv6(src="fd00::1", dst="fd00::2")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(offset=0, m=1)
        / TCP(sport=443, dport=50000, flags="A")
    )
    delta, flows = run(pkt)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    ((k, v),) = flows
    assert (k["proto"], k["ip_version"]) == (6, 6)
    assert sorted([k["lo_port"], k["hi_port"]]) == [443, 50000]
    assert v["dir"][0]["flag_count"][4] == 1  # ACK


def test_ipv6_chain_too_long(run):
    pkt = Ether(**ETH) / IPv6(src="fd00::1", dst="fd00::2")
    for _ in range(9):
        pkt = pkt / IPv6ExtHdrDestOpt()
    delta, flows = run(pkt / UDP())
    assert delta == {"pkt_xdp": 1, "err_ipv6_ext": 1} and flows == []


def test_ipv6_nonfirst_fragment(run):
    pkt = Ether(**ETH) / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(offset=10, nh=17) / (b"y" * 16)
    delta, flows = run(pkt)
    assert delta == {"pkt_xdp": 1, "frag_nonfirst": 1, "flow_new": 1}
    ((k, _),) = flows
    assert (k["proto"], k["ip_version"], k["lo_port"], k["hi_port"]) == (17, 6, 0, 0)


def test_non_ip_is_other(run):
    delta, flows = run(Ether(**ETH) / ARP())
    assert delta == {"pkt_xdp": 1, "other_l3": 1} and flows == []


def test_other_l4_is_a_portless_flow(run):
    # (GRE, protocol 47, is decapsulated: tests/bpf/test_tunnels.py)
    delta, flows = run(Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2", proto=132) / (b"s" * 12))
    ((k, _),) = flows
    assert (k["proto"], k["lo_port"], k["hi_port"]) == (132, 0, 0)


def test_icmp_and_icmpv6(run):
    _, flows = run(Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP())
    assert flows[0][0]["proto"] == 1
    _, flows = run(Ether(**ETH) / IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest())
    assert flows[0][0]["proto"] == 58
    delta, flows = run(bytes(Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP())[:38])
    assert delta == {"pkt_xdp": 1, "err_trunc_l4": 1, "flow_new": 1} and flows[0][0]["proto"] == 1


def test_both_directions_share_a_flow(run, dp):
    fd = dp.progs[XDP_PROG].fd
    table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    a = Ether(**ETH) / IP(src="10.0.0.9", dst="10.0.0.1") / UDP(sport=4000, dport=53) / (b"q" * 10)
    b = Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.9") / UDP(sport=53, dport=4000) / (b"r" * 50)
    for p in (a, b, b):
        prog_test_run(fd, bytes(p))
    keys, values = table.drain()
    assert len(keys) == 1
    v = values[0]
    assert (v["dir"][0]["packets"], v["dir"][1]["packets"]) == (1, 2)
    assert (v["dir"][0]["bytes"], v["dir"][1]["bytes"]) == (len(a), 2 * len(b))
    assert list(v["seq"]["dir"][:3]) == [0, 1, 1] and v["n_seq"] == 3


def test_lockless_build_counts_the_same():
    """-DXDPML_FLOW_LOCK=0 compiles, loads and accounts single-CPU traffic identically."""
    from xdpml.config import DatapathSettings

    with Datapath(AgentSettings(datapath=DatapathSettings(flow_lock=False))) as d:
        table = FlowMap(d.flow_map_fd(), key_dtype=d.types.key_dtype, value_dtype=d.types.value_dtype)
        a = Ether(**ETH) / IP(src="10.0.0.9", dst="10.0.0.1") / UDP(sport=4000, dport=53) / (b"q" * 10)
        b = Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.9") / UDP(sport=53, dport=4000) / (b"r" * 50)
        for p in (a, b, b):
            assert prog_test_run(d.progs[XDP_PROG].fd, bytes(p))[0] == XDP_PASS
        keys, values = table.drain()
        assert len(keys) == 1
        v = values[0]
        assert (v["dir"][0]["packets"], v["dir"][1]["packets"]) == (1, 2)
        assert (v["dir"][0]["bytes"], v["dir"][1]["bytes"]) == (len(a), 2 * len(b))
