"""Seed-000 window features over every packet of an interface, exact for sizes,
payloads, unique counts and protocol mix; timing within scheduling noise."""

import json
import socket

import numpy as np
import pytest
from harness import running_agent
from netns import make_hosts

pytestmark = [pytest.mark.root, pytest.mark.slow]


def send_udp(h, dst: str, sends: list[tuple[int, int, int]], gap_s: float) -> None:
    """sends: (src_port, dst_port, payload) per datagram, gap_s apart."""
    script = (
        "import socket,time\n"
        f"for sp, dp, n in {sends}:\n"
        "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "    s.bind(('0.0.0.0', sp))\n"
        f"    s.sendto(b'z'*n, ('{dst}', dp)); s.close(); time.sleep({gap_s})\n"
    )
    h.run(f'/usr/bin/python3 -c "{script}"')


def test_windows_of_n_packets():
    sends = [(30000 + (i % 3), 7000 + (i % 2), 20 + 37 * i) for i in range(12)]
    with make_hosts(16, ipv6=False) as (h,):
        sinks = []
        for port in (7000, 7001):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((h.host_ip, port))
            sinks.append(s)
        with running_agent([h.host_if], window_packets=5, idle_timeout_s=60) as (_, sink):
            send_udp(h, h.host_ip, sends, 0.02)
            rows = sink.wait_rows("window", lambda r: r["interface"] == h.host_if, count=2)
        for s in sinks:
            s.close()
        final = [r for r in sink.rows("window") if r["interface"] == h.host_if]
    assert len(rows) >= 2
    assert [r["buffer_size"] for r in final] == [5, 5, 2]  # the partial window is flushed at stop
    for w, chunk in zip(final, (sends[0:5], sends[5:10], sends[10:12])):
        frames = np.array([14 + 20 + 8 + n for _, _, n in chunk], dtype=float)
        assert w["avg_packet_size"] == pytest.approx(frames.mean())
        assert (w["min_packet_size"], w["max_packet_size"]) == (frames.min(), frames.max())
        assert w["std_packet_size"] == pytest.approx(frames.std())
        assert w["median_packet_size"] == pytest.approx(np.median(frames))
        assert w["total_payload"] == sum(n for _, _, n in chunk)
        assert w["avg_payload"] == pytest.approx(np.mean([n for _, _, n in chunk]))
        assert w["unique_src_ips"] == 1 and w["unique_dst_ips"] == 1
        assert w["unique_src_ports"] == len({sp for sp, _, _ in chunk})
        assert w["unique_dst_ports"] == len({dp for _, dp, _ in chunk})
        assert json.loads(w["protocol_distribution"]) == {"17": len(chunk)}
        assert w["proto_udp"] == len(chunk) and w["proto_tcp"] == 0
        if len(chunk) > 1:
            assert 15 <= w["avg_inter_arrival_ms"] <= 80
            assert w["duration_ms"] == pytest.approx(w["avg_inter_arrival_ms"] * (len(chunk) - 1))
            assert w["timestamp_end"] > w["timestamp_start"]


def test_windows_of_t_seconds():
    sends = [(31000, 7100, 100)] * 6
    with make_hosts(17, ipv6=False) as (h,):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((h.host_ip, 7100))
        with running_agent([h.host_if], window_seconds=0.25, idle_timeout_s=60) as (_, sink):
            send_udp(h, h.host_ip, sends[:3], 0.02)
            import time

            time.sleep(0.6)
            send_udp(h, h.host_ip, sends[3:], 0.02)
            sink.wait_rows("window", lambda r: r["interface"] == h.host_if, count=2)
        s.close()
        final = [r for r in sink.rows("window") if r["interface"] == h.host_if]
    # two bursts 0.6 s apart: each burst is its own 0.25 s window
    assert [r["buffer_size"] for r in final] == [3, 3]
    assert all(r["duration_ms"] < 250 for r in final)
