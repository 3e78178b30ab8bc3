"""Tunnelled traffic on a real veth: the agent (TC both ways on the underlay veth) reports
the inner flows, exact packets and bytes in both directions, with the outer columns.

VXLAN runs through the kernel's own vxlan devices (one in the root namespace, one in the
test host's), with ping and UDP request/response of known sizes. This machine's kernel
has no geneve, ipip, sit, ip6_tunnel or GRE drivers (only CONFIG_VXLAN), so those kinds
are frames built with scapy and sent over the same veth from both ends (AF_PACKET):
real packets through the real hooks and the whole agent pipeline, counted as sent.
Expected sizes are computed from the headers each frame carries on the wire."""

import json
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
from harness import MemorySink, flow_between
from netns import SLOT, make_hosts, sh
from xdpml.agent.pipeline import Agent

from xdpml.config import AgentSettings, DatapathSettings, HarvestSettings, InterfaceSettings
from xdpml.lab import start_capture

pytestmark = [pytest.mark.root, pytest.mark.slow]
ETH, IP4, IP6, UDP, VXLAN, ICMP = 14, 20, 40, 8, 8, 8
VNI = 100000 + SLOT * 100 + 1  # not another checkout's VNI on the root namespace's port 4789
INNER_ROOT, INNER_NS = f"100.{64 + SLOT}.1.1", f"100.{64 + SLOT}.1.2"


@contextmanager
def vxlan_overlay(h, vx: str, vni: int = VNI, inner: tuple[str, str] = (INNER_ROOT, INNER_NS)):
    """A kernel vxlan device at each end of h's veth (vni, port 4789), the overlay
    addresses inner (root side, namespace side) on them, static neighbours: no ARP in the tunnel."""
    root_ip, ns_ip = inner
    sh(f"ip link del {vx}", check=False)
    try:
        sh(f"ip link add {vx} type vxlan id {vni} local {h.host_ip} remote {h.ns_ip} dstport 4789 dev {h.host_if}")
        h.run(f"ip link add vx0 type vxlan id {vni} local {h.ns_ip} remote {h.host_ip} dstport 4789 dev eth0")
        sh(f"sysctl -qw net.ipv6.conf.{vx}.disable_ipv6=1")
        h.run("sysctl -qw net.ipv6.conf.vx0.disable_ipv6=1")
        sh(f"ip addr add {root_ip}/24 dev {vx}")
        h.run(f"ip addr add {ns_ip}/24 dev vx0")
        sh(f"ip link set {vx} up")
        h.run("ip link set vx0 up")
        mac_root = open(f"/sys/class/net/{vx}/address").read().strip()
        mac_ns = h.run("cat /sys/class/net/vx0/address", capture=True).strip()
        sh(f"ip neigh replace {ns_ip} lladdr {mac_ns} dev {vx} nud permanent")
        h.run(f"ip neigh replace {root_ip} lladdr {mac_root} dev vx0 nud permanent")
        yield
    finally:
        sh(f"ip link del {vx}", check=False)


@contextmanager
def tc_agent(h, *, sample_rate: int = 0):
    settings = AgentSettings(
        interfaces=InterfaceSettings(names=[h.host_if]),
        datapath=DatapathSettings(sample_rate=sample_rate),
        # idle 4 s: the two directions come from two processes started one after
        # the other, which a busy machine may delay by a second or more
        harvest=HarvestSettings(idle_timeout_s=4.0, interval_s=0.2),
        summary_interval_s=0,
    )
    settings.enforce.pin_dir = ""  # this test's own maps, no shared pins
    sink = MemorySink()
    agent = Agent(settings, interfaces=[h.host_if], sinks=[sink]).start(attach_timeout_s=90)
    try:
        yield agent, sink
    finally:
        agent.stop()
        assert agent.error is None, agent.error


@pytest.fixture(scope="module")
def env():
    with make_hosts(41) as (h,), vxlan_overlay(h, f"xt{SLOT}vx"), tc_agent(h, sample_rate=1) as (_, sink):
        yield h, sink


def outer_of(r):
    return (r["tunnel_type"], r["tunnel_id"], r["outer_src_ip"], r["outer_dst_ip"])


