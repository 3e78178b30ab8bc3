"""Pure feature functions on hand-built kernel records (no kernel needed)."""

import json

import numpy as np
import pytest
from xdpml.agent.features import WindowAccumulator, expand_segments, flow_columns
from xdpml.agent.harvest import Harvester

from xdpml.config import HarvestSettings
from xdpml.datapath.abi import END_FIN_INIT, END_FIN_RESP, END_RST, flow_types
from xdpml.wire.columns import ip_from_str

T = flow_types(4)


def sq128(iat) -> tuple[int, int]:
    """Sum of squares in ns^2 as the kernel keeps it: (low, high) 64-bit halves."""
    total = sum(int(i) ** 2 for i in iat)
    return total & (2**64 - 1), total >> 64


def record(sizes_fwd, sizes_rev, times_fwd, times_rev, *, lo_is_init=True):
    """One flow as the kernel would hold it, built from per-packet lists."""
    k = np.zeros(1, T.key_dtype)
    k["lo_ip"][0] = np.frombuffer(ip_from_str("10.0.0.1"), np.uint8)
    k["hi_ip"][0] = np.frombuffer(ip_from_str("10.0.0.2"), np.uint8)
    k["lo_port"], k["hi_port"], k["proto"], k["ip_version"], k["ifindex"] = 1000, 80, 6, 4, 3
    v = np.zeros(1, T.value_dtype)
    v["init_lo_to_hi"] = 1 if lo_is_init else 0
    for d, (sizes, times) in enumerate(((sizes_fwd, times_fwd), (sizes_rev, times_rev))):
        st = v["dir"][0, d]
        if not sizes:
            continue
        iat = np.diff(times)
        st["packets"], st["bytes"] = len(sizes), sum(sizes)
        st["first_ns"], st["last_ns"] = times[0], times[-1]
        st["size_sumsq"] = sum(s * s for s in sizes)
        st["size_min"], st["size_max"] = min(sizes), max(sizes)
        if len(iat):
            st["iat_sum_ns"] = iat.sum()
            st["iat_sumsq_lo"], st["iat_sumsq_hi"] = sq128(iat)
            st["iat_min_ns"], st["iat_max_ns"] = iat.min(), iat.max()
        v["dir"][0, d] = st
    allt = sorted(times_fwd + times_rev)
    v["first_ns"], v["last_ns"] = allt[0], allt[-1]
    iat = np.diff(allt)
    if len(iat):
        v["iat"]["sum_ns"], v["iat"]["min_ns"], v["iat"]["max_ns"] = iat.sum(), iat.min(), iat.max()
        v["iat"]["sumsq_lo"], v["iat"]["sumsq_hi"] = sq128(iat)
    return k, v


def test_flow_columns_statistics():
    fwd, rev = [100, 300, 200], [60, 1500]
    tf, tr = [0, 10_000_000, 30_000_000], [5_000_000, 20_000_000]
    k, v = record(fwd, rev, tf, tr)
    b = flow_columns(
        k, v, expiration=np.array([0]), mono_to_unix_ns=1_700_000_000_000_000_000, ifnames={3: "eth9"}, first_n=4
    )
    r = next(b.rows())
    assert (r["src_ip"], r["dst_ip"], r["src_port"], r["dst_port"]) == ("10.0.0.1", "10.0.0.2", 1000, 80)
    assert r["interface"] == "eth9"
    assert (r["src2dst_packets"], r["dst2src_packets"], r["bidirectional_bytes"]) == (3, 2, 2160)
    assert r["src2dst_stddev_ps"] == pytest.approx(np.std(fwd, ddof=1))
    assert r["bidirectional_stddev_ps"] == pytest.approx(np.std(fwd + rev, ddof=1))
    assert r["bidirectional_min_ps"] == 60 and r["bidirectional_max_ps"] == 1500
    assert r["src2dst_mean_piat_ms"] == pytest.approx(15.0)
    assert r["src2dst_stddev_piat_ms"] == pytest.approx(np.std([10, 20], ddof=1))
    assert r["bidirectional_mean_piat_ms"] == pytest.approx(7.5)
    assert r["bidirectional_duration_ms"] == 30.0
    assert r["bidirectional_first_seen_ms"] == 1_700_000_000_000
    assert r["pps"] == pytest.approx(5 / 0.03)
    assert r["bps"] == pytest.approx(2160 / 5)
    assert r["dst_port_low"] and r["src_port_low"] and not r["src_port_mid"] and not r["src_port_high"]
    assert r["splt_ps"] == [-1, -1, -1, -1]  # no sequence entries recorded in this record


