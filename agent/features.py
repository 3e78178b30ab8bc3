"""Pure, vectorised feature computation: raw kernel records -> ColumnBatch.

No I/O, no kernel: numpy structured arrays in (as xdpml/datapath/abi.py describes
them), typed columns out. Every column is documented by its ColumnSpec; the
same table renders docs/features.md (``python -m xdpml.agent.features --markdown``).

Conventions (also in docs/features.md):
  * packet sizes ("ps") are L2 frame bytes as on the wire, without FCS;
  * flow standard deviations are *sample* deviations (n-1), as NFStream;
    window standard deviations are *population* deviations (n), as seed 000;
  * the first inter-arrival time of a flow is 0 in splt_piat_ms, and there are
    packets-1 inter-arrival times per direction (none for a single packet: 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from xdpml.agent.observations import seen_on_single

from xdpml.datapath.abi import TUNNEL_TYPES
from xdpml.wire.columns import ColumnBatch, ColumnSpec

DIRS = ("bidirectional", "src2dst", "dst2src")
FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")  # TCP header bit order
EXPIRATION = {"idle": 0, "active": 1, "tcp_end": 2, "early": 3, "agent_stop": -1}


TUNNEL_SPECS = (
    ColumnSpec(
        "tunnel_type",
        "O",
        "",
        "tunnel the flow's packets were decapsulated from (the outermost): none, vxlan, geneve, ipip (4in4), "
        "6in4, 4in6, 6in6, gre, gretap, gtpu; or an encrypted tunnel kept as the outer flow: wireguard, esp",
        "key",
    ),
    ColumnSpec(
        "tunnel_id",
        "u4",
        "",
        "VXLAN/Geneve VNI, GRE key, GTP-U TEID or ESP SPI of the flow's first packet; 0 if none",
        "key",
    ),
    ColumnSpec(
        "outer_src_ip",
        "S16",
        "",
        "outer (tunnel) source address of the flow's first packet; 16 bytes, IPv4 mapped; all zero if not decapsulated",
        "key",
    ),
    ColumnSpec("outer_dst_ip", "S16", "", "outer (tunnel) destination address of the flow's first packet", "key"),
)


def _flow_specs() -> dict[str, ColumnSpec]:
    s: list[ColumnSpec] = [
        ColumnSpec(
            "src_ip", "S16", "", "initiator address (side of the first packet seen); 16 bytes, IPv4 mapped", "key"
        ),
        ColumnSpec("dst_ip", "S16", "", "responder address", "key"),
        ColumnSpec("src_port", "u2", "", "initiator port (0 for ICMP and protocols without ports)", "key"),
        ColumnSpec("dst_port", "u2", "", "responder port", "key"),
        ColumnSpec("protocol", "u1", "", "IP protocol number", "key"),
        ColumnSpec("ip_version", "u1", "", "4 or 6", "key"),
        ColumnSpec("vlan_id", "u2", "", "outermost 802.1Q VLAN id, 0 untagged", "key"),
        ColumnSpec(
            "ifindex",
            "u4",
            "",
            "index of the interface whose counts the record reports (the preferred observation point)",
            "key",
        ),
        ColumnSpec("interface", "O", "", "name of that interface", "key"),
        ColumnSpec(
            "seen_on",
            "O",
            "",
            "every interface of the node the conversation was seen on, as ifname:direction "
            "(ingress, egress or ingress+egress: how the initiator's packets crossed it), space separated, "
            "in the order its first packet reached them; one entry with --record-per interface",
            "key",
        ),
        ColumnSpec("observation_points", "u1", "", "entries in seen_on", "key"),
        *TUNNEL_SPECS,
        ColumnSpec(
            "expiration_id",
            "i1",
            "",
            "why the flow was exported: 0 idle timeout, 1 active timeout, 2 TCP FIN/RST, "
            "3 early snapshot (the flow goes on), -1 agent stop",
            "time",
        ),
    ]
    for d in DIRS:
        s += [
            ColumnSpec(f"{d}_first_seen_ms", "u8", "ms", f"Unix time of the first {d} packet", "time"),
            ColumnSpec(f"{d}_last_seen_ms", "u8", "ms", f"Unix time of the last {d} packet", "time"),
        ]
    for d in DIRS:
        who = {
            "bidirectional": "both directions",
            "src2dst": "initiator to responder",
            "dst2src": "responder to initiator",
        }[d]
        s += [
            ColumnSpec(f"{d}_duration_ms", "f8", "ms", f"last minus first packet time, {who}"),
            ColumnSpec(
                f"{d}_packets", "u8", "packets", f"packets, {who} (GSO super-packets count as their wire segments)"
            ),
            ColumnSpec(f"{d}_bytes", "u8", "bytes", f"L2 frame bytes, {who}"),
            ColumnSpec(f"{d}_min_ps", "f8", "bytes", f"smallest L2 frame, {who}"),
            ColumnSpec(f"{d}_mean_ps", "f8", "bytes", f"mean L2 frame size, {who}"),
            ColumnSpec(
                f"{d}_stddev_ps",
                "f8",
                "bytes",
                f"sample standard deviation of L2 frame size, {who} (0 below 2 packets)",
            ),
            ColumnSpec(f"{d}_max_ps", "f8", "bytes", f"largest L2 frame, {who}"),
            ColumnSpec(f"{d}_min_piat_ms", "f8", "ms", f"smallest packet inter-arrival time, {who}"),
            ColumnSpec(f"{d}_mean_piat_ms", "f8", "ms", f"mean packet inter-arrival time, {who}"),
            ColumnSpec(
                f"{d}_stddev_piat_ms",
                "f8",
                "ms",
                f"sample standard deviation (n-1) of the packets-1 inter-arrival times, {who}, "
                f"from ns sums (0 below 3 packets)",
            ),
            ColumnSpec(f"{d}_max_piat_ms", "f8", "ms", f"largest packet inter-arrival time, {who}"),
        ]
        s += [
            ColumnSpec(f"{d}_{f}_packets", "u4", "packets", f"TCP packets with {f.upper()} set, {who}") for f in FLAGS
        ]
    for d in ("src2dst", "dst2src"):
        s += [
            ColumnSpec(f"{d}_init_window", "u2", "bytes", f"TCP window field of the first {d} packet (unscaled)"),
            ColumnSpec(f"{d}_ttl", "u1", "hops", f"IPv4 TTL / IPv6 hop limit of the first {d} packet"),
            ColumnSpec(
                f"{d}_tos", "u1", "", f"IPv4 ToS / IPv6 traffic class of the first {d} packet (DSCP = tos >> 2)"
            ),
        ]
    s += [
        ColumnSpec("bps", "f8", "bytes/packet", "seed 002 'bps': bidirectional bytes per packet"),
        ColumnSpec("pps", "f8", "packets/s", "bidirectional packets per second of duration (0 when duration is 0)"),
        ColumnSpec("log_bytes", "f8", "", "log1p(bidirectional_bytes)"),
        ColumnSpec("log_packets", "f8", "", "log1p(bidirectional_packets)"),
        ColumnSpec("tcp_flags", "u1", "", "bitwise OR of the TCP flags of every packet"),
    ]
    for side in ("src", "dst"):
        s += [
            ColumnSpec(f"{side}_port_low", "?", "", f"{side}_port < 1024"),
            ColumnSpec(f"{side}_port_mid", "?", "", f"1024 <= {side}_port < 49152"),
            ColumnSpec(f"{side}_port_high", "?", "", f"{side}_port >= 49152"),
        ]
    s += [
        ColumnSpec(
            "splt_direction", "i1", "", "first N packets: 0 initiator->responder, 1 reverse; -1 unused", "sequence", -1
        ),
        ColumnSpec("splt_ps", "i4", "bytes", "first N packets: L2 frame size; -1 unused", "sequence", -1),
        ColumnSpec(
            "splt_piat_ms",
            "f8",
            "ms",
            "first N packets: time since the previous packet of the flow (0 for the first); -1 unused",
            "sequence",
            -1,
        ),
        ColumnSpec("splt_flags", "i2", "", "first N packets: TCP flags byte; -1 unused", "sequence", -1),
        ColumnSpec(
            "model_class",
            "i2",
            "",
            "class the kernel's model gave the flow's last classified packet (docs/models.md); -1 none",
            "meta",
        ),
        ColumnSpec("model_id", "u4", "", "model_id of the kernel model that gave model_class; 0 none", "meta"),
    ]
    return {c.name: c for c in s}


FLOW_SPECS = _flow_specs()
# enum xdpml_tunnel -> name (xdpml/datapath/abi.py TUNNEL_TYPES), and "unknown" past its end
_TUNNEL_NAMES = np.array([*TUNNEL_TYPES, "unknown"], dtype=object)


def _ips(raw: np.ndarray) -> np.ndarray:
    """(n,16) uint8 -> (n,) S16 without copying twice."""
    return np.ascontiguousarray(raw, dtype=np.uint8).view("S16").reshape(-1)


def _names(ifindex: np.ndarray, names: Mapping[int, str]) -> np.ndarray:
    """ifindex column -> interface name column, one dictionary lookup per distinct index
    (interface indexes are small: a table indexed by them, no sort)."""
    if not len(ifindex):
        return np.zeros(0, dtype=object)
    idx = ifindex.astype(np.int64)
    top = int(idx.max())
    if top >= 1 << 20:  # not an interface index table any more: sort instead
        uniq, inv = np.unique(idx, return_inverse=True)
        return np.array([names.get(int(i), str(int(i))) for i in uniq], dtype=object)[inv]
    table = np.empty(top + 1, dtype=object)
    for i in np.flatnonzero(np.bincount(idx, minlength=top + 1)):
        table[i] = names.get(int(i), str(int(i)))
    return table[idx]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _sample_std(n: np.ndarray, total: np.ndarray, sumsq: np.ndarray) -> np.ndarray:
    """Sample standard deviation from count, sum and sum of squares (0 for n < 2)."""
    n = n.astype(np.float64)
    total = total.astype(np.float64)
    # sum((x - mean)^2) = sumsq - total^2 / n, divided by n - 1
    var = sumsq.astype(np.float64) - total * total / np.maximum(n, 1.0)
    var /= np.maximum(n - 1.0, 1.0)
    np.maximum(var, 0.0, out=var)  # rounding can leave a tiny negative
    var[n < 2] = 0.0
    return np.sqrt(var, out=var)


def _iat_columns(prefix: str, n_iat: np.ndarray, sum_ns, sumsq_lo, sumsq_hi, min_ns, max_ns, cols: dict) -> None:
    has = n_iat > 0
    cols[f"{prefix}_min_piat_ms"] = np.where(has, min_ns / 1e6, 0.0)
    cols[f"{prefix}_mean_piat_ms"] = _safe_div(sum_ns, n_iat) / 1e6
    # the kernel sums gaps in ns and their squares in ns^2 as a 128-bit number (hi, lo)
    sumsq_ns2 = sumsq_hi.astype(np.float64) * 18446744073709551616.0 + sumsq_lo.astype(np.float64)
    cols[f"{prefix}_stddev_piat_ms"] = _sample_std(n_iat, sum_ns, sumsq_ns2) / 1e6
    cols[f"{prefix}_max_piat_ms"] = np.where(has, max_ns / 1e6, 0.0)


def flow_columns(
    keys: np.ndarray,
    values: np.ndarray,
    *,
    expiration: np.ndarray,
    mono_to_unix_ns: int,
    ifnames: Mapping[int, str] | None = None,
    first_n: int,
    seen_on: np.ndarray | None = None,
    observation_points: np.ndarray | None = None,
) -> ColumnBatch:
    """Flow table records (abi.FlowKey / flow_types(first_n).value arrays) -> flow features.
    ``seen_on``/``observation_points``: the records' observation points when they stand
    for merged conversations (xdpml.agent.observations.merge); default, each its own."""
    n = len(keys)
    cols: dict[str, np.ndarray] = {}
    init = values["init_lo_to_hi"].astype(bool)
    lo, hi = _ips(keys["lo_ip"]), _ips(keys["hi_ip"])
    cols["src_ip"] = np.where(init, lo, hi).astype("S16")
    cols["dst_ip"] = np.where(init, hi, lo).astype("S16")
    cols["src_port"] = np.where(init, keys["lo_port"], keys["hi_port"]).astype(np.uint16)
    cols["dst_port"] = np.where(init, keys["hi_port"], keys["lo_port"]).astype(np.uint16)
    cols["protocol"] = keys["proto"].astype(np.uint8)
    cols["ip_version"] = keys["ip_version"].astype(np.uint8)
    cols["vlan_id"] = keys["vlan_id"].astype(np.uint16)
    cols["ifindex"] = keys["ifindex"].astype(np.uint32)
    cols["interface"] = _names(cols["ifindex"], ifnames or {})
    if seen_on is None:
        seen_on = seen_on_single(keys, values, ifnames or {})
        observation_points = np.ones(n, dtype=np.uint8)
    cols["seen_on"] = np.asarray(seen_on, dtype=object)
    cols["observation_points"] = np.asarray(observation_points, dtype=np.uint8)
    ttype = values["tunnel_type"].astype(np.int64)
    cols["tunnel_type"] = _TUNNEL_NAMES[np.minimum(ttype, len(_TUNNEL_NAMES) - 1)]
    cols["tunnel_id"] = values["tunnel_id"].astype(np.uint32)
    cols["outer_src_ip"] = _ips(values["outer_src_ip"]).astype("S16")
    cols["outer_dst_ip"] = _ips(values["outer_dst_ip"]).astype("S16")
    cols["expiration_id"] = np.broadcast_to(np.asarray(expiration, dtype=np.int8), (n,)).copy()

    d = values["dir"]  # (n, 2) DirStats
    s2d, d2s = d[:, 0], d[:, 1]

    def unix_ms(mono: np.ndarray, present: np.ndarray) -> np.ndarray:
        return np.where(present, (mono.astype(np.int64) + mono_to_unix_ns) // 1_000_000, 0).astype(np.uint64)

    pk = {"src2dst": s2d["packets"], "dst2src": d2s["packets"]}
    pk["bidirectional"] = pk["src2dst"] + pk["dst2src"]
    first = {"src2dst": s2d["first_ns"], "dst2src": d2s["first_ns"], "bidirectional": values["first_ns"]}
    last = {"src2dst": s2d["last_ns"], "dst2src": d2s["last_ns"], "bidirectional": values["last_ns"]}
    for name in DIRS:
        present = pk[name] > 0
        cols[f"{name}_first_seen_ms"] = unix_ms(first[name], present)
        cols[f"{name}_last_seen_ms"] = unix_ms(last[name], present)

    for name, st in (("src2dst", s2d), ("dst2src", d2s)):
        p = st["packets"]
        present = p > 0
        cols[f"{name}_duration_ms"] = np.where(present, (st["last_ns"] - st["first_ns"]) / 1e6, 0.0)
        cols[f"{name}_packets"] = p.astype(np.uint64)
        cols[f"{name}_bytes"] = st["bytes"].astype(np.uint64)
        cols[f"{name}_min_ps"] = st["size_min"].astype(np.float64)
        cols[f"{name}_mean_ps"] = _safe_div(st["bytes"], p)
        cols[f"{name}_stddev_ps"] = _sample_std(p, st["bytes"], st["size_sumsq"])
        cols[f"{name}_max_ps"] = st["size_max"].astype(np.float64)
        n_iat = np.where(present, p - 1, 0)
        _iat_columns(
            name,
            n_iat,
            st["iat_sum_ns"],
            st["iat_sumsq_lo"],
            st["iat_sumsq_hi"],
            st["iat_min_ns"],
            st["iat_max_ns"],
            cols,
        )
        for i, f in enumerate(FLAGS):
            cols[f"{name}_{f}_packets"] = st["flag_count"][:, i].astype(np.uint32)

    b = "bidirectional"
    p = pk[b]
    byts = s2d["bytes"] + d2s["bytes"]
    cols[f"{b}_duration_ms"] = np.where(p > 0, (values["last_ns"] - values["first_ns"]) / 1e6, 0.0)
    cols[f"{b}_packets"] = p.astype(np.uint64)
    cols[f"{b}_bytes"] = byts.astype(np.uint64)
    both = (s2d["packets"] > 0) & (d2s["packets"] > 0)
    mins = np.where(
        both,
        np.minimum(s2d["size_min"], d2s["size_min"]),
        np.where(s2d["packets"] > 0, s2d["size_min"], d2s["size_min"]),
    )
    cols[f"{b}_min_ps"] = mins.astype(np.float64)
    cols[f"{b}_mean_ps"] = _safe_div(byts, p)
    cols[f"{b}_stddev_ps"] = _sample_std(p, byts, s2d["size_sumsq"] + d2s["size_sumsq"])
    cols[f"{b}_max_ps"] = np.maximum(s2d["size_max"], d2s["size_max"]).astype(np.float64)
    iat = values["iat"]
    _iat_columns(
        b,
        np.where(p > 0, p - 1, 0),
        iat["sum_ns"],
        iat["sumsq_lo"],
        iat["sumsq_hi"],
        iat["min_ns"],
        iat["max_ns"],
        cols,
    )
    for f in FLAGS:
        cols[f"{b}_{f}_packets"] = cols[f"src2dst_{f}_packets"] + cols[f"dst2src_{f}_packets"]

    for name, st in (("src2dst", s2d), ("dst2src", d2s)):
        cols[f"{name}_init_window"] = st["init_window"].astype(np.uint16)
        cols[f"{name}_ttl"] = st["ttl"].astype(np.uint8)
        cols[f"{name}_tos"] = st["tos"].astype(np.uint8)

    dur_s = cols[f"{b}_duration_ms"] / 1e3
    cols["bps"] = _safe_div(byts, p)
    cols["pps"] = _safe_div(p, dur_s)
    cols["log_bytes"] = np.log1p(byts.astype(np.float64))
    cols["log_packets"] = np.log1p(p.astype(np.float64))
    cols["tcp_flags"] = values["tcp_flags_or"].astype(np.uint8)
    for side in ("src", "dst"):
        port = cols[f"{side}_port"]
        cols[f"{side}_port_low"] = port < 1024
        cols[f"{side}_port_mid"] = (port >= 1024) & (port < 49152)
        cols[f"{side}_port_high"] = port >= 49152

    N = first_n
    if N > 0:
        seq = values["seq"]  # (n, N)
        valid = np.arange(N)[None, :] < values["n_seq"][:, None]
        # widen to signed types first: -1 must not wrap to 255/65535 in unsigned fields
        cols["splt_direction"] = np.where(valid, seq["dir"].astype(np.int8), np.int8(-1))
        cols["splt_ps"] = np.where(valid, seq["size"].astype(np.int32), np.int32(-1))
        cols["splt_piat_ms"] = np.where(valid, seq["piat_us"] / 1e3, -1.0)
        cols["splt_flags"] = np.where(valid, seq["flags"].astype(np.int16), np.int16(-1))
    else:
        for name in ("splt_direction", "splt_ps", "splt_piat_ms", "splt_flags"):
            cols[name] = np.zeros((n, 0), dtype=np.dtype(FLOW_SPECS[name].dtype))

    cols["model_class"] = values["model_class"].astype(np.int16) - 1
    cols["model_id"] = values["model_id"].astype(np.uint32)
    ordered = {name: cols[name] for name in FLOW_SPECS}
    return ColumnBatch("flow", ordered, FLOW_SPECS)


# ---------------------------------------------------------------------------
# Window features (seed 000), over every packet


WINDOW_SPECS = {
    c.name: c
    for c in [
        ColumnSpec("interface", "O", "", "interface the window's packets were seen on", "key"),
        ColumnSpec("buffer_size", "u4", "packets", "packets in the window"),
        ColumnSpec("timestamp_start", "f8", "s", "Unix time of the window's first packet", "time"),
        ColumnSpec("timestamp_end", "f8", "s", "Unix time of the window's last packet", "time"),
        ColumnSpec("duration_ms", "f8", "ms", "last minus first packet time"),
        ColumnSpec("avg_packet_size", "f8", "bytes", "mean L2 frame size"),
        ColumnSpec("min_packet_size", "f8", "bytes", "smallest L2 frame"),
        ColumnSpec("max_packet_size", "f8", "bytes", "largest L2 frame"),
        ColumnSpec("std_packet_size", "f8", "bytes", "population standard deviation of L2 frame size"),
        ColumnSpec(
            "median_packet_size", "f8", "bytes", "median L2 frame size (mean of the middle two for even counts)"
        ),
        ColumnSpec("avg_inter_arrival_ms", "f8", "ms", "mean of the buffer_size-1 inter-arrival times"),
        ColumnSpec("min_inter_arrival_ms", "f8", "ms", "smallest inter-arrival time"),
        ColumnSpec("max_inter_arrival_ms", "f8", "ms", "largest inter-arrival time"),
        ColumnSpec("std_inter_arrival_ms", "f8", "ms", "population standard deviation of inter-arrival times"),
        ColumnSpec("total_payload", "u8", "bytes", "L4 payload bytes (IP length minus IP and L4 headers)"),
        ColumnSpec("avg_payload", "f8", "bytes", "mean L4 payload per packet"),
        ColumnSpec("unique_src_ips", "u4", "", "distinct source addresses"),
        ColumnSpec("unique_dst_ips", "u4", "", "distinct destination addresses"),
        ColumnSpec("unique_src_ports", "u4", "", "distinct source ports"),
        ColumnSpec("unique_dst_ports", "u4", "", "distinct destination ports"),
        ColumnSpec("proto_tcp", "u4", "packets", "TCP packets"),
        ColumnSpec("proto_udp", "u4", "packets", "UDP packets"),
        ColumnSpec("proto_icmp", "u4", "packets", "ICMP and ICMPv6 packets"),
        ColumnSpec("proto_other", "u4", "packets", "packets of other IP protocols"),
        ColumnSpec("protocol_distribution", "O", "", "JSON object text: IP protocol number -> packets"),
        # a window mixes many flows, so its tunnel columns are counts, like its address columns
        ColumnSpec(
            "tunnel_packets",
            "u4",
            "packets",
            "packets decapsulated from a tunnel (not the wireguard / esp labelled ones: tunnel_distribution)",
        ),
        ColumnSpec("unique_tunnel_ids", "u4", "", "distinct (tunnel_type, tunnel_id) pairs among the tunnel_packets"),
        ColumnSpec("unique_outer_src_ips", "u4", "", "distinct outer (tunnel) source addresses of the tunnel_packets"),
        ColumnSpec("unique_outer_dst_ips", "u4", "", "distinct outer (tunnel) destination addresses"),
        ColumnSpec("tunnel_distribution", "O", "", "JSON object text: tunnel_type -> packets, none included"),
    ]
}

WIN_FIELDS = ("ts_ns", "size", "payload", "proto", "src_ip", "dst_ip", "src_port", "dst_port", "ifindex")
_WIN_ROW = [
    ("ts_ns", "u8"),
    ("size", "u4"),
    ("payload", "u4"),
    ("proto", "u1"),
    ("src_ip", "S16"),
    ("dst_ip", "S16"),
    ("src_port", "u2"),
    ("dst_port", "u2"),
    ("ifindex", "u4"),
    ("tunnel_type", "u1"),
    ("tunnel_id", "u4"),
    ("outer_src_ip", "S16"),
    ("outer_dst_ip", "S16"),
]


def expand_segments(ev: np.ndarray) -> np.ndarray:
    """Window records -> one row per wire packet (a GSO record stands for segs packets:
    segs-1 of `size` bytes then one of `last_size`, all at the record's time)."""
    segs = np.maximum(ev["segs"].astype(np.int64), 1)
    if np.all(segs == 1):
        out = ev
        sizes = ev["size"]
    else:
        idx = np.repeat(np.arange(len(ev)), segs)
        out = ev[idx]
        # position of each row inside its record: last one gets last_size
        ends = np.cumsum(segs) - 1
        is_last = np.zeros(len(out), dtype=bool)
        is_last[ends] = True
        sizes = np.where(is_last, out["last_size"], out["size"])
    res = np.zeros(len(out), dtype=_WIN_ROW)
    res["size"] = sizes
    for name in ("ts_ns", "payload", "proto", "src_port", "dst_port", "ifindex", "tunnel_type", "tunnel_id"):
        res[name] = out[name]
    for name in ("src_ip", "dst_ip", "outer_src_ip", "outer_dst_ip"):
        res[name] = _ips(out[name]) if out[name].dtype != np.dtype("S16") else out[name]
    return res


def window_row(pk: np.ndarray, *, interface: str, mono_to_unix_ns: int) -> dict:
    """Seed 000's features over one window of packets (rows of expand_segments)."""
    n = len(pk)
    sizes = pk["size"].astype(np.float64)
    ts = pk["ts_ns"].astype(np.int64)
    iat = np.diff(ts) / 1e6 if n > 1 else np.zeros(0)
    proto = pk["proto"]
    dist = {int(p): int(c) for p, c in zip(*np.unique(proto, return_counts=True))}
    payload = pk["payload"].astype(np.uint64)
    return {
        "interface": interface,
        "buffer_size": n,
        "timestamp_start": (ts[0] + mono_to_unix_ns) / 1e9,
        "timestamp_end": (ts[-1] + mono_to_unix_ns) / 1e9,
        "duration_ms": (ts[-1] - ts[0]) / 1e6,
        "avg_packet_size": sizes.mean(),
        "min_packet_size": sizes.min(),
        "max_packet_size": sizes.max(),
        "std_packet_size": sizes.std(),
        "median_packet_size": float(np.median(sizes)),
        "avg_inter_arrival_ms": iat.mean() if len(iat) else 0.0,
        "min_inter_arrival_ms": iat.min() if len(iat) else 0.0,
        "max_inter_arrival_ms": iat.max() if len(iat) else 0.0,
        "std_inter_arrival_ms": iat.std() if len(iat) else 0.0,
        "total_payload": int(payload.sum()),
        "avg_payload": float(payload.mean()),
        "unique_src_ips": len(np.unique(pk["src_ip"])),
        "unique_dst_ips": len(np.unique(pk["dst_ip"])),
        "unique_src_ports": len(np.unique(pk["src_port"])),
        "unique_dst_ports": len(np.unique(pk["dst_port"])),
        "proto_tcp": int(np.sum(proto == 6)),
        "proto_udp": int(np.sum(proto == 17)),
        "proto_icmp": int(np.sum((proto == 1) | (proto == 58))),
        "proto_other": int(np.sum(~np.isin(proto, (1, 6, 17, 58)))),
        "protocol_distribution": json.dumps(dist, sort_keys=True),
        **_window_tunnels(pk),
    }


_ENCRYPTED = TUNNEL_TYPES.index("wireguard")  # this type and later ones are labels, not decapsulated


def _window_tunnels(pk: np.ndarray) -> dict:
    ttype = pk["tunnel_type"]
    tun = pk[(ttype != 0) & (ttype < _ENCRYPTED)]
    names = _TUNNEL_NAMES[np.minimum(ttype.astype(np.int64), len(_TUNNEL_NAMES) - 1)]
    kinds, counts = np.unique(names.astype(str), return_counts=True)
    return {
        "tunnel_packets": len(tun),
        "unique_tunnel_ids": len(np.unique(tun[["tunnel_type", "tunnel_id"]])),
        "unique_outer_src_ips": len(np.unique(tun["outer_src_ip"])),
        "unique_outer_dst_ips": len(np.unique(tun["outer_dst_ip"])),
        "tunnel_distribution": json.dumps({str(k): int(c) for k, c in zip(kinds, counts)}, sort_keys=True),
    }


def window_batch(rows: list[dict]) -> ColumnBatch:
    cols = {}
    for name, spec in WINDOW_SPECS.items():
        cols[name] = np.array([r[name] for r in rows], dtype=object if spec.dtype == "O" else spec.dtype)
    return ColumnBatch("window", cols, WINDOW_SPECS)


class WindowAccumulator:
    """Cuts the packet stream of each interface into tumbling windows of N packets
    and/or T seconds (whichever closes first). Keeps only the open window."""

    def __init__(self, *, packets: int, seconds: float, mono_to_unix_ns: int, ifnames: Mapping[int, str] | None = None):
        self.packets = packets
        self.span_ns = int(seconds * 1e9)
        self.mono_to_unix_ns = mono_to_unix_ns
        self.ifnames = ifnames or {}
        self._open: dict[int, list[np.ndarray]] = {}

    def add(self, pk: np.ndarray) -> list[dict]:
        """Add packets (expand_segments rows, time ordered per interface); return closed windows."""
        out: list[dict] = []
        for ifx in np.unique(pk["ifindex"]):
            rows = pk[pk["ifindex"] == ifx]
            pending = self._open.pop(int(ifx), [])
            buf = np.concatenate(pending + [rows]) if pending else rows
            buf = buf[np.argsort(buf["ts_ns"], kind="stable")]
            start = 0
            while start < len(buf):
                end = len(buf)
                if self.packets:
                    end = min(end, start + self.packets)
                if self.span_ns:
                    limit = buf["ts_ns"][start] + self.span_ns
                    end = min(end, start + int(np.searchsorted(buf["ts_ns"][start:], limit, side="left")))
                full = (self.packets and end - start == self.packets) or (self.span_ns and end < len(buf))
                if not full:
                    break
                out.append(window_row(buf[start:end], interface=self._name(ifx), mono_to_unix_ns=self.mono_to_unix_ns))
                start = end
            if start < len(buf):
                self._open[int(ifx)] = [buf[start:]]
        return out

    def expire(self, now_ns: int) -> list[dict]:
        """Close time windows whose span has passed even if no later packet came."""
        out = []
        if not self.span_ns:
            return out
        for ifx, pending in list(self._open.items()):
            buf = pending[0]
            if now_ns - int(buf["ts_ns"][0]) >= self.span_ns:
                out.append(window_row(buf, interface=self._name(ifx), mono_to_unix_ns=self.mono_to_unix_ns))
                del self._open[ifx]
        return out

    def flush(self) -> list[dict]:
        """Close every open window (agent stop): partial windows are still reported."""
        out = [
            window_row(p[0], interface=self._name(ifx), mono_to_unix_ns=self.mono_to_unix_ns)
            for ifx, p in self._open.items()
            if len(p[0])
        ]
        self._open.clear()
        return out

    def _name(self, ifx) -> str:
        return self.ifnames.get(int(ifx), str(int(ifx)))


# ---------------------------------------------------------------------------
# Per-packet features (seed 001 schema + seed 004 header fields), sampled


PACKET_SPECS = {
    c.name: c
    for c in [
        ColumnSpec("timestamp_ns", "u8", "ns", "Unix time the packet was seen", "time"),
        ColumnSpec("interface", "O", "", "interface name", "key"),
        ColumnSpec("hook", "O", "", "xdp, tc_ingress or tc_egress", "key"),
        ColumnSpec("src_ip", "S16", "", "source address (IPv4 mapped)", "key"),
        ColumnSpec("dst_ip", "S16", "", "destination address", "key"),
        ColumnSpec("ip_version", "u1", "", "4 or 6"),
        ColumnSpec("protocol", "u1", "", "IP protocol number"),
        ColumnSpec("pr_tcp", "?", "", "protocol is TCP"),
        ColumnSpec("pr_udp", "?", "", "protocol is UDP"),
        ColumnSpec("pr_icmp", "?", "", "protocol is ICMP or ICMPv6"),
        ColumnSpec("pr_other", "?", "", "any other protocol"),
        *[ColumnSpec(f"tcp_{f}", "?", "", f"TCP {f.upper()} flag") for f in FLAGS],
        ColumnSpec("src_port", "u2", "", "source port (0 without ports)"),
        ColumnSpec("src_port_low", "?", "", "src_port < 1024"),
        ColumnSpec("src_port_mid", "?", "", "1024 <= src_port < 49152"),
        ColumnSpec("src_port_high", "?", "", "src_port >= 49152"),
        ColumnSpec("dst_port", "u2", "", "destination port"),
        ColumnSpec("dst_port_low", "?", "", "dst_port < 1024"),
        ColumnSpec("dst_port_mid", "?", "", "1024 <= dst_port < 49152"),
        ColumnSpec("dst_port_high", "?", "", "dst_port >= 49152"),
        ColumnSpec("pkt_len", "u4", "bytes", "L2 frame bytes (a GSO super-packet's whole length; see segs)"),
        ColumnSpec("payload_len", "u2", "bytes", "L4 payload bytes"),
        ColumnSpec("tos", "u1", "", "IPv4 ToS / IPv6 traffic class"),
        ColumnSpec("ip_dscp", "u1", "", "tos >> 2"),
        ColumnSpec("ip_ihl", "u1", "words", "IPv4 header length in 32-bit words (0 for IPv6)"),
        ColumnSpec("ip_total_length", "u2", "bytes", "IPv4 total length / IPv6 payload length + 40"),
        ColumnSpec("ip_frag_offset", "u2", "8 bytes", "fragment offset (flags masked off)"),
        ColumnSpec("ip_flags", "u1", "", "IPv4 flags: 2 DF, 1 MF"),
        ColumnSpec("ip_id", "u2", "", "IPv4 identification"),
        ColumnSpec("ip_ttl", "u1", "hops", "TTL / hop limit"),
        ColumnSpec("tcp_sequence_num", "u4", "", "TCP sequence number"),
        ColumnSpec("tcp_ack_num", "u4", "", "TCP acknowledgement number"),
        ColumnSpec("tcp_window_size", "u2", "", "TCP window field (unscaled)"),
        ColumnSpec("tcp_urgent_pointer", "u2", "", "TCP urgent pointer"),
        ColumnSpec("vlan_id", "u2", "", "outermost VLAN id, 0 untagged"),
        ColumnSpec("segs", "u2", "packets", "wire segments this record stands for (GSO), 1 normally"),
        *(
            ColumnSpec(c.name, c.dtype, c.unit, doc, "key")
            for c, doc in zip(
                TUNNEL_SPECS,
                (
                    "tunnel the packet was decapsulated from (the header fields above then describe the inner "
                    "packet, pkt_len the outer frame), wireguard or esp (encrypted, not decapsulated); none",
                    "VXLAN/Geneve VNI, GRE key, GTP-U TEID or ESP SPI; 0 if none",
                    "outer (tunnel) source address, IPv4 mapped; all zero if not decapsulated",
                    "outer (tunnel) destination address",
                ),
                strict=True,
            )
        ),
    ]
}

HOOK_NAMES = np.array(["xdp", "tc_ingress", "tc_egress"], dtype=object)


def packet_columns(ev: np.ndarray, *, mono_to_unix_ns: int, ifnames: Mapping[int, str] | None = None) -> ColumnBatch:
    """abi.PktEvent records -> seed 001/004 per-packet features."""
    names = ifnames or {}
    proto = ev["proto"].astype(np.uint8)
    flags = ev["tcp_flags"].astype(np.uint8)
    is_tcp = proto == 6
    cols = {
        "timestamp_ns": (ev["ts_ns"].astype(np.int64) + mono_to_unix_ns).astype(np.uint64),
        "interface": _names(ev["ifindex"], names),
        "hook": HOOK_NAMES[np.minimum(ev["hook"], 2)],
        "src_ip": _ips(ev["src_ip"]).copy(),
        "dst_ip": _ips(ev["dst_ip"]).copy(),
        "ip_version": ev["ip_version"].astype(np.uint8),
        "protocol": proto,
        "pr_tcp": is_tcp,
        "pr_udp": proto == 17,
        "pr_icmp": (proto == 1) | (proto == 58),
        "pr_other": ~np.isin(proto, (1, 6, 17, 58)),
    }
    for i, f in enumerate(FLAGS):
        cols[f"tcp_{f}"] = is_tcp & ((flags >> i) & 1).astype(bool)
    for side in ("src", "dst"):
        port = ev[f"{side}_port"].astype(np.uint16)
        cols[f"{side}_port"] = port
        cols[f"{side}_port_low"] = port < 1024
        cols[f"{side}_port_mid"] = (port >= 1024) & (port < 49152)
        cols[f"{side}_port_high"] = port >= 49152
    v4 = ev["ip_version"] == 4
    frag = ev["frag_off"].astype(np.uint16)
    cols.update(
        {
            "pkt_len": ev["pkt_len"].astype(np.uint32),
            "payload_len": ev["payload_len"].astype(np.uint16),
            "tos": ev["tos"].astype(np.uint8),
            "ip_dscp": (ev["tos"] >> 2).astype(np.uint8),
            "ip_ihl": ev["ihl"].astype(np.uint8),
            "ip_total_length": ev["ip_len"].astype(np.uint16),
            "ip_frag_offset": np.where(v4, frag & 0x1FFF, frag >> 3).astype(np.uint16),
            "ip_flags": np.where(v4, (frag >> 13) & 0x3, frag & 1).astype(np.uint8),
            "ip_id": ev["ip_id"].astype(np.uint16),
            "ip_ttl": ev["ttl"].astype(np.uint8),
            "tcp_sequence_num": ev["tcp_seq"].astype(np.uint32),
            "tcp_ack_num": ev["tcp_ack"].astype(np.uint32),
            "tcp_window_size": ev["tcp_window"].astype(np.uint16),
            "tcp_urgent_pointer": ev["tcp_urg_ptr"].astype(np.uint16),
            "vlan_id": ev["vlan_id"].astype(np.uint16),
            "segs": np.maximum(ev["segs"], 1).astype(np.uint16),
            "tunnel_type": _TUNNEL_NAMES[np.minimum(ev["tunnel_type"].astype(np.int64), len(_TUNNEL_NAMES) - 1)],
            "tunnel_id": ev["tunnel_id"].astype(np.uint32),
            "outer_src_ip": _ips(ev["outer_src_ip"]).copy(),
            "outer_dst_ip": _ips(ev["outer_dst_ip"]).copy(),
        }
    )
    return ColumnBatch("packet", {k: cols[k] for k in PACKET_SPECS}, PACKET_SPECS)


def markdown() -> str:
    """docs/features.md body, rendered from the specs above."""
    out = []
    for title, specs in (
        ("Flow features (`kind: flow`)", FLOW_SPECS),
        ("Window features (`kind: window`, `-w N` / `--window-seconds T`)", WINDOW_SPECS),
        ("Per-packet features (`kind: packet`, `--sample N`)", PACKET_SPECS),
    ):
        out.append(f"## {title}\n\n| column | type | unit | meaning |\n|---|---|---|---|")
        for s in specs.values():
            typ = {"O": "string", "S16": "ip (16 bytes)", "?": "bool"}.get(s.dtype, np.dtype(s.dtype).name)
            if s.role == "sequence":
                typ += "[N]"
            out.append(f"| `{s.name}` | {typ} | {s.unit} | {s.doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