def test_vxlan_ping_inner_flow_exact(env):
    h, sink = env
    n, size = 6, 100
    h.run(f"ping -q -c {n} -i 0.05 -s {size} -W 2 {INNER_ROOT}")
    frame = ETH + IP4 + UDP + VXLAN + ETH + IP4 + ICMP + size  # the outer frame on the wire
    rows = sink.wait_rows("flow", flow_between(INNER_NS, INNER_ROOT, 1), timeout=40)
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_ip"], r["interface"]) == (INNER_NS, INNER_ROOT, h.host_if)
    assert (r["src2dst_packets"], r["dst2src_packets"]) == (n, n)
    assert (r["src2dst_bytes"], r["dst2src_bytes"]) == (n * frame, n * frame)
    assert (r["src2dst_min_ps"], r["dst2src_max_ps"]) == (frame, frame)
    assert r["src2dst_ttl"] == 64  # the inner packet's header
    assert outer_of(r) == ("vxlan", VNI, h.ns_ip, h.host_ip)
    # every packet is sampled (sample_rate 1): each record names its own tunnel, the
    # requests' outer addresses one way and the replies' the other
    for src, dst, hook in ((INNER_NS, INNER_ROOT, "tc_ingress"), (INNER_ROOT, INNER_NS, "tc_egress")):
        pk = sink.wait_rows(
            "packet", lambda p, a=src, b=dst: (p["src_ip"], p["dst_ip"], p["protocol"]) == (a, b, 1), count=n
        )
        assert len(pk) == n, pk
        for p in pk:
            assert (p["hook"], p["pkt_len"], p["ip_total_length"]) == (hook, frame, IP4 + ICMP + size)
            outer = (h.ns_ip, h.host_ip) if hook == "tc_ingress" else (h.host_ip, h.ns_ip)
            assert outer_of(p) == ("vxlan", VNI, *outer)


