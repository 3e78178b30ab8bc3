"""L4 headers only inside the IP packet (issue 8 section 3), on a real veth with the
agent's TC programs: crafted frames are sent through an AF_PACKET socket on the
host side (TC egress sees them exactly as built; the silent link has no other
traffic), and the exported flows and packet samples are compared with values
computed from the frames themselves."""

import socket
import struct

import pytest
from harness import running_agent
from netns import SLOT, make_hosts
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether

pytestmark = [pytest.mark.root, pytest.mark.slow]
SYN = bytes(TCP(sport=4321, dport=443, flags="S", seq=1))


@pytest.fixture(scope="module")
def env():
    with make_hosts(44, ipv6=False) as (h,):
        with running_agent([h.host_if], idle_timeout_s=1.0, sample_rate=1) as (agent, sink):
            yield h, agent, sink


def send_frames(ifname: str, frames: list[bytes]) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind((ifname, 0))
        for f in frames:
            assert s.send(f) == len(f)
    finally:
        s.close()


def test_fragments_padding_and_short_ip_lengths(env):
    h, agent, sink = env
    net = f"10.{201 + SLOT}.44"
    src, dst = h.host_ip, f"{net}.9"  # an address nobody answers for: no replies
    src6, dst6 = f"fd00:{201 + SLOT}:44::1", f"fd00:{201 + SLOT}:44::9"
    eth = Ether(src=h.mac(False), dst=h.mac(True))

    def ip4(payload: bytes, *, proto: int, frag: int = 0, mf: bool = False, tot: int | None = None) -> bytes:
        return bytes(
            eth / IP(src=src, dst=dst, proto=proto, frag=frag, flags="MF" if mf else 0, len=tot, id=77) / payload
        )

    frag_first = ip4(SYN + b"A" * 24, proto=6, mf=True)  # ports 4321 -> 443
    frag_later = [ip4(SYN + b"B" * (8 * i), proto=6, frag=6 + i, mf=i < 3) for i in range(4)]  # look like SYNs
    short_ip = [ip4(SYN, proto=6, tot=20 + k) + b"\0" * (60 - 34 - 20) for k in (0, 7, 19)]  # header cut by IP length
    udp_padded = bytes(eth / IP(src=src, dst=dst) / UDP(sport=5000, dport=5001) / b"xy")  # 44-byte frame
    udp_padded += b"\xee" * (60 - len(udp_padded))
    six_later = [
        bytes(
            Ether(src=h.mac(False), dst=h.mac(True))
            / IPv6(src=src6, dst=dst6)
            / IPv6ExtHdrFragment(offset=20 + i, m=1, nh=6, id=5)
            / (SYN + b"C" * 8)
        )
        for i in range(3)
    ]
    for f in short_ip:
        assert len(f) == 60 and struct.unpack("!H", f[16:18])[0] < 40

    before = agent.datapath.counters()
    send_frames(h.host_if, [frag_first, *frag_later, *short_ip, udp_padded, *six_later])

    def flows(proto, version, ports):
        def pred(r):
            return (
                (r["protocol"], r["ip_version"]) == (proto, version)
                and sorted([r["src_port"], r["dst_port"]]) == ports
                and r["interface"] == h.host_if
            )

        return pred

    (tcp_ports,) = sink.wait_rows("flow", flows(6, 4, [443, 4321]))
    (tcp_portless,) = sink.wait_rows("flow", flows(6, 4, [0, 0]))
    (udp,) = sink.wait_rows("flow", flows(17, 4, [5000, 5001]))
    (six,) = sink.wait_rows("flow", flows(6, 6, [0, 0]))
    after = agent.datapath.counters()
    delta = {k: after[k] - before[k] for k in ("frag_nonfirst", "l4_trunc_ip_len", "err_trunc_l4", "err_tcp_doff")}
    assert delta == {
        "frag_nonfirst": len(frag_later) + len(six_later),
        "l4_trunc_ip_len": len(short_ip),
        "err_trunc_l4": 0,
        "err_tcp_doff": 0,
    }

    assert (tcp_ports["src2dst_packets"], tcp_ports["src2dst_bytes"], tcp_ports["src2dst_syn_packets"]) == (
        1,
        len(frag_first),
        1,
    )
    later = frag_later + short_ip
    assert (tcp_portless["src_ip"], tcp_portless["dst_ip"]) == (src, dst)
    assert (tcp_portless["src2dst_packets"], tcp_portless["src2dst_bytes"]) == (len(later), sum(map(len, later)))
    assert (tcp_portless["src2dst_syn_packets"], tcp_portless["tcp_flags"], tcp_portless["dst2src_packets"]) == (
        0,
        0,
        0,
    )
    assert (udp["src2dst_packets"], udp["src2dst_bytes"]) == (1, 60)
    assert (six["src_ip"], six["dst_ip"]) == (src6, dst6)
    assert (six["src2dst_packets"], six["src2dst_bytes"]) == (len(six_later), sum(map(len, six_later)))

    # payload per packet from the samples: IP length minus headers, never the padding
    samples = [r for r in sink.rows("packet") if r["dst_ip"] in (dst, dst6)]
    got = sorted((r["protocol"], r["src_port"], r["ip_total_length"], r["pkt_len"], r["payload_len"]) for r in samples)
    want = [(6, 0, 20 + k, 60, 0) for k in (0, 7, 19)]
    want += [(6, 0, 20 + len(SYN) + 8 * i, len(f), len(SYN) + 8 * i) for i, f in enumerate(frag_later)]
    want += [(6, 0, 40 + 8 + len(SYN) + 8, len(f), len(SYN) + 8) for f in six_later]
    want += [(6, 4321, 20 + len(SYN) + 24, len(frag_first), 24), (17, 5000, 20 + 8 + 2, 60, 2)]
    assert got == sorted(want)
