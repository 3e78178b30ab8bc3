"""Inter-arrival statistics at several packet rates on a real veth (issue 8 section 4),
against timestamps the test records itself.

The test sends UDP datagrams from the root namespace through the host-side veth, where
the agent's TC egress program timestamps them. That program runs inside the sendto()
call, so the kernel's timestamp of packet i lies between the CLOCK_MONOTONIC readings
taken just before and just after it (bpf_ktime_get_ns is CLOCK_MONOTONIC). Each bound
below follows from those windows, so it is as tight as the measured jitter allows and
holds however loaded the machine is."""

import socket
import time

import numpy as np
import pytest
from harness import flow_between, running_agent
from netns import make_hosts

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def env():
    with make_hosts(45, ipv6=False) as (h,):
        with running_agent([h.host_if], idle_timeout_s=1.0, first_n=10) as (agent, sink):
            yield h, sink


def paced_send(dst: str, port: int, rate: float, count: int) -> np.ndarray:
    """Send `count` datagrams at `rate` per second; (count, 2) array of the monotonic
    ns readings just before and just after each sendto()."""
    period = int(1e9 / rate)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    win = np.zeros((count, 2), dtype=np.int64)
    t0 = time.monotonic_ns() + 1_000_000
    try:
        for i in range(count):
            target = t0 + i * period
            while True:
                left = target - time.monotonic_ns()
                if left <= 0:
                    break
                if left > 1_000_000:
                    time.sleep((left - 500_000) / 1e9)
            b = time.monotonic_ns()
            s.sendto(b"p" * 18, (dst, port))
            a = time.monotonic_ns()
            win[i] = (b, a)
    finally:
        s.close()
    return win


@pytest.mark.parametrize("rate,count", [(200, 100), (2_000, 300), (20_000, 1_000)])
def test_piat_statistics_at_rate(env, rate, count):
    h, sink = env
    port = 47000 + rate % 1000 + rate // 1000
    win = paced_send(h.ns_ip, port, rate, count)
    (r,) = sink.wait_rows("flow", flow_between(h.host_ip, h.ns_ip, 17, port))
    assert (r["src2dst_packets"], r["dst2src_packets"]) == (count, 0)

    b, a = win[:, 0].astype(np.float64), win[:, 1].astype(np.float64)
    lo_gap, hi_gap = b[1:] - a[:-1], a[1:] - b[:-1]  # each kernel gap lies in [lo, hi]
    mid_gap = (a[1:] + b[1:] - a[:-1] - b[:-1]) / 2
    half = (a - b) / 2  # how far each kernel timestamp can be from its window's middle
    m = count - 1
    ns = 1e6  # columns are ms
    for prefix in ("src2dst", "bidirectional"):
        mean, mn, mx, sd = (r[f"{prefix}_{s}_piat_ms"] * ns for s in ("mean", "min", "max", "stddev"))
        slack = 1e-3  # ns integers through float ms
        assert (b[-1] - a[0]) / m - slack <= mean <= (a[-1] - b[0]) / m + slack
        assert lo_gap.min() - slack <= mn <= hi_gap.min() + slack
        assert lo_gap.max() - slack <= mx <= hi_gap.max() + slack
        # kernel gap = mid_gap + d_i with |d_i| <= half[i] + half[i+1]; the sample
        # deviation moves by at most sqrt(sum d_i^2 / (m - 1))
        tol = np.sqrt(np.sum((half[:-1] + half[1:]) ** 2) / (m - 1)) + slack
        want = np.std(mid_gap, ddof=1)
        assert abs(sd - want) <= tol, (rate, sd, want, tol)
