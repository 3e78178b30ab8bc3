"""Inter-arrival statistics against the kernel's own clock (issue 8 section 4).

Packets go through the real XDP program with BPF_PROG_TEST_RUN, paced by the test.
For a flow of at most first-N packets the kernel also keeps, per packet, the time
since the previous packet (whole microseconds, rounded down) from the same clock
reading it sums: so numpy's statistics over those records must agree with the
flow's *_piat_ms columns up to that rounding, and the bound is computed, not
guessed: a gap made of k records is known to within [sum, sum + k) us."""

import time

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from xdpml.agent.features import flow_columns

from xdpml.config import AgentSettings
from xdpml.datapath.loader import XDP_PROG, Datapath
from xdpml.datapath.maps import FlowMap
from xdpml.datapath.testrun import test_run as prog_test_run

pytestmark = pytest.mark.root
ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
FWD = bytes(Ether(**ETH) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1111, dport=2222) / b"q")
REV = bytes(Ether(**ETH) / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=2222, dport=1111) / b"r")


@pytest.fixture(scope="module")
def dp():
    with Datapath(AgentSettings()) as d:  # first-N 10
        yield d


def one_flow(dp, packets: list[bytes], gaps_s: list[float]):
    """Send packets with the given pauses; return (the flow's feature row, its raw value)."""
    table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    table.drain()
    fd = dp.progs[XDP_PROG].fd
    for i, pkt in enumerate(packets):
        if i:
            time.sleep(gaps_s[i - 1])
        prog_test_run(fd, pkt)
    keys, values = table.drain()
    assert len(keys) == 1
    batch = flow_columns(keys, values, expiration=np.zeros(1, np.int8), mono_to_unix_ns=0, first_n=10)
    return next(batch.rows()), values[0]


def gaps_from_records(piat_us: np.ndarray, dirs: np.ndarray, want_dir: int | None):
    """Gaps between consecutive packets of one direction (None: both), as
    (lower bound in us, number of records summed): the true gap is in [low, low + k)."""
    idx = [i for i in range(len(dirs)) if want_dir is None or dirs[i] == want_dir]
    low = np.array([piat_us[a + 1 : b + 1].sum() for a, b in zip(idx, idx[1:])], dtype=np.float64)
    k = np.array([b - a for a, b in zip(idx, idx[1:])], dtype=np.float64)
    return low, k


def check_against_records(row: dict, prefix: str, low: np.ndarray, k: np.ndarray) -> None:
    m = len(low)
    assert m >= 2
    us = 1e3  # columns are ms
    mean, mn, mx, sd = (row[f"{prefix}_{s}_piat_ms"] * us for s in ("mean", "min", "max", "stddev"))
    eps = 1e-6  # ns integers seen through float ms: a gap of whole microseconds may print a hair low
    assert low.sum() / m - eps <= mean < (low + k).sum() / m
    assert low.min() - eps <= mn < (low + k).min()
    assert low.max() - eps <= mx < (low + k).max()
    # each gap is low + e with 0 <= e < k: the sample deviation moves by at most
    # std(e) <= max(k)/2 * sqrt(m/(m-1)) (half the values at 0, half at max k)
    tol = k.max() / 2 * np.sqrt(m / (m - 1)) + 1e-6
    assert abs(sd - np.std(low, ddof=1)) <= tol, (sd, np.std(low, ddof=1), tol)


@pytest.mark.parametrize(
    "name,gaps",
    [
        ("even_10ms", [0.010] * 9),
        ("uneven", list(np.random.default_rng(8).uniform(0.001, 0.02, 9))),
    ],
)
def test_one_way_flow_matches_first_n_records(dp, name, gaps):
    row, v = one_flow(dp, [FWD] * 10, gaps)
    assert row["src2dst_packets"] == 10 and v["n_seq"] == 10
    piat = v["seq"]["piat_us"].astype(np.float64)
    assert piat[0] == 0
    low, k = gaps_from_records(piat, v["seq"]["dir"], None)
    for prefix in ("src2dst", "bidirectional"):  # one direction: the same gaps
        check_against_records(row, prefix, low, k)
    assert row["dst2src_stddev_piat_ms"] == 0 and row["dst2src_mean_piat_ms"] == 0


def test_two_way_flow_each_direction_and_both(dp):
    order = [FWD, REV, FWD, FWD, REV, FWD, REV, REV, FWD, REV]
    gaps = list(np.random.default_rng(12).uniform(0.002, 0.012, 9))
    row, v = one_flow(dp, order, gaps)
    assert (row["src2dst_packets"], row["dst2src_packets"]) == (5, 5) and v["n_seq"] == 10
    piat, dirs = v["seq"]["piat_us"].astype(np.float64), v["seq"]["dir"]
    assert list(dirs) == [0 if p is FWD else 1 for p in order]
    check_against_records(row, "bidirectional", *gaps_from_records(piat, dirs, None))
    check_against_records(row, "src2dst", *gaps_from_records(piat, dirs, 0))
    check_against_records(row, "dst2src", *gaps_from_records(piat, dirs, 1))


def test_gap_longer_than_32_bits_of_ns(dp):
    """A 4.4 s gap squared does not fit 64 bits of ns^2: the 128-bit sum keeps it."""
    row, v = one_flow(dp, [FWD] * 4, [4.4, 0.002, 0.009])
    assert v["n_seq"] == 4
    piat = v["seq"]["piat_us"][:4].astype(np.float64)
    assert piat[1] > 2**32 / 1e3
    assert int(v["dir"][0]["iat_sumsq_hi"]) >= 1  # the sum really went past 2^64 ns^2
    low, k = gaps_from_records(piat, v["seq"]["dir"][:4], None)
    check_against_records(row, "src2dst", low, k)
    check_against_records(row, "bidirectional", low, k)
