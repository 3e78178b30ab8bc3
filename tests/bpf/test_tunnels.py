"""Tunnel decapsulation (bpf/tunnel.h) through BPF_PROG_TEST_RUN on the real programs.

Packets are built with scapy; the expected flow (inner 5-tuple, tunnel type and id,
outer addresses, frame bytes) and the expected counters are written from the packet
as built, never from the datapath. Every packet passes (XDP_PASS / TC_ACT_UNSPEC)."""

import json

import pytest
from scapy.contrib.gtp import GTP_U_Header, GTPPDUSessionContainer
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import HBHOptUnknown, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import ARP, GRE, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from xdpml.agent.events import RecordBuffer
from xdpml.agent.features import WindowAccumulator, expand_segments, packet_columns

from xdpml.config import AgentSettings, DatapathSettings, TunnelSettings, WindowSettings
from xdpml.datapath.abi import TUNNEL_TYPES, PktEvent, WinEvent
from xdpml.datapath.loader import TC_INGRESS_PROG, XDP_PROG, Datapath
from xdpml.datapath.maps import FlowMap
from xdpml.datapath.testrun import test_run as prog_test_run
from xdpml.wire.columns import ip_to_str

pytestmark = pytest.mark.root
XDP_PASS = 2
TC_ACT_UNSPEC = 0xFFFFFFFF
ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
IETH = dict(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
O4 = dict(src="192.0.2.1", dst="192.0.2.2")  # outer (node) addresses
O6 = dict(src="2001:db8::1", dst="2001:db8::2")
I4 = dict(src="10.1.0.5", dst="10.2.0.7")  # inner (pod) addresses
I6 = dict(src="fd00:1::5", dst="fd00:2::7")


def settings(**tunnels) -> AgentSettings:
    s = AgentSettings()
    s.enforce.pin_dir = ""  # private maps: never another checkout's pins
    s.tunnels = TunnelSettings(**tunnels)
    return s


@pytest.fixture(scope="module")
def dp():
    with Datapath(settings()) as d:
        yield d


def make_run(d):
    table = FlowMap(d.flow_map_fd(), key_dtype=d.types.key_dtype, value_dtype=d.types.value_dtype)
    table.drain()

    def go(pkt, prog=XDP_PROG):
        before = d.counters()
        rc, _ = prog_test_run(d.progs[prog].fd, bytes(pkt))
        assert rc == (XDP_PASS if prog == XDP_PROG else TC_ACT_UNSPEC)
        after = d.counters()
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        keys, values = table.drain()
        return delta, list(zip(keys, values))

    return go


@pytest.fixture()
def run(dp):
    return make_run(dp)


def GENEVE(*, vni, proto=0x6558, options=b"", optionlen=None, version=0):  # noqa: N802 (a layer, as scapy's)
    """A Geneve header (RFC 8926) built by hand: the layout is the test's, not scapy's."""
    optlen = len(options) // 4 if optionlen is None else optionlen
    return Raw(bytes([version << 6 | optlen, 0]) + proto.to_bytes(2, "big") + vni.to_bytes(3, "big") + b"\0" + options)


def inner_udp4(sport=5000, dport=53, payload=b"q" * 20):
    return IP(**I4) / UDP(sport=sport, dport=dport) / payload


def vxlan4(inner=None, vni=4242, port=4789, flags=0x08):
    return (
        Ether(**ETH)
        / IP(**O4)
        / UDP(sport=49152, dport=port)
        / VXLAN(vni=vni, flags=flags)
        / Ether(**IETH)
        / (inner if inner is not None else inner_udp4())
    )


def one_flow(flows):
    assert len(flows) == 1, flows
    return flows[0]


def check_flow(k, v, *, inner, proto, ports, ttype, tid, outer, nbytes, ip_version=4):
    assert {ip_to_str(bytes(k["lo_ip"])), ip_to_str(bytes(k["hi_ip"]))} == set(inner)
    assert (int(k["proto"]), int(k["ip_version"])) == (proto, ip_version)
    assert sorted([int(k["lo_port"]), int(k["hi_port"])]) == sorted(ports)
    assert TUNNEL_TYPES[v["tunnel_type"]] == ttype
    assert int(v["tunnel_id"]) == tid
    if outer is None:
        assert bytes(v["outer_src_ip"]) == bytes(16) and bytes(v["outer_dst_ip"]) == bytes(16)
    else:
        assert (ip_to_str(bytes(v["outer_src_ip"])), ip_to_str(bytes(v["outer_dst_ip"]))) == outer
    d = v["dir"][0]
    # sizes are the frame on the wire: the outer frame, every header included
    assert (int(d["packets"]), int(d["bytes"])) == (1, nbytes)


DECAP = {"pkt_xdp": 1, "flow_new": 1, "tun_decap": 1}
OUTER4 = (O4["src"], O4["dst"])
OUTER6 = (O6["src"], O6["dst"])


# ---- one packet of every kind ---------------------------------------------------


def kinds():
    udp4 = inner_udp4()
    udp6 = IPv6(**I6) / UDP(sport=5000, dport=53) / (b"q" * 20)
    gre_k = GRE(key_present=1, key=0xABCD1234, seqnum_present=1, sequence_number=7, chksum_present=1)
    return {
        "vxlan 4789": (vxlan4(vni=4242), "vxlan", 4242, OUTER4, 4),
        "vxlan 8472": (vxlan4(vni=77, port=8472), "vxlan", 77, OUTER4, 4),
        "vxlan over ipv6": (
            Ether(**ETH) / IPv6(**O6) / UDP(sport=40000, dport=4789) / VXLAN(vni=9) / Ether(**IETH) / udp6,
            "vxlan",
            9,
            OUTER6,
            6,
        ),
        "vxlan inner vlan": (
            Ether(**ETH) / IP(**O4) / UDP(sport=1, dport=4789) / VXLAN(vni=3) / Ether(**IETH) / Dot1Q(vlan=5) / udp4,
            "vxlan",
            3,
            OUTER4,
            4,
        ),
        "geneve": (
            Ether(**ETH)
            / IP(**O4)
            / UDP(sport=2, dport=6081)
            / GENEVE(vni=0x123456, proto=0x6558)
            / Ether(**IETH)
            / udp4,
            "geneve",
            0x123456,
            OUTER4,
            4,
        ),
        "geneve options ipv4 payload": (
            Ether(**ETH)
            / IP(**O4)
            / UDP(sport=2, dport=6081)
            / GENEVE(vni=8, proto=0x0800, options=b"\x01\x02\x03\x02" + b"abcdefgh")
            / udp4,
            "geneve",
            8,
            OUTER4,
            4,
        ),
        "ipip": (Ether(**ETH) / IP(**O4) / udp4, "ipip", 0, OUTER4, 4),
        "6in4 (sit)": (Ether(**ETH) / IP(**O4) / udp6, "6in4", 0, OUTER4, 6),
        "4in6": (Ether(**ETH) / IPv6(**O6) / udp4, "4in6", 0, OUTER6, 4),
        "6in6 (ip6tnl)": (Ether(**ETH) / IPv6(**O6) / udp6, "6in6", 0, OUTER6, 6),
        # ip6tnl's default: a destination options header with the encapsulation limit
        "6in6 encap limit option": (
            Ether(**ETH) / IPv6(**O6) / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=4, optdata=b"\x04")]) / udp6,
            "6in6",
            0,
            OUTER6,
            6,
        ),
        "gre": (Ether(**ETH) / IP(**O4) / GRE(proto=0x0800) / udp4, "gre", 0, OUTER4, 4),
        "gre key seq csum": (Ether(**ETH) / IP(**O4) / gre_k / udp4, "gre", 0xABCD1234, OUTER4, 4),
        "gre ipv6 payload": (Ether(**ETH) / IP(**O4) / GRE(proto=0x86DD) / udp6, "gre", 0, OUTER4, 6),
        "ip6gre": (Ether(**ETH) / IPv6(**O6) / GRE(proto=0x0800) / udp4, "gre", 0, OUTER6, 4),
        "gretap": (
            Ether(**ETH) / IP(**O4) / GRE(proto=0x6558, key_present=1, key=5) / Ether(**IETH) / udp4,
            "gretap",
            5,
            OUTER4,
            4,
        ),
        "gtpu": (
            Ether(**ETH) / IP(**O4) / UDP(sport=2152, dport=2152) / GTP_U_Header(teid=0xDEADBEEF) / udp4,
            "gtpu",
            0xDEADBEEF,
            OUTER4,
            4,
        ),
        "gtpu seq + pdu session container": (
            Ether(**ETH)
            / IP(**O4)
            / UDP(sport=2152, dport=2152)
            / GTP_U_Header(teid=17, S=1, E=1, seq=99, next_ex=0x85)
            / GTPPDUSessionContainer(type=0, QFI=9)
            / udp6,
            "gtpu",
            17,
            OUTER4,
            6,
        ),
    }


