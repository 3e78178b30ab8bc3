"""L4 headers are read only inside the IP packet (issue 8 section 3), through
BPF_PROG_TEST_RUN on the real compiled XDP program.

Rules under test: the L4 header is parsed only from the first fragment and only when
the IP length (IPv4 total length, IPv6 payload length) covers all of it (TCP: with
its options); otherwise the packet joins the port-less flow (ports 0) of its protocol
and one counter per reason moves. Ethernet padding after the IP packet is never L4
and never payload. Expected values come from scapy/struct, not from the datapath:
the packet's own layout says where the IP packet ends and what its ports are."""

import struct

import pytest
from scapy.layers.inet import ICMP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from xdpml.agent.events import RecordBuffer

from xdpml.config import AgentSettings, DatapathSettings, WindowSettings
from xdpml.datapath.abi import PktEvent, WinEvent
from xdpml.datapath.loader import XDP_PROG, Datapath
from xdpml.datapath.maps import FlowMap
from xdpml.datapath.testrun import test_run as prog_test_run
from xdpml.wire.columns import ip_to_str

pytestmark = pytest.mark.root
XDP_PASS = 2
ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A4, B4, A6, B6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"
SYN = bytes(TCP(sport=1234, dport=80, flags="S", seq=7))  # 20 bytes that look like a SYN


@pytest.fixture(scope="module")
def dp():
    # every packet sampled and windowed, so payload accounting is visible per packet
    settings = AgentSettings(datapath=DatapathSettings(sample_rate=1), window=WindowSettings(packets=1000))
    with Datapath(settings) as d:
        d.test_pkts = RecordBuffer(d.bpf, "pkt_events", PktEvent)
        d.test_wins = RecordBuffer(d.bpf, "win_events", WinEvent)
        yield d


@pytest.fixture()
def run(dp):
    table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    table.drain()
    dp.bpf.ring_buffer_consume()
    dp.test_pkts.take()
    dp.test_wins.take()

    def go(frame: bytes):
        before = dp.counters()
        rc, _ = prog_test_run(dp.progs[XDP_PROG].fd, frame)
        assert rc == XDP_PASS
        after = dp.counters()
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        delta.pop("pkt_sampled", None)
        keys, values = table.drain()
        dp.bpf.ring_buffer_consume()
        pkts, wins = dp.test_pkts.take(), dp.test_wins.take()
        return delta, list(zip(keys, values)), pkts, wins

    return go


def ipv4(l4: bytes, proto: int, *, total_len: int | None = None, frag: int = 0, mf: bool = False) -> bytes:
    """A 20-byte IPv4 header (struct-built: its length field says exactly what we ask)."""
    tot = 20 + len(l4) if total_len is None else total_len
    flags_frag = (0x2000 if mf else 0) | frag
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            tot,
            0x1234,
            flags_frag,
            64,
            proto,
            0,
            bytes(map(int, A4.split("."))),
            bytes(map(int, B4.split("."))),
        )
        + l4
    )


def frame(ip_packet: bytes, *, pad_to: int = 0) -> bytes:
    f = bytes(Ether(**ETH, type=0x86DD if ip_packet[0] >> 4 == 6 else 0x0800)) + ip_packet
    return f + b"\xee" * max(0, pad_to - len(f))


def assert_portless(flows, proto: int, version: int, nbytes: int):
    ((k, v),) = flows
    assert (k["proto"], k["ip_version"], k["lo_port"], k["hi_port"]) == (proto, version, 0, 0)
    d = v["dir"][0]
    assert (d["packets"], d["bytes"]) == (1, nbytes)
    assert list(d["flag_count"]) == [0] * 8 and v["tcp_flags_or"] == 0 and d["init_window"] == 0


def assert_payload(pkts, wins, payload: int, frame_len: int):
    (e,), (w,) = pkts, wins
    assert (int(e["payload_len"]), int(e["pkt_len"])) == (payload, frame_len)
    assert (int(w["payload"]), int(w["size"])) == (payload, frame_len)


TCP_OPT = bytes(
    TCP(sport=1234, dport=80, flags="S", options=[("MSS", 1460), ("NOP", None), ("NOP", None), ("SAckOK", b"")])
)  # 28-byte header
L4_CASES = {  # name: (proto, header bytes + 4 payload bytes, header length)
    "tcp": (6, SYN + b"data", 20),
    "tcp_options": (6, TCP_OPT + b"data", len(TCP_OPT)),
    "udp": (17, bytes(UDP(sport=53, dport=5353, len=12)) + b"data", 8),
    "icmp": (1, bytes(ICMP(type=8, id=1, seq=1)) + b"data", 8),
}