def test_vxlan_udp_request_response_exact(env):
    h, sink = env
    send = [10, 300, 1000, 64, 1200]
    reply = [s // 2 + 7 for s in send]
    port = 41000 + SLOT
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((INNER_ROOT, port))
    srv.settimeout(10)

    def serve():
        for size in reply:
            _, peer = srv.recvfrom(65535)
            srv.sendto(b"r" * size, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    script = (
        "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(5)\n"
        f"for n in {send}:\n    s.sendto(b'q'*n, ('{INNER_ROOT}', {port})); s.recvfrom(65535)\n"
    )
    h.run(f'/usr/bin/python3 -c "{script}"')
    t.join(5)
    srv.close()
    over = ETH + IP4 + UDP + VXLAN + ETH + IP4 + UDP
    rows = sink.wait_rows("flow", flow_between(INNER_NS, INNER_ROOT, 17, port), timeout=40)
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_port"]) == (INNER_NS, port)
    assert (r["src2dst_packets"], r["dst2src_packets"]) == (len(send), len(reply))
    assert r["src2dst_bytes"] == sum(over + s for s in send)
    assert r["dst2src_bytes"] == sum(over + s for s in reply)
    assert r["splt_ps"][:4] == [over + send[0], over + reply[0], over + send[1], over + reply[1]]
    assert outer_of(r) == ("vxlan", VNI, h.ns_ip, h.host_ip)


# ---- crafted frames of the kinds this kernel has no driver for ---------------------------


def _kinds(h):
    from scapy.contrib.gtp import GTP_U_Header
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import GRE, Ether
    from scapy.packet import Raw

    def geneve(vni):
        return Raw(bytes([0, 0, 0x65, 0x58]) + vni.to_bytes(3, "big") + b"\0")

    o4 = (h.ns_ip, h.host_ip)
    o6 = (h.ns_ip6, h.host_ip6)
    a4, b4 = f"100.{64 + SLOT}.2.2", f"100.{64 + SLOT}.2.1"
    a6, b6 = f"fd7e:{SLOT}:2::2", f"fd7e:{SLOT}:2::1"
    # kind: (outer IP version, outer layers between the outer IP and the inner IP, inner
    # version, tunnel_type, tunnel_id, outer header bytes before the inner IP)
    return (
        {
            "geneve": (4, lambda: UDP_(6081) / geneve(0x51) / Ether(), 4, "geneve", 0x51, ETH + IP4 + UDP + 8 + ETH),
            "ipip": (4, lambda: None, 4, "ipip", 0, ETH + IP4),
            "6in4 (sit)": (4, lambda: None, 6, "6in4", 0, ETH + IP4),
            "4in6": (6, lambda: None, 4, "4in6", 0, ETH + IP6),
            "6in6 (ip6tnl)": (6, lambda: None, 6, "6in6", 0, ETH + IP6),
            "gre key": (4, lambda: GRE(key_present=1, key=777, proto=0x0800), 4, "gre", 777, ETH + IP4 + 8),
            "gretap": (4, lambda: GRE(proto=0x6558) / Ether(), 4, "gretap", 0, ETH + IP4 + 4 + ETH),
            "ip6gre": (6, lambda: GRE(proto=0x86DD), 6, "gre", 0, ETH + IP6 + 4),
            "gtpu": (
                4,
                lambda: UDP_(2152, 2152) / GTP_U_Header(teid=0xBEEF, gtp_type=255),
                4,
                "gtpu",
                0xBEEF,
                ETH + IP4 + UDP + 8,
            ),
        },
        o4,
        o6,
        (a4, b4),
        (a6, b6),
        Ether,
        IP,
        IPv6,
    )


def UDP_(dport, sport=33333):  # noqa: N802
    from scapy.layers.inet import UDP as U

    return U(sport=sport, dport=dport)


def _send_frames(h, frames_ns: list[bytes], frames_root: list[bytes]) -> None:
    """frames_ns out of the test host's eth0 (arrive at the agent's TC ingress), then
    frames_root out of the root side (the agent's TC egress), in that order, interleaved."""
    code = (
        "import socket,sys,time\n"
        "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW); s.bind((sys.argv[1],0))\n"
        "for line in sys.stdin.read().split():\n    s.send(bytes.fromhex(line)); time.sleep(0.002)\n"
    )
    p = h.popen(["/usr/bin/python3", "-c", code, "eth0"], stdin=subprocess.PIPE, text=True)
    p.communicate("\n".join(f.hex() for f in frames_ns), timeout=30)
    assert p.returncode == 0
    r = subprocess.run(
        [sys.executable, "-c", code, h.host_if], input="\n".join(f.hex() for f in frames_root), text=True, timeout=30
    )
    assert r.returncode == 0


CRAFTED = ["geneve", "ipip", "6in4 (sit)", "4in6", "6in6 (ip6tnl)", "gre key", "gretap", "ip6gre", "gtpu"]


def build_frames(h, kind: str, port: int, fwd_sizes, rev_sizes):
    """(forward frames ns -> root, reverse frames, inner addresses, the kind's row)."""
    from scapy.layers.inet import UDP as U

    table, o4, o6, (a4, b4), (a6, b6), Ether, IP, IPv6 = _kinds(h)
    ov, mid, iv, ttype, tid, overhead = table[kind]
    inner_a, inner_b = (a4, b4) if iv == 4 else (a6, b6)
    outer = o4 if ov == 4 else o6
    mac_ns, mac_root = h.mac(True), h.mac(False)

    def frame(src_o, dst_o, src_i, dst_i, sport, dport, n, eth_src, eth_dst):
        o = (IP if ov == 4 else IPv6)(src=src_o, dst=dst_o)
        i = (IP if iv == 4 else IPv6)(src=src_i, dst=dst_i) / U(sport=sport, dport=dport) / (b"z" * n)
        m = mid()
        return bytes(Ether(src=eth_src, dst=eth_dst) / o / (m / i if m is not None else i))

    fwd = [frame(outer[0], outer[1], inner_a, inner_b, 5555, port, n, mac_ns, mac_root) for n in fwd_sizes]
    rev = [frame(outer[1], outer[0], inner_b, inner_a, port, 5555, n, mac_root, mac_ns) for n in rev_sizes]
    inner_ip = IP4 if iv == 4 else IP6
    assert [len(f) for f in fwd] == [overhead + inner_ip + UDP + n for n in fwd_sizes]  # the layout, as claimed
    return fwd, rev, (inner_a, inner_b), (iv, ttype, tid, outer)


@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_tunnel_frames_on_a_veth(env, kind):
    h, sink = env
    port = 42000 + SLOT * 10 + CRAFTED.index(kind)
    fwd, rev, (inner_a, inner_b), (iv, ttype, tid, outer) = build_frames(
        h, kind, port, [20, 400, 90, 1000], [60, 5, 700]
    )
    _send_frames(h, fwd, rev)
    rows = sink.wait_rows("flow", flow_between(inner_a, inner_b, 17, port), timeout=40)
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_ip"], r["src_port"], r["dst_port"]) == (inner_a, inner_b, 5555, port)
    assert (r["src2dst_packets"], r["dst2src_packets"]) == (len(fwd), len(rev))
    assert (r["src2dst_bytes"], r["dst2src_bytes"]) == (sum(map(len, fwd)), sum(map(len, rev)))
    assert r["ip_version"] == iv
    assert outer_of(r) == (ttype, tid, outer[0], outer[1])


# NFStream (decode_tunnels=True) opens GTP-U and IP-in-IP in every combination; it reads
# VXLAN, Geneve and GRE as their outer UDP/GRE flows, so those are compared above only.
NFSTREAM_KINDS = ["gtpu", "ipip", "6in4 (sit)", "4in6", "6in6 (ip6tnl)"]


def test_against_nfstream_on_a_pcap_of_the_tunnels(env, tmp_path):
    from nfstream import NFStreamer

    h, sink = env
    pcap = tmp_path / "tunnels.pcap"
    sent = {}
    all_fwd, all_rev = [], []
    for i, kind in enumerate(NFSTREAM_KINDS):
        port = 43000 + SLOT * 10 + i
        fwd, rev, inner, _ = build_frames(h, kind, port, [33 + 100 * i, 700, 64], [1200, 9 + i])
        sent[kind] = (port, inner)
        all_fwd += fwd
        all_rev += rev
    # only our frames: the hosts' own ICMP errors and IPv6 housekeeping stay out
    filt = "(ip and (ip proto 4 or ip proto 41 or udp port 2152)) or (ip6 and (ip6 proto 4 or ip6 proto 41))"
    dump = start_capture(h.host_if, str(pcap), filt, count=len(all_fwd) + len(all_rev))  # capturing from here on
    try:
        _send_frames(h, all_fwd, all_rev)
        dump.wait(30)  # exits once it captured every frame sent
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
    assert dump.returncode == 0
    ref = NFStreamer(source=str(pcap), decode_tunnels=True, statistical_analysis=True, n_dissections=0).to_pandas()
    for kind, (port, (a, b)) in sent.items():
        rows = sink.wait_rows("flow", flow_between(a, b, 17, port), timeout=40)
        assert len(rows) == 1, (kind, rows)
        ours = rows[0]
        theirs = ref[(ref["dst_port"] == port) & (ref["protocol"] == 17)]
        assert len(theirs) == 1, (kind, ref[["src_ip", "dst_ip", "src_port", "dst_port"]])
        t = theirs.iloc[0]
        assert (ours["src_ip"], ours["dst_ip"], ours["src_port"]) == (t["src_ip"], t["dst_ip"], t["src_port"]), kind
        for col in (
            "src2dst_packets",
            "dst2src_packets",
            "src2dst_bytes",
            "dst2src_bytes",
            "bidirectional_min_ps",
            "bidirectional_max_ps",
        ):
            assert ours[col] == t[col], (kind, col, ours[col], t[col])


# ---- GSO through the tunnel: TC egress on the underlay sees UDP-tunnel super-packets ------

CAPTURE = r"""
import json, socket, struct, sys
port, marker = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
s.bind(("eth0", 0))
print("ready", flush=True)
got = {"in": [0, 0, 0], "out": [0, 0, 0]}  # packets, frame bytes, largest frame
while True:
    f, addr = s.recvfrom(1 << 17)
    if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 17:
        continue
    u = 14 + (f[14] & 15) * 4
    dport = struct.unpack("!H", f[u + 2 : u + 4])[0]
    if dport == marker:
        break
    i = u + 8 + 8 + 14  # UDP, VXLAN, inner Ethernet: the inner IPv4 header
    if dport != 4789 or len(f) < i + 24 or f[i + 9] != 6:
        continue
    t = i + (f[i] & 15) * 4
    if port not in struct.unpack("!HH", f[t : t + 4]):
        continue
    g = got["out" if addr[2] == 4 else "in"]  # PACKET_OUTGOING
    g[0] += 1
    g[1] += len(f)
    g[2] = max(g[2], len(f))
drops = struct.unpack("II", s.getsockopt(263, 6, 8))[1]  # SOL_PACKET, PACKET_STATISTICS
print(json.dumps({"got": got, "drops": drops}), flush=True)
"""

SERVER = r"""
import socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("listening", flush=True)
c, _ = srv.accept()
while c.recv(1 << 16):
    pass
c.close()
"""


def test_gso_through_vxlan_counts_wire_segments_at_tc_egress():
    """TCP over the kernel's vxlan device with offloads on: the underlay veth's TC egress gets
    UDP-tunnel GSO super-packets (the gso_segs counter moves), segmented after it because the
    veth's tunnel segmentation is off. The inner flow's packets and bytes in each direction
    must equal the VXLAN frames of that flow captured (AF_PACKET, GRO off) on the other end."""
    port, marker, size = 44000 + SLOT, 44100 + SLOT, 3_000_000
    # not the module's overlay (it may be up): its own VNI on port 4789, its own addresses
    vni, root_ip, ns_ip = VNI + 1, f"100.{64 + SLOT}.2.1", f"100.{64 + SLOT}.2.2"
    with make_hosts(43, offloads=True, ipv6=False) as (h,), vxlan_overlay(h, f"xt{SLOT}vg", vni, (root_ip, ns_ip)):
        sh(f"ethtool -K {h.host_if} tx-udp_tnl-segmentation off tx-udp_tnl-csum-segmentation off")
        h.run("ethtool -K eth0 gro off")
        stats = f"/sys/class/net/{h.host_if}/statistics/tx_dropped"
        dropped = int(open(stats).read())
        with tc_agent(h) as (agent, sink):
            cap = h.popen(
                ["/usr/bin/python3", "-c", CAPTURE, str(port), str(marker)], stdout=subprocess.PIPE, text=True
            )
            srv = h.popen(["/usr/bin/python3", "-c", SERVER, ns_ip, str(port)], stdout=subprocess.PIPE, text=True)
            try:
                assert cap.stdout.readline().strip() == "ready"
                assert srv.stdout.readline().strip() == "listening"
                c = socket.socket()
                # at most ~128 KiB in flight: never more than the peer's backlog can queue
                c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
                c.connect((ns_ip, port))
                c.sendall(b"g" * size)
                c.shutdown(socket.SHUT_WR)
                c.settimeout(30)
                assert c.recv(1) == b""  # the server read everything and closed
                c.close()
                assert srv.wait(30) == 0
                rows = sink.wait_rows("flow", flow_between(root_ip, ns_ip, 6, port), timeout=40)
                m = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                m.sendto(b"end", (h.ns_ip, marker))  # after every frame of the flow: the capture's end
                m.close()
                out, _ = cap.communicate(timeout=30)
            finally:
                for p in (cap, srv):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            kernel = agent.datapath.counters()
        assert int(open(stats).read()) == dropped  # nothing lost between the hook and the peer
    res = json.loads(out)
    assert res["drops"] == 0
    fwd, rev = res["got"]["in"], res["got"]["out"]
    assert fwd[2] <= 1514 and fwd[0] > size // 1500  # segmented: wire-sized VXLAN frames
    assert kernel["gso_segs"] > 0  # TC egress saw super-packets
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_port"]) == (root_ip, port)
    assert (r["src2dst_packets"], r["src2dst_bytes"]) == (fwd[0], fwd[1])
    assert (r["dst2src_packets"], r["dst2src_bytes"]) == (rev[0], rev[1])
    assert r["src2dst_max_ps"] == fwd[2]
    assert outer_of(r) == ("vxlan", vni, h.host_ip, h.ns_ip)