@pytest.mark.parametrize("name", list(kinds()))
def test_every_kind_is_decapsulated(run, name):
    pkt, ttype, tid, outer, iv = kinds()[name]
    delta, flows = run(pkt)
    assert delta == DECAP
    k, v = one_flow(flows)
    inner = (I4["src"], I4["dst"]) if iv == 4 else (I6["src"], I6["dst"])
    check_flow(
        k, v, inner=inner, proto=17, ports=(5000, 53), ttype=ttype, tid=tid, outer=outer, nbytes=len(pkt), ip_version=iv
    )
    # the key carries the VNI for VXLAN/Geneve only
    assert int(k["vni"]) == (tid if ttype in ("vxlan", "geneve") else 0)
    assert int(k["vlan_id"]) == 0  # an inner VLAN tag is not the flow's VLAN


def test_tc_hook_decapsulates_too(run):
    pkt = vxlan4(inner=IP(**I4) / TCP(sport=40000, dport=443, flags="S"))
    delta, flows = run(pkt, prog=TC_INGRESS_PROG)
    assert delta == {"pkt_tc_ingress": 1, "flow_new": 1, "tun_decap": 1}
    k, v = one_flow(flows)
    check_flow(
        k,
        v,
        inner=(I4["src"], I4["dst"]),
        proto=6,
        ports=(40000, 443),
        ttype="vxlan",
        tid=4242,
        outer=OUTER4,
        nbytes=len(pkt),
    )
    assert v["dir"][0]["flag_count"][1] == 1  # the inner TCP SYN