@pytest.mark.parametrize("name", L4_CASES)
def test_l4_header_cut_by_ip_length_at_every_offset(run, name):
    """The frame holds the whole header (and padding), the IP length stops inside it."""
    proto, l4, hlen = L4_CASES[name]
    if proto == 6:
        assert (l4[12] >> 4) * 4 == hlen  # the data offset scapy wrote
    for covered in range(hlen):
        f = frame(ipv4(l4, proto, total_len=20 + covered), pad_to=60)
        delta, flows, pkts, wins = run(f)
        assert delta == {"pkt_xdp": 1, "flow_new": 1, "l4_trunc_ip_len": 1}, covered
        assert_portless(flows, proto, 4, len(f))
        assert_payload(pkts, wins, 0, len(f))
    # the whole header inside the IP length: ports and flags are read, payload is what is left
    f = frame(ipv4(l4, proto, total_len=20 + hlen + 1), pad_to=60)
    delta, flows, pkts, wins = run(f)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    assert_payload(pkts, wins, 1, len(f))
    ((k, v),) = flows
    want_ports = {6: [80, 1234], 17: [53, 5353], 1: [0, 0]}[proto]
    assert sorted([k["lo_port"], k["hi_port"]]) == want_ports
    assert v["dir"][0]["flag_count"][1] == (1 if proto == 6 else 0)  # SYN


@pytest.mark.parametrize("name", L4_CASES)
def test_l4_header_cut_by_frame_at_every_offset(run, name):
    """The IP length claims the whole packet, the frame ends inside the L4 header."""
    proto, l4, hlen = L4_CASES[name]
    # what the program reads of the header: TCP's fixed 20 bytes (options are only skipped)
    read = 20 if proto == 6 else 8
    full = frame(ipv4(l4, proto))
    for cut in range(14 + 20, 14 + 20 + read):
        delta, flows, pkts, wins = run(full[:cut])
        assert delta == {"pkt_xdp": 1, "flow_new": 1, "err_trunc_l4": 1}, cut
        assert_portless(flows, proto, 4, cut)
        assert_payload(pkts, wins, 0, cut)


@pytest.mark.parametrize(
    "proto,l4,hlen",
    [
        (6, SYN + b"xy", 20),
        (17, bytes(UDP(sport=5, dport=6, len=10)) + b"xy", 8),
        (58, bytes(ICMPv6EchoRequest(id=3, seq=4)) + b"xy", 8),
    ],
    ids=["tcp", "udp", "icmpv6"],
)
def test_ipv6_l4_header_cut_by_payload_length(run, proto, l4, hlen):
    for covered in range(1, hlen):  # payload length 0 means 'jumbogram': see the test below
        ip6 = bytes(IPv6(src=A6, dst=B6, nh=proto, plen=covered)) + l4
        f = frame(ip6, pad_to=60)
        delta, flows, pkts, wins = run(f)
        assert delta == {"pkt_xdp": 1, "flow_new": 1, "l4_trunc_ip_len": 1}, covered
        assert_portless(flows, proto, 6, len(f))
        assert_payload(pkts, wins, 0, len(f))
    f = frame(bytes(IPv6(src=A6, dst=B6, nh=proto, plen=hlen + 2)) + l4)
    delta, flows, pkts, wins = run(f)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    assert_payload(pkts, wins, 2, len(f))


def test_ipv6_payload_length_zero_is_bounded_by_the_frame(run):
    """Payload length 0 (a jumbogram, or BIG TCP inside the stack): the length is not in
    this header, so the frame bounds the L4 header and the payload."""
    f = frame(bytes(IPv6(src=A6, dst=B6, nh=17, plen=0)) + bytes(UDP(sport=5, dport=6, len=13)) + b"hello")
    delta, flows, pkts, wins = run(f)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    ((k, _),) = flows
    assert sorted([k["lo_port"], k["hi_port"]]) == [5, 6]
    assert_payload(pkts, wins, 5, len(f))


def test_tcp_data_offset_below_five(run):
    l4 = bytearray(SYN)
    l4[12] = 4 << 4
    f = frame(ipv4(bytes(l4), 6))
    delta, flows, pkts, wins = run(f)
    assert delta == {"pkt_xdp": 1, "flow_new": 1, "err_tcp_doff": 1}
    assert_portless(flows, 6, 4, len(f))
    assert_payload(pkts, wins, 0, len(f))


def test_tcp_options_reaching_into_padding(run):
    """A 40-byte IP packet in a 60-byte frame whose TCP data offset claims 8 words: the
    options would be read from Ethernet padding."""
    l4 = bytearray(SYN)
    l4[12] = 8 << 4
    f = frame(ipv4(bytes(l4), 6), pad_to=60)
    assert len(f) == 60 and struct.unpack("!H", f[16:18])[0] == 40
    delta, flows, pkts, wins = run(f)
    assert delta == {"pkt_xdp": 1, "flow_new": 1, "l4_trunc_ip_len": 1}
    assert_portless(flows, 6, 4, 60)


