"""Flow features from real traffic over veth pairs, against independent ground truth."""

import socket
import threading

import numpy as np
import pytest
from harness import flow_between, running_agent, sample_std
from netns import make_hosts

pytestmark = [pytest.mark.root, pytest.mark.slow]
ETH, IP4, IP6, UDP = 14, 20, 40, 8


@pytest.fixture(scope="module")
def env():
    with make_hosts(11, 12) as hosts:
        with running_agent([h.host_if for h in hosts], idle_timeout_s=1.0) as (agent, sink):
            yield hosts, agent, sink


def udp_echo_server(ip: str, port: int, reply_sizes: list[int], family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((ip, port))
    s.settimeout(10)

    def serve():
        for size in reply_sizes:
            _, peer = s.recvfrom(65535)
            s.sendto(b"r" * size, peer)
        s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def udp_client_script(dst: str, port: int, sizes: list[int], gap_s: float, family: str = "AF_INET") -> str:
    return (
        f"import socket,time; s=socket.socket(socket.{family},socket.SOCK_DGRAM); s.settimeout(5)\n"
        f"for n in {sizes}:\n"
        f"    s.sendto(b'q'*n, ('{dst}', {port})); s.recvfrom(65535); time.sleep({gap_s})\n"
    )


@pytest.mark.parametrize("version", [4, 6])
def test_udp_request_response_exact(env, version):
    (h, _), _, sink = env
    send = [10, 200, 1000, 50, 1400, 3, 700]
    reply = [s // 2 + 1 for s in send]
    port = 40000 + version
    host_ip, ns_ip = (h.host_ip, h.ns_ip) if version == 4 else (h.host_ip6, h.ns_ip6)
    fam = socket.AF_INET if version == 4 else socket.AF_INET6
    t = udp_echo_server(host_ip, port, reply, fam)
    h.run(
        f'/usr/bin/python3 -c "{udp_client_script(host_ip, port, send, 0.03, "AF_INET" if version == 4 else "AF_INET6")}"'
    )
    t.join(5)
    l3 = IP4 if version == 4 else IP6
    fwd = [ETH + l3 + UDP + n for n in send]
    rev = [ETH + l3 + UDP + n for n in reply]
    rows = sink.wait_rows("flow", flow_between(ns_ip, host_ip, 17, port))
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["src_ip"], r["dst_ip"], r["dst_port"], r["ip_version"]) == (ns_ip, host_ip, port, version)
    assert r["expiration_id"] == 0  # idle
    assert (r["src2dst_packets"], r["dst2src_packets"], r["bidirectional_packets"]) == (7, 7, 14)
    assert (r["src2dst_bytes"], r["dst2src_bytes"]) == (sum(fwd), sum(rev))
    for d, sizes in (("src2dst", fwd), ("dst2src", rev), ("bidirectional", fwd + rev)):
        assert r[f"{d}_min_ps"] == min(sizes) and r[f"{d}_max_ps"] == max(sizes)
        assert r[f"{d}_mean_ps"] == pytest.approx(np.mean(sizes))
        assert r[f"{d}_stddev_ps"] == pytest.approx(sample_std(sizes))
    inter = [x for pair in zip(fwd, rev) for x in pair]
    assert r["splt_ps"] == inter[:10]
    assert r["splt_direction"] == [0, 1] * 5
    # timing: 30 ms pauses between request/response pairs (scheduling noise allowed)
    assert 25 <= r["src2dst_mean_piat_ms"] <= 80
    assert r["dst2src_min_piat_ms"] >= 25 and r["src2dst_min_piat_ms"] >= 25
    assert r["bidirectional_min_piat_ms"] < 5  # request -> immediate response
    assert r["splt_piat_ms"][0] == 0
    assert r["bidirectional_duration_ms"] >= 6 * 30
    assert r["src2dst_ttl"] == 64 and r["src_port_high"] is (r["src_port"] >= 49152)


def test_icmp_ping(env):
    (_, h), _, sink = env
    h.run(f"ping -c 4 -i 0.05 -s 56 {h.host_ip}", capture=True)
    rows = sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 1))
    assert len(rows) == 1
    r = rows[0]
    frame = ETH + IP4 + 8 + 56
    assert (r["src2dst_packets"], r["dst2src_packets"]) == (4, 4)
    assert (r["src2dst_bytes"], r["dst2src_bytes"]) == (4 * frame, 4 * frame)
    assert (r["src_port"], r["dst_port"]) == (0, 0)
    assert r["src_ip"] == h.ns_ip


def test_tcp_connection_flags_and_end(env):
    (h, _), _, sink = env
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT
    srv.bind((h.host_ip, 8081))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        data = b""
        while len(data) < 3000:
            data += c.recv(65535)
        c.sendall(b"k" * 100)
        c.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    h.run(
        "/usr/bin/python3 -c \"import socket; s=socket.create_connection(('%s', 8081)); "
        "s.sendall(b'x'*3000); n=0\nwhile n < 100: n += len(s.recv(1000))\ns.close()\"" % h.host_ip
    )
    t.join(5)
    rows = sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 6, 8081))
    assert len(rows) == 1
    r = rows[0]
    assert r["expiration_id"] == 2  # FIN both ways
    assert r["src2dst_syn_packets"] == 1 and r["dst2src_syn_packets"] == 1
    assert r["src2dst_fin_packets"] == 1 and r["dst2src_fin_packets"] == 1
    assert r["src2dst_rst_packets"] == 0
    assert r["splt_flags"][:3] == [0x02, 0x12, 0x10]  # SYN, SYN-ACK, ACK
    assert r["splt_direction"][:3] == [0, 1, 0]
    assert r["tcp_flags"] & 0x1B == 0x1B  # FIN SYN PSH ACK
    # payload: 3000 bytes up with offloads off = segments of at most MSS 1448
    assert r["src2dst_bytes"] >= 3000 + r["src2dst_packets"] * (ETH + IP4 + 20)
    assert r["src2dst_init_window"] > 0 and r["dst2src_init_window"] > 0