def test_both_directions_share_the_inner_flow(dp):
    fwd = vxlan4(inner=IP(**I4) / TCP(sport=40000, dport=443, flags="S"))
    rev = (
        Ether(**ETH)
        / IP(src=O4["dst"], dst=O4["src"])
        / UDP(sport=51000, dport=4789)
        / VXLAN(vni=4242)
        / Ether(**IETH)
        / IP(src=I4["dst"], dst=I4["src"])
        / TCP(sport=443, dport=40000, flags="SA")
        / (b"r" * 30)
    )
    table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    table.drain()
    for pkt in (fwd, rev, rev):
        rc, _ = prog_test_run(dp.progs[XDP_PROG].fd, bytes(pkt))
        assert rc == XDP_PASS
    keys, values = table.drain()
    assert len(keys) == 1
    v = values[0]
    assert (int(v["dir"][0]["packets"]), int(v["dir"][0]["bytes"])) == (1, len(fwd))
    assert (int(v["dir"][1]["packets"]), int(v["dir"][1]["bytes"])) == (2, 2 * len(rev))
    # the outer addresses are the first packet's
    assert (ip_to_str(bytes(v["outer_src_ip"])), ip_to_str(bytes(v["outer_dst_ip"]))) == OUTER4


def test_the_vni_is_in_the_key(run):
    for vni in (100, 200):  # the table is drained after each packet
        delta, flows = run(vxlan4(vni=vni))
        assert delta == DECAP
        k, v = one_flow(flows)
        assert (int(k["vni"]), int(v["tunnel_id"])) == (vni, vni)


def test_two_vnis_in_one_table_stay_apart(dp):
    table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    table.drain()
    for vni in (100, 200, 100):
        prog_test_run(dp.progs[XDP_PROG].fd, bytes(vxlan4(vni=vni)))
    keys, values = table.drain()
    got = sorted((int(k["vni"]), int(v["dir"][0]["packets"])) for k, v in zip(keys, values))
    assert got == [(100, 2), (200, 1)]


# ---- encrypted tunnels: outer flows, labelled ----------------------------------------