def test_responder_first_in_key_order_is_swapped_back():
    k, v = record([100], [200], [0], [1_000_000], lo_is_init=False)
    r = next(flow_columns(k, v, expiration=np.array([0]), mono_to_unix_ns=0, first_n=4).rows())
    assert (r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"]) == ("10.0.0.2", 80, "10.0.0.1", 1000)


def test_single_packet_flow_has_zero_spread():
    k, v = record([77], [], [5], [])
    r = next(flow_columns(k, v, expiration=np.array([-1]), mono_to_unix_ns=0, first_n=4).rows())
    assert r["bidirectional_stddev_ps"] == 0 and r["src2dst_mean_piat_ms"] == 0
    assert r["dst2src_packets"] == 0 and r["dst2src_first_seen_ms"] == 0 and r["pps"] == 0


class FakeTable:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def read_all(self):
        return self.keys.copy(), self.values.copy()

    def take(self, keys):
        keep = ~np.isin(self.keys.view(f"V{self.keys.dtype.itemsize}"), keys.view(f"V{keys.dtype.itemsize}"))
        taken = ~keep
        out = self.keys[taken], self.values[taken]
        self.keys, self.values = self.keys[keep], self.values[keep]
        return out

    def drain(self):
        out = self.keys, self.values
        self.keys, self.values = self.keys[:0], self.values[:0]
        return out


def test_harvester_reasons():
    s = 1_000_000_000
    recs = [record([60], [60], [0], [1]) for _ in range(5)]
    keys = np.concatenate([r[0] for r in recs])
    vals = np.concatenate([r[1] for r in recs])
    keys["lo_port"] = np.arange(5)
    now = 5000 * s
    vals["first_ns"] = [now - 10 * s, now - 130 * s, now - 1900 * s, now - 5 * s, now - 5 * s]
    vals["last_ns"] = [now - 1 * s, now - 121 * s, now - 1 * s, now - 2 * s, now - 0]
    vals["end_flags"] = [0, 0, 0, END_FIN_INIT | END_FIN_RESP, END_RST]
    h = Harvester(FakeTable(keys, vals), settings=HarvestSettings(), first_n=4, mono_to_unix_ns=0)
    b = h.scan(now)
    got = dict(zip(b["src_port"].tolist(), b["expiration_id"].tolist()))
    # port 0 active & fresh: kept; 1 idle; 2 active timeout; 3 FIN both ways + quiet; 4 RST but not quiet yet
    assert got == {1: 0, 2: 1, 3: 2}
    assert h.stats.active == 2
    rest = h.drain()
    assert sorted(rest["src_port"].tolist()) == [0, 4] and set(rest["expiration_id"].tolist()) == {-1}


# a window ring-buffer record as the harvester hands it to the accumulator (bpf/abi.h win_event)
WIN_RECORD = [
    ("ts_ns", "u8"),
    ("size", "u4"),
    ("payload", "u4"),
    ("proto", "u1"),
    ("src_ip", "S16"),
    ("dst_ip", "S16"),
    ("src_port", "u2"),
    ("dst_port", "u2"),
    ("ifindex", "u4"),
    ("segs", "u2"),
    ("last_size", "u4"),
    ("tunnel_type", "u1"),
    ("tunnel_id", "u4"),
    ("outer_src_ip", "S16"),
    ("outer_dst_ip", "S16"),
]


def test_window_accumulator_gso_expansion_and_cuts():
    ev = np.zeros(
        3,
        dtype=WIN_RECORD,
    )
    ev["ts_ns"] = [0, 1_000_000, 2_000_000]
    ev["size"], ev["last_size"], ev["segs"] = [100, 1514, 60], [100, 500, 60], [1, 3, 1]
    ev["proto"], ev["ifindex"] = 6, 1
    pk = expand_segments(ev)
    assert pk["size"].tolist() == [100, 1514, 1514, 500, 60]
    acc = WindowAccumulator(packets=2, seconds=0, mono_to_unix_ns=0, ifnames={1: "x"})
    wins = acc.add(pk)
    assert [w["buffer_size"] for w in wins] == [2, 2]
    assert wins[0]["avg_packet_size"] == 807 and wins[1]["median_packet_size"] == 1007
    assert [w["buffer_size"] for w in acc.flush()] == [1]


def test_window_tunnel_columns_count_per_wire_packet():
    """A GSO record through a VXLAN tunnel stands for 3 tunnelled packets; wireguard is a
    label (an outer packet), counted in the distribution only."""
    from xdpml.datapath.abi import TUNNEL_TYPES

    vx, gre, wg = (TUNNEL_TYPES.index(t) for t in ("vxlan", "gre", "wireguard"))
    a, b, c = (bytes(15) + bytes([i]) for i in (1, 2, 3))
    ev = np.zeros(
        5,
        dtype=WIN_RECORD,
    )
    ev["ts_ns"] = [0, 1, 2, 3, 4]
    ev["size"] = ev["last_size"] = 100
    ev["segs"] = [3, 1, 1, 1, 1]
    ev["ifindex"] = 1
    ev["tunnel_type"] = [vx, vx, gre, 0, wg]
    ev["tunnel_id"] = [7, 8, 7, 0, 0]
    ev["outer_src_ip"] = [a, b, a, b"", b""]
    ev["outer_dst_ip"] = [c, c, c, b"", b""]
    (w,) = WindowAccumulator(packets=7, seconds=0, mono_to_unix_ns=0).add(expand_segments(ev))
    assert w["buffer_size"] == 7
    assert w["tunnel_packets"] == 5  # 3 segments + 1 vxlan + 1 gre
    assert w["unique_tunnel_ids"] == 3  # (vxlan, 7), (vxlan, 8), (gre, 7)
    assert (w["unique_outer_src_ips"], w["unique_outer_dst_ips"]) == (2, 1)
    assert json.loads(w["tunnel_distribution"]) == {"vxlan": 4, "gre": 1, "none": 1, "wireguard": 1}


def test_harvester_exports_quiet_flows_early_when_the_table_is_nearly_full():
    s = 1_000_000_000
    n = 10
    recs = [record([60], [], [0], []) for _ in range(n)]
    keys = np.concatenate([r[0] for r in recs])
    vals = np.concatenate([r[1] for r in recs])
    keys["lo_port"] = np.arange(n)
    now = 5000 * s
    quiet_s = np.array([0, 0.5, 3, 5, 8, 9, 20, 30, 60, 100])  # all below the 120 s idle timeout
    vals["first_ns"] = now - 200 * s
    vals["last_ns"] = now - (quiet_s * s).astype(np.int64)
    relaxed = Harvester(
        FakeTable(keys.copy(), vals.copy()), settings=HarvestSettings(), first_n=4, mono_to_unix_ns=0, capacity=100
    )
    assert relaxed.scan(now) is None  # 10% full: nothing is due
    full = Harvester(
        FakeTable(keys.copy(), vals.copy()), settings=HarvestSettings(), first_n=4, mono_to_unix_ns=0, capacity=10
    )
    b = full.scan(now)
    # 100% > 90%: flows quiet for >= 120/16 = 7.5 s leave early, as idle
    assert sorted(b["src_port"].tolist()) == [4, 5, 6, 7, 8, 9]
    assert set(b["expiration_id"].tolist()) == {0} and full.pressure_scans == 1