@pytest.mark.parametrize(
    "l4,proto,ports",
    [
        (SYN, 6, [80, 1234]),
        (bytes(UDP(sport=53, dport=4000, len=8)), 17, [53, 4000]),
        (bytes(UDP(sport=53, dport=4000, len=18)) + b"0123456789", 17, [53, 4000]),
    ],
    ids=["tcp", "udp", "udp_payload"],
)
def test_padded_minimum_frame(run, l4, proto, ports):
    """A 60-byte Ethernet frame (the minimum without FCS) carrying a shorter IP packet:
    the frame bytes count as the frame's size, the padding never as payload."""
    ip = ipv4(l4, proto)
    f = frame(ip, pad_to=60)
    assert len(f) == 60 and len(ip) < 46
    delta, flows, pkts, wins = run(f)
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    ((k, v),) = flows
    assert sorted([k["lo_port"], k["hi_port"]]) == ports
    assert v["dir"][0]["bytes"] == 60
    hdr = 20 if proto == 6 else 8
    assert_payload(pkts, wins, len(l4) - hdr, 60)


@pytest.mark.parametrize("offset", [1, 2, 3, 100])
def test_ipv4_nonfirst_fragment_that_looks_like_a_syn(run, offset):
    """Fragment bytes are payload of the datagram, whatever they look like: no ports,
    no SYN, a port-less TCP flow, counted."""
    ip = ipv4(SYN + b"more", 6, frag=offset, mf=offset != 100)
    f = frame(ip)
    delta, flows, pkts, wins = run(f)
    assert delta == {"pkt_xdp": 1, "flow_new": 1, "frag_nonfirst": 1}
    assert_portless(flows, 6, 4, len(f))
    assert_payload(pkts, wins, len(SYN) + 4, len(f))
    assert int(pkts[0]["frag_off"]) & 0x1FFF == offset


def test_ipv4_first_fragment_keeps_its_ports(run):
    ip = ipv4(SYN + b"part", 6, mf=True)
    delta, flows, pkts, wins = run(frame(ip))
    assert delta == {"pkt_xdp": 1, "flow_new": 1}
    ((k, v),) = flows
    assert sorted([k["lo_port"], k["hi_port"]]) == [80, 1234] and v["dir"][0]["flag_count"][1] == 1
    assert_payload(pkts, wins, 4, 14 + len(ip))


@pytest.mark.parametrize("offset,more", [(0, 1), (1, 1), (185, 0)])
def test_ipv6_fragment_header(run, offset, more):
    """IPv6 with a fragment header: offset 0 is parsed (its TCP header follows the
    fragment header), later fragments are port-less even when they look like a SYN."""
    ip6 = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=offset, m=more, nh=6, id=99) / (SYN + b"abc")
    f = bytes(Ether(**ETH) / ip6)
    delta, flows, pkts, wins = run(f)
    ((k, v),) = flows
    assert (k["proto"], k["ip_version"]) == (6, 6)
    assert {ip_to_str(bytes(k["lo_ip"])), ip_to_str(bytes(k["hi_ip"]))} == {A6, B6}
    if offset == 0:
        assert delta == {"pkt_xdp": 1, "flow_new": 1}
        assert sorted([k["lo_port"], k["hi_port"]]) == [80, 1234] and v["dir"][0]["flag_count"][1] == 1
        assert_payload(pkts, wins, 3, len(f))
    else:
        assert delta == {"pkt_xdp": 1, "flow_new": 1, "frag_nonfirst": 1}
        assert_portless(flows, 6, 6, len(f))
        assert_payload(pkts, wins, len(SYN) + 3, len(f))


def test_fragments_of_one_datagram_share_the_portless_flow(run, dp):
    """Later fragments of several datagrams between two hosts are one port-less flow, its
    packet and byte counts exact; the first fragments stay in their port flows."""
    fd = dp.progs[XDP_PROG].fd
    table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    sizes = []
    for i in range(5):
        f = frame(ipv4(SYN + bytes(8 * i), 6, frag=3 + i))
        sizes.append(len(f))
        assert prog_test_run(fd, f)[0] == XDP_PASS
    keys, values = table.drain()
    dp.bpf.ring_buffer_consume()
    assert len(keys) == 1 and (keys[0]["lo_port"], keys[0]["hi_port"]) == (0, 0)
    assert (values[0]["dir"][0]["packets"], values[0]["dir"][0]["bytes"]) == (5, sum(sizes))