def test_wireguard_is_an_outer_flow_labelled_wireguard(run):
    pkt = Ether(**ETH) / IP(**O4) / UDP(sport=51820, dport=40001) / (b"\x04\x00\x00\x00" + b"w" * 60)
    delta, flows = run(pkt)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    k, v = one_flow(flows)
    check_flow(
        k, v, inner=OUTER4, proto=17, ports=(51820, 40001), ttype="wireguard", tid=0, outer=None, nbytes=len(pkt)
    )


def test_esp_is_an_outer_flow_labelled_esp_with_its_spi(run):
    pkt = Ether(**ETH) / IP(**O4) / ESP(spi=0x1234, seq=1, data=b"e" * 40)
    delta, flows = run(pkt)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    k, v = one_flow(flows)
    check_flow(k, v, inner=OUTER4, proto=50, ports=(0, 0), ttype="esp", tid=0x1234, outer=None, nbytes=len(pkt))


def test_esp_in_udp_nat_traversal(run):
    pkt = Ether(**ETH) / IP(**O4) / UDP(sport=4500, dport=4500) / ESP(spi=0x99, seq=1, data=b"e" * 24)
    delta, flows = run(pkt)
    k, v = one_flow(flows)
    assert (TUNNEL_TYPES[v["tunnel_type"]], int(v["tunnel_id"])) == ("esp", 0x99)
    # a zero first word is IKE on the NAT-T port, not ESP
    ike = Ether(**ETH) / IP(**O4) / UDP(sport=4500, dport=4500) / (b"\x00" * 4 + b"i" * 28)
    _, flows = run(ike)
    _, v = one_flow(flows)
    assert TUNNEL_TYPES[v["tunnel_type"]] == "none"


def test_plain_udp_and_gtp_signalling_are_not_tunnels(run):
    for pkt in (
        Ether(**ETH) / IP(**O4) / UDP(sport=1, dport=53) / (b"d" * 20),
        Ether(**ETH) / IP(**O4) / UDP(sport=2152, dport=2152) / GTP_U_Header(gtp_type=1, teid=0) / (b"\x00" * 4),
    ):
        delta, flows = run(pkt)
        assert delta == {"pkt_xdp": 1, "flow_new": 1}
        k, v = one_flow(flows)
        assert (int(k["proto"]), TUNNEL_TYPES[v["tunnel_type"]]) == (17, "none")


# ---- malformed tunnels: the outer flow, counted by reason ----------------------------


def assert_outer(flows, pkt, proto, ports):
    k, v = one_flow(flows)
    check_flow(k, v, inner=OUTER4, proto=proto, ports=ports, ttype="none", tid=0, outer=None, nbytes=len(pkt))


