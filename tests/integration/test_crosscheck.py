"""Cross-check flow features against NFStream run on a pcap of the same traffic,
and VLAN / QinQ, GSO and per-packet samples against crafted ground truth."""

import json
import os
import signal
import socket
import tempfile
import threading
import time

import pytest
from harness import flow_between, running_agent
from netns import make_hosts

from xdpml.lab import start_capture

pytestmark = [pytest.mark.root, pytest.mark.slow]


def tcp_exchange(h, port: int, up: int, down: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((h.host_ip, port))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        got = 0
        while got < up:
            got += len(c.recv(65535))
        c.sendall(b"d" * down)
        c.shutdown(socket.SHUT_WR)
        while c.recv(65535):
            pass
        c.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    h.run(
        "/usr/bin/python3 -c \"import socket; s=socket.create_connection(('%s', %d)); s.sendall(b'u'*%d)\n"
        'n=0\nwhile True:\n    b=s.recv(65535)\n    if not b: break\n    n+=len(b)\ns.close()"' % (h.host_ip, port, up)
    )
    t.join(10)


def test_against_nfstream_on_pcap(tmp_path):
    from nfstream import NFStreamer

    pcap = tmp_path / "traffic.pcap"
    with make_hosts(13) as (h,):
        with running_agent([h.host_if], idle_timeout_s=1.0) as (_, sink):
            dump = start_capture(h.host_if, str(pcap), "not arp and not ip6")
            tcp_exchange(h, 9001, 20000, 50000)
            h.run(f"ping -c 5 -i 0.05 -s 300 {h.host_ip}", capture=True)
            time.sleep(1.5)
            dump.send_signal(signal.SIGINT)
            dump.wait(5)
            ours_tcp = sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 6, 9001))
            ours_icmp = sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 1))
    ref = NFStreamer(
        source=str(pcap),
        statistical_analysis=True,
        splt_analysis=10,
        idle_timeout=120,
        active_timeout=1800,
        n_dissections=0,
    ).to_pandas()
    assert len(ours_tcp) == 1 and len(ours_icmp) == 1
    for ours, proto in ((ours_tcp[0], 6), (ours_icmp[0], 1)):
        theirs = ref[ref["protocol"] == proto]
        assert len(theirs) == 1, ref[["src_ip", "dst_ip", "protocol"]]
        t = theirs.iloc[0]
        assert (ours["src_ip"], ours["dst_ip"]) == (t["src_ip"], t["dst_ip"])
        assert (ours["src_port"], ours["dst_port"]) == (t["src_port"], t["dst_port"])
        exact = [
            "bidirectional_packets",
            "bidirectional_bytes",
            "src2dst_packets",
            "src2dst_bytes",
            "dst2src_packets",
            "dst2src_bytes",
            "bidirectional_min_ps",
            "bidirectional_max_ps",
            "src2dst_min_ps",
            "src2dst_max_ps",
            "dst2src_min_ps",
            "dst2src_max_ps",
        ]
        exact += [
            f"{d}_{f}_packets"
            for d in ("bidirectional", "src2dst", "dst2src")
            for f in ("syn", "cwr", "ece", "urg", "ack", "psh", "rst", "fin")
        ]
        for col in exact:
            assert ours[col] == t[col], col
        for col in (
            "bidirectional_mean_ps",
            "bidirectional_stddev_ps",
            "src2dst_mean_ps",
            "src2dst_stddev_ps",
            "dst2src_mean_ps",
            "dst2src_stddev_ps",
        ):
            assert ours[col] == pytest.approx(t[col], rel=1e-6, abs=1e-6), col
        # NFStream's pandas frame carries sequences as JSON text
        assert ours["splt_ps"] == json.loads(t["splt_ps"])
        assert ours["splt_direction"] == json.loads(t["splt_direction"])
        # timing comes from two clocks (kernel hook vs capture): close, not equal
        assert ours["bidirectional_duration_ms"] == pytest.approx(t["bidirectional_duration_ms"], abs=5)
        assert ours["bidirectional_mean_piat_ms"] == pytest.approx(t["bidirectional_mean_piat_ms"], abs=2)


def scapy_send(h, frames_expr: str) -> None:
    script = f"from scapy.all import *\nframes = {frames_expr}\nsendp(frames, iface='eth0', verbose=False)\n"
    path = tempfile.mktemp(suffix=".py")
    with open(path, "w") as f:
        f.write(script)
    try:
        venv_python = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", ".venv", "bin", "python"
        )
        h.run(f"{os.path.abspath(venv_python)} {path}")
    finally:
        os.unlink(path)


@pytest.fixture(scope="module")
def sampled():
    with make_hosts(14) as (h,), running_agent([h.host_if], idle_timeout_s=1.0, sample_rate=1) as (agent, sink):
        yield h, sink