MALFORMED = {
    "vxlan without I flag": (vxlan4(flags=0x00), "tun_bad_vxlan", 17, (49152, 4789)),
    "geneve version 1": (
        Ether(**ETH) / IP(**O4) / UDP(sport=2, dport=6081) / GENEVE(version=1, vni=1) / Ether(**IETH) / inner_udp4(),
        "tun_bad_geneve",
        17,
        (2, 6081),
    ),
    "geneve options past the packet": (
        Ether(**ETH) / IP(**O4) / UDP(sport=2, dport=6081) / GENEVE(vni=1, optionlen=63) / (b"o" * 16),
        "tun_bad_geneve",
        17,
        (2, 6081),
    ),
    "geneve unknown payload": (
        Ether(**ETH) / IP(**O4) / UDP(sport=2, dport=6081) / GENEVE(vni=1, proto=0x8847) / (b"m" * 40),
        "tun_unknown_proto",
        17,
        (2, 6081),
    ),
    "gre version 1 (pptp)": (
        Ether(**ETH) / IP(**O4) / GRE(version=1, proto=0x880B) / (b"p" * 40),
        "tun_bad_gre",
        47,
        (0, 0),
    ),
    "gre routing flag": (
        Ether(**ETH) / IP(**O4) / GRE(routing_present=1, proto=0x0800) / inner_udp4(),
        "tun_bad_gre",
        47,
        (0, 0),
    ),
    "gre recursion control": (
        Ether(**ETH) / IP(**O4) / GRE(recursion_control=1, proto=0x0800) / inner_udp4(),
        "tun_bad_gre",
        47,
        (0, 0),
    ),
    "gre erspan payload": (
        Ether(**ETH) / IP(**O4) / GRE(proto=0x88BE) / (b"e" * 40),
        "tun_unknown_proto",
        47,
        (0, 0),
    ),
    "gtpu version 2": (
        Ether(**ETH) / IP(**O4) / UDP(sport=2152, dport=2152) / GTP_U_Header(version=2, teid=1) / inner_udp4(),
        "tun_bad_gtpu",
        17,
        (2152, 2152),
    ),
    "gtpu extension length 0": (
        Ether(**ETH)
        / IP(**O4)
        / UDP(sport=2152, dport=2152)
        / GTP_U_Header(teid=1, E=1, next_ex=0x85, gtp_type=255)
        / b"\x00\x00\x00\x00"
        / inner_udp4(),
        "tun_bad_gtpu",
        17,
        (2152, 2152),
    ),
    "inner arp": (vxlan4(inner=ARP()), "tun_unknown_proto", 17, (49152, 4789)),
    "ipip with an ipv6 inside": (
        Ether(**ETH) / IP(**O4, proto=4) / IPv6(**I6) / UDP(),
        "tun_bad_inner",
        4,
        (0, 0),
    ),
    "vxlan in vxlan (max depth 1)": (
        vxlan4(inner=IP(**I4) / UDP(sport=9, dport=4789) / VXLAN(vni=5) / Ether() / IP() / UDP()),
        "tun_too_deep",
        17,
        (49152, 4789),
    ),
    "fragmented outer": (
        Ether(**ETH)
        / IP(**O4, flags="MF")
        / UDP(sport=49152, dport=4789)
        / VXLAN(vni=1)
        / Ether(**IETH)
        / inner_udp4(),
        "tun_fragment",
        17,
        (49152, 4789),
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_tunnel_stays_the_outer_flow(run, name):
    pkt, reason, proto, ports = MALFORMED[name]
    delta, flows = run(pkt)
    assert delta == {"pkt_xdp": 1, "flow_new": 1, reason: 1}
    assert_outer(flows, pkt, proto, ports)


def test_ip_length_shorter_than_the_tunnel_header(run):
    """The outer IP length ends inside the VXLAN header (the rest is padding)."""
    pkt = bytearray(bytes(vxlan4()))
    pkt[16:18] = (20 + 8 + 4).to_bytes(2, "big")  # IPv4 total length: 4 bytes of VXLAN
    delta, flows = run(bytes(pkt))
    assert delta == {"pkt_xdp": 1, "flow_new": 1, "tun_trunc": 1}
    k, _ = one_flow(flows)
    assert (int(k["proto"]), sorted([int(k["lo_port"]), int(k["hi_port"])])) == (17, [4789, 49152])


# ---- truncated at every offset ---------------------------------------------------------

INNER = bytes(inner_udp4())
TRUNCATE = {
    # name: (packet, outer flow's protocol, bytes of the outer L4 header, tunnel header bytes)
    "vxlan": (vxlan4(), 17, 8, 8),
    "geneve": (
        Ether(**ETH)
        / IP(**O4)
        / UDP(sport=2, dport=6081)
        / GENEVE(vni=1, proto=0x6558, options=b"\x00\x01\x02\x02abcdefgh")
        / Ether(**IETH)
        / inner_udp4(),
        17,
        8,
        8 + 12,
    ),
    "gre key": (Ether(**ETH) / IP(**O4) / GRE(proto=0x0800, key_present=1, key=1) / inner_udp4(), 47, 0, 8),
    "gretap": (Ether(**ETH) / IP(**O4) / GRE(proto=0x6558) / Ether(**IETH) / inner_udp4(), 47, 0, 4),
    "ipip": (Ether(**ETH) / IP(**O4) / inner_udp4(), 4, 0, 0),
    "vxlan over ipv6": (
        Ether(**ETH) / IPv6(**O6) / UDP(sport=1, dport=4789) / VXLAN(vni=2) / Ether(**IETH) / inner_udp4(),
        17,
        8,
        8,
    ),
    "4in6": (Ether(**ETH) / IPv6(**O6) / inner_udp4(), 4, 0, 0),
    "gtpu ext": (
        Ether(**ETH)
        / IP(**O4)
        / UDP(sport=2152, dport=2152)
        / GTP_U_Header(teid=3, E=1, next_ex=0x85)
        / GTPPDUSessionContainer(type=0, QFI=1)
        / inner_udp4(),
        17,
        8,
        12 + 4,
    ),
}


def outer_ip_len(pkt) -> int:
    return 40 if IPv6 in pkt and pkt.getlayer(IPv6) is pkt[1] else 20


def truncation_cases():
    for name, (pkt, _, l4, _) in TRUNCATE.items():
        for cut in range(14 + outer_ip_len(pkt) + l4, len(pkt)):
            yield pytest.param(name, cut, id=f"{name}-{cut}")


def expected_truncation(name: str, cut: int) -> tuple[str, dict]:
    """(which flow, counters) for the packet cut to `cut` bytes, from its layout:
    outer headers | tunnel header | [inner Ethernet] | inner IPv4 (20) | inner UDP (8) | payload."""
    pkt, _, l4, tun = TRUNCATE[name]
    raw = bytes(pkt)
    outer_end = 14 + outer_ip_len(pkt) + l4
    hdr_end = outer_end + tun
    ip_start = len(raw) - len(INNER)
    assert raw[ip_start:] == INNER
    if cut >= ip_start + 28:
        return "inner", DECAP
    if cut >= ip_start + 20:  # the inner UDP header cut: the inner protocol's port-less flow
        return "inner portless", {**DECAP, "err_trunc_l4": 1}
    if cut >= hdr_end:  # inner Ethernet or IP header cut
        return "outer", {"pkt_xdp": 1, "flow_new": 1, "tun_bad_inner": 1}
    if name == "geneve" and cut >= outer_end + 8:  # fixed header there, options cut
        return "outer", {"pkt_xdp": 1, "flow_new": 1, "tun_bad_geneve": 1}
    return "outer", {"pkt_xdp": 1, "flow_new": 1, "tun_trunc": 1}


@pytest.mark.parametrize("name,cut", list(truncation_cases()))
def test_truncated_tunnel_at_every_offset(run, name, cut):
    pkt, outer_proto, _, _ = TRUNCATE[name]
    which, counters = expected_truncation(name, cut)
    delta, flows = run(bytes(pkt)[:cut])
    assert delta == counters
    k, v = one_flow(flows)
    assert int(v["dir"][0]["bytes"]) == cut  # the frame as seen
    if which == "outer":
        outer = OUTER6 if outer_ip_len(pkt) == 40 else OUTER4
        assert {ip_to_str(bytes(k["lo_ip"])), ip_to_str(bytes(k["hi_ip"]))} == set(outer)
        assert int(k["proto"]) == outer_proto
        assert TUNNEL_TYPES[v["tunnel_type"]] == "none"
    else:
        assert {ip_to_str(bytes(k["lo_ip"])), ip_to_str(bytes(k["hi_ip"]))} == {I4["src"], I4["dst"]}
        ports = [0, 0] if which == "inner portless" else [53, 5000]
        assert (int(k["proto"]), sorted([int(k["lo_port"]), int(k["hi_port"])])) == (17, ports)
        assert TUNNEL_TYPES[v["tunnel_type"]] == name.split()[0]


# ---- settings ----------------------------------------------------------------------------


def test_kind_switched_off_and_custom_port():
    with Datapath(settings(vxlan_ports=[4790], geneve=False, max_depth=2)) as d:
        run = make_run(d)
        delta, flows = run(vxlan4(port=4789))  # not a VXLAN port any more
        assert delta == {"pkt_xdp": 1, "flow_new": 1}
        assert_outer(flows, vxlan4(port=4789), 17, (49152, 4789))
        delta, flows = run(vxlan4(port=4790, vni=6))
        assert delta == DECAP
        geneve = Ether(**ETH) / IP(**O4) / UDP(sport=2, dport=6081) / GENEVE(vni=1) / Ether(**IETH) / inner_udp4()
        delta, flows = run(geneve)
        assert delta == {"pkt_xdp": 1, "flow_new": 1}
        # depth 2: VXLAN in VXLAN gives the innermost flow, labelled with the outermost tunnel
        nested = vxlan4(
            port=4790,
            vni=11,
            inner=IP(src="10.9.0.1", dst="10.9.0.2")
            / UDP(sport=9, dport=4790)
            / VXLAN(vni=22)
            / Ether(**IETH)
            / IP(**I4)
            / ICMP(),
        )
        delta, flows = run(nested)
        assert delta == DECAP
        k, v = one_flow(flows)
        check_flow(
            k,
            v,
            inner=(I4["src"], I4["dst"]),
            proto=1,
            ports=(0, 0),
            ttype="vxlan",
            tid=11,
            outer=OUTER4,
            nbytes=len(nested),
        )


# ---- the outer UDP length field ------------------------------------------------------------

# name: packet, tunnel header bytes (Geneve: fixed 8 + options; GTP-U: 8 + 4 + extension)
UDP_LENGTH = {k: (TRUNCATE[k][0], TRUNCATE[k][3]) for k in ("vxlan", "geneve", "vxlan over ipv6", "gtpu ext")}


def with_udp_length(pkt, ulen: int) -> bytes:
    """The packet with its outer UDP length field set to ulen: frame and IP length unchanged."""
    raw = bytearray(bytes(pkt))
    at = 14 + outer_ip_len(pkt) + 4
    raw[at : at + 2] = ulen.to_bytes(2, "big")
    return bytes(raw)


def udp_length_cases():
    for name, (_pkt, tun) in UDP_LENGTH.items():
        for ulen in range(0, 8 + tun):
            yield pytest.param(name, ulen, id=f"{name}-{ulen}")


@pytest.mark.parametrize("name,ulen", list(udp_length_cases()))
def test_udp_length_shorter_than_the_tunnel_header(run, name, ulen):
    """A UDP length that ends inside the tunnel header (the frame and the IP length hold
    all of it): the outer flow, counted; Geneve options past it are a bad Geneve header."""
    pkt, tun = UDP_LENGTH[name]
    raw = with_udp_length(pkt, ulen)
    reason = "tun_bad_geneve" if name == "geneve" and ulen >= 8 + 8 else "tun_trunc"
    delta, flows = run(raw)
    assert delta == {"pkt_xdp": 1, "flow_new": 1, reason: 1}
    k, v = one_flow(flows)
    outer = OUTER6 if outer_ip_len(pkt) == 40 else OUTER4
    assert {ip_to_str(bytes(k["lo_ip"])), ip_to_str(bytes(k["hi_ip"]))} == set(outer)
    assert int(k["proto"]) == 17 and TUNNEL_TYPES[v["tunnel_type"]] == "none"
    assert int(v["dir"][0]["bytes"]) == len(raw)


@pytest.mark.parametrize("name", list(UDP_LENGTH))
def test_udp_length_that_holds_the_tunnel_header(run, name):
    """Exactly the header, the true length, and one past the IP payload (the IP length bounds
    it then): each decapsulated; the TC hook checks the same field."""
    pkt, tun = UDP_LENGTH[name]
    true_len = len(bytes(pkt)) - 14 - outer_ip_len(pkt)
    assert true_len == Ether(bytes(pkt))[UDP].len  # the length field scapy wrote: the datagram
    for ulen in (8 + tun, true_len, true_len + 1, 0xFFFF):
        delta, flows = run(with_udp_length(pkt, ulen))
        assert delta == DECAP, (ulen, delta)
        k, v = one_flow(flows)
        assert {ip_to_str(bytes(k["lo_ip"])), ip_to_str(bytes(k["hi_ip"]))} == {I4["src"], I4["dst"]}
        assert TUNNEL_TYPES[v["tunnel_type"]] == name.split()[0]
    delta, flows = run(with_udp_length(pkt, 8 + tun - 1), prog=TC_INGRESS_PROG)
    reason = "tun_bad_geneve" if name == "geneve" else "tun_trunc"
    assert delta == {"pkt_tc_ingress": 1, "flow_new": 1, reason: 1}


# ---- sampled packet records and window records ------------------------------------------


@pytest.fixture(scope="module")
def sampled():
    """Every packet sampled (pkt_events) and windowed (win_events)."""
    s = settings()
    s.datapath = DatapathSettings(sample_rate=1)
    s.window = WindowSettings(packets=1000)
    with Datapath(s) as d:
        d.test_pkts = RecordBuffer(d.bpf, "pkt_events", PktEvent)
        d.test_wins = RecordBuffer(d.bpf, "win_events", WinEvent)
        yield d


RECORD_KINDS = ["vxlan 4789", "vxlan over ipv6", "geneve", "6in4 (sit)", "gre key seq csum", "gretap", "gtpu"]


def test_sampled_and_window_records_carry_the_tunnel(sampled):
    """One packet of each kind plus a plain one and a WireGuard one, through XDP then TC:
    each packet record names its own tunnel; the window over all of them counts them."""
    d = sampled
    make_run(d)  # empties the flow table
    d.bpf.ring_buffer_consume()
    d.test_pkts.take()
    d.test_wins.take()
    table = kinds()
    plain = Ether(**ETH) / inner_udp4(sport=7, dport=8)
    wg = Ether(**ETH) / IP(**O4) / UDP(sport=51820, dport=51820) / (b"w" * 148)
    # (packet, inner src, inner dst, tunnel type, tunnel id, outer or None)
    sent = []
    for name in RECORD_KINDS:
        pkt, ttype, tid, outer, iv = table[name]
        inner = (I4["src"], I4["dst"]) if iv == 4 else (I6["src"], I6["dst"])
        sent.append((pkt, *inner, ttype, tid, outer))
    sent.append((plain, I4["src"], I4["dst"], "none", 0, None))
    sent.append((wg, O4["src"], O4["dst"], "wireguard", 0, None))
    for prog in (XDP_PROG, TC_INGRESS_PROG):
        for s in sent:
            rc, _ = prog_test_run(d.progs[prog].fd, bytes(s[0]))
            assert rc == (XDP_PASS if prog == XDP_PROG else TC_ACT_UNSPEC)
    d.bpf.ring_buffer_consume()
    pkts, wins = d.test_pkts.take(), d.test_wins.take()
    assert len(pkts) == len(wins) == 2 * len(sent)
    cols = packet_columns(pkts, mono_to_unix_ns=0).columns
    for i in range(len(pkts)):
        pkt, src, dst, ttype, tid, outer = sent[i % len(sent)]
        assert cols["hook"][i] == ("xdp" if i < len(sent) else "tc_ingress")
        assert (ip_to_str(cols["src_ip"][i]), ip_to_str(cols["dst_ip"][i])) == (src, dst)
        assert cols["pkt_len"][i] == len(pkt)  # the outer frame
        assert (cols["tunnel_type"][i], int(cols["tunnel_id"][i])) == (ttype, tid)
        got_outer = (bytes(cols["outer_src_ip"][i]).ljust(16, b"\0"), bytes(cols["outer_dst_ip"][i]).ljust(16, b"\0"))
        if outer is None:
            assert got_outer == (bytes(16), bytes(16))
        else:
            assert tuple(ip_to_str(x) for x in got_outer) == outer
        if ttype not in ("none", "wireguard"):
            assert (cols["src_port"][i], cols["dst_port"][i]) == (5000, 53)  # the inner UDP header
    acc = WindowAccumulator(packets=len(wins), seconds=0, mono_to_unix_ns=0)
    (w,) = acc.add(expand_segments(wins))
    n_tun = 2 * len(RECORD_KINDS)  # decapsulated, in both hooks (wireguard is labelled, not opened)
    assert w["buffer_size"] == 2 * len(sent)
    assert w["tunnel_packets"] == n_tun
    ids = {(s[3], s[4]) for s in sent if s[3] not in ("none", "wireguard")}
    assert w["unique_tunnel_ids"] == len(ids)
    assert w["unique_outer_src_ips"] == 2 and w["unique_outer_dst_ips"] == 2  # O4 and O6
    dist = {}
    for s in sent:
        dist[s[3]] = dist.get(s[3], 0) + 2
    assert json.loads(w["tunnel_distribution"]) == dist
    assert w["avg_packet_size"] == sum(len(s[0]) for s in sent) / len(sent)  # frames on the wire