def test_vlan_and_qinq_frames(sampled):
    h, sink = sampled
    mac_h, mac_n = h.mac(False), h.mac(True)
    base = f"Ether(src='{mac_n}', dst='{mac_h}')"
    scapy_send(
        h,
        f"[{base}/Dot1Q(vlan=100)/IP(src='10.77.0.1', dst='10.77.0.2')/UDP(sport=1111, dport=2222)/(b'v'*n) for n in (10, 100, 1000)]",
    )
    scapy_send(
        h,
        f"[{base}/Dot1AD(vlan=300)/Dot1Q(vlan=42)/IP(src='10.77.0.3', dst='10.77.0.4')/UDP(sport=3, dport=4)/(b'w'*50)]*2",
    )
    v = sink.wait_rows("flow", flow_between("10.77.0.1", "10.77.0.2", 17))
    assert len(v) == 1
    assert v[0]["vlan_id"] == 100
    sizes = [14 + 4 + 20 + 8 + n for n in (10, 100, 1000)]
    assert (v[0]["src2dst_packets"], v[0]["src2dst_bytes"]) == (3, sum(sizes))
    assert v[0]["splt_ps"][:3] == sizes
    q = sink.wait_rows("flow", flow_between("10.77.0.3", "10.77.0.4", 17))
    assert len(q) == 1
    assert q[0]["vlan_id"] == 300
    assert (q[0]["src2dst_packets"], q[0]["src2dst_bytes"]) == (2, 2 * (14 + 8 + 20 + 8 + 50))


def test_packet_samples_carry_header_fields(sampled):
    h, sink = sampled
    mac_h, mac_n = h.mac(False), h.mac(True)
    scapy_send(
        h,
        f"[Ether(src='{mac_n}', dst='{mac_h}')/IP(src='10.78.0.1', dst='10.78.0.2', ttl=33, tos=0xb8, id=4242, flags='DF')"
        f"/TCP(sport=5555, dport=443, seq=123456789, ack=987654321, window=4321, urgptr=7, flags='PAU')/(b'p'*77)]",
    )
    rows = sink.wait_rows("packet", lambda r: r["src_ip"] == "10.78.0.1")
    assert len(rows) == 1
    r = rows[0]
    want = {
        "dst_ip": "10.78.0.2",
        "ip_version": 4,
        "protocol": 6,
        "pr_tcp": True,
        "pr_udp": False,
        "tcp_psh": True,
        "tcp_ack": True,
        "tcp_urg": True,
        "tcp_syn": False,
        "tcp_fin": False,
        "src_port": 5555,
        "src_port_mid": True,
        "dst_port": 443,
        "dst_port_low": True,
        "pkt_len": 14 + 20 + 20 + 77,
        "payload_len": 77,
        "tos": 0xB8,
        "ip_dscp": 0xB8 >> 2,
        "ip_ihl": 5,
        "ip_total_length": 20 + 20 + 77,
        "ip_frag_offset": 0,
        "ip_flags": 2,
        "ip_id": 4242,
        "ip_ttl": 33,
        "tcp_sequence_num": 123456789,
        "tcp_ack_num": 987654321,
        "tcp_window_size": 4321,
        "tcp_urgent_pointer": 7,
        "vlan_id": 0,
        "segs": 1,
        "interface": h.host_if,
        "hook": "tc_ingress",
    }
    assert {k: r[k] for k in want} == want
    assert abs(r["timestamp_ns"] / 1e9 - time.time()) < 30


def test_gso_super_packets_count_wire_segments():
    """Offloads on: TC sees TSO super-packets; packets must equal the sender's segment count."""
    with make_hosts(15, offloads=True) as (h,), running_agent([h.host_if], idle_timeout_s=1.0) as (agent, sink):
        counters = "TcpOutSegs TcpRetransSegs TcpInSegs"
        before = h.run(f"nstat -az {counters} --json", capture=True)
        tcp_exchange(h, 9100, 2_000_000, 1000)
        after = h.run(f"nstat -az {counters} --json", capture=True)
        rows = sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 6, 9100))
        kernel = agent.datapath.counters() if agent.datapath else {}
    b, a = json.loads(before)["kernel"], json.loads(after)["kernel"]
    # Linux's OutSegs leaves out retransmitted segments (RFC 1213); they are on the wire too
    out_segs = a["TcpOutSegs"] - b["TcpOutSegs"] + a["TcpRetransSegs"] - b["TcpRetransSegs"]
    in_segs = a["TcpInSegs"] - b["TcpInSegs"]
    assert len(rows) == 1
    r = rows[0]
    assert r["src2dst_packets"] == out_segs
    assert r["dst2src_packets"] == in_segs
    assert kernel.get("gso_segs", 1) > 0
    # every data segment but the last of a super-packet is MSS-sized: max frame = 14+20+32+1448 (timestamps)
    assert r["src2dst_max_ps"] <= 14 + 20 + 32 + 65483
