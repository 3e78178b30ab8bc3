"""Synthetic flow batches with the agent's full flow schema, for tests and benchmarks.

The values are plausible, not measured: normal TCP sessions (handshake, data, FIN),
DNS-like UDP pairs and ICMP echo pairs; a port scan (one SYN answered by a RST per
port); a SYN flood (one unanswered SYN per spoofed source port). Counters obey the
identities a real agent's do (bidirectional = src2dst + dst2src, bps = bytes/packets),
so a model trained on them learns the same relations it would on real flows.
"""
from __future__ import annotations

import numpy as np

from xdpml.wire.columns import V4_MAPPED_PREFIX, ColumnBatch, ColumnSpec

FLAGS = ("syn", "cwr", "ece", "urg", "ack", "psh", "rst", "fin")
DIRS = ("bidirectional", "src2dst", "dst2src")
FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20, "ece": 0x40, "cwr": 0x80}


def _ipv4(rng: np.random.Generator, n: int, base: tuple[int, int, int, int], spread: int) -> np.ndarray:
    out = np.empty(n, dtype="S16")
    raw = np.zeros((n, 16), dtype=np.uint8)
    raw[:, :12] = np.frombuffer(V4_MAPPED_PREFIX, dtype=np.uint8)
    raw[:, 12:] = base
    raw[:, 15] = (base[3] + rng.integers(0, max(1, spread), n)) % 256
    out[:] = raw.view("S16").reshape(n)
    return out


def flow_batch(n: int, *, kind: str = "normal", seed: int = 0, first_n: int = 10,
               start_ms: int = 1_700_000_000_000) -> ColumnBatch:
    """``n`` flows of one traffic ``kind``: normal | portscan | synflood."""
    rng = np.random.default_rng(seed)
    proto = np.full(n, 6, dtype=np.uint8)
    if kind == "normal":
        r = rng.random(n)
        proto[r < 0.25] = 17
        proto[r > 0.92] = 1
        tcp = proto == 6
        s_pk = np.where(tcp, rng.integers(4, 60, n), 1).astype(np.uint64)
        d_pk = np.where(tcp, np.maximum(3, (s_pk * rng.uniform(0.6, 1.4, n)).astype(np.uint64)), 1).astype(np.uint64)
        s_mean = np.where(tcp, rng.uniform(60, 400, n), np.where(proto == 17, rng.uniform(60, 90, n), 98.0))
        d_mean = np.where(tcp, rng.uniform(80, 1400, n), np.where(proto == 17, rng.uniform(90, 300, n), 98.0))
        dur = np.where(tcp, rng.lognormal(5, 1.5, n), rng.uniform(0.2, 40, n))
        dst_port = np.where(tcp, rng.choice([80, 443, 8080, 5432, 6379], n), np.where(proto == 17, 53, 0))
        src_port = np.where(proto == 1, 0, rng.integers(32768, 61000, n))
        syn_s = np.where(tcp, 1, 0)
        syn_d = np.where(tcp, 1, 0)
        ack_s = np.where(tcp, s_pk - 1, 0)
        ack_d = np.where(tcp, d_pk, 0)
        psh_s = np.where(tcp, np.maximum(1, s_pk // 3), 0)
        psh_d = np.where(tcp, np.maximum(1, d_pk // 2), 0)
        fin_s = np.where(tcp, 1, 0)
        fin_d = np.where(tcp, 1, 0)
        rst_s = np.zeros(n, dtype=np.int64)
        rst_d = np.zeros(n, dtype=np.int64)
        src = _ipv4(rng, n, (10, 0, 1, 10), 20)
        dst = _ipv4(rng, n, (10, 0, 2, 10), 20)
    elif kind == "portscan":
        s_pk = np.ones(n, dtype=np.uint64)
        d_pk = np.ones(n, dtype=np.uint64)
        s_mean = np.full(n, 58.0)
        d_mean = np.full(n, 54.0)
        dur = rng.uniform(0.02, 0.3, n)
        dst_port = rng.permutation(np.arange(1, n + 1) % 65535 + 1)
        src_port = np.full(n, 40000) + rng.integers(0, 3, n)
        syn_s, syn_d = np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        ack_s, ack_d = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)
        psh_s = psh_d = fin_s = fin_d = np.zeros(n, dtype=np.int64)
        rst_s, rst_d = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)
        src = _ipv4(rng, n, (10, 0, 9, 66), 1)
        dst = _ipv4(rng, n, (10, 0, 2, 10), 1)
    elif kind == "synflood":
        s_pk = np.ones(n, dtype=np.uint64)
        d_pk = np.zeros(n, dtype=np.uint64)
        s_mean = np.full(n, 54.0)
        d_mean = np.zeros(n)
        dur = np.zeros(n)
        dst_port = np.full(n, 80)
        src_port = rng.integers(1024, 65535, n)
        syn_s, syn_d = np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        ack_s = ack_d = psh_s = psh_d = fin_s = fin_d = rst_s = rst_d = np.zeros(n, dtype=np.int64)
        src = _ipv4(rng, n, (10, 0, 9, 0), 250)
        dst = _ipv4(rng, n, (10, 0, 2, 10), 1)
    else:
        raise ValueError(f"unknown traffic kind {kind!r}")

    cols: dict[str, np.ndarray] = {
        "src_ip": src, "dst_ip": dst,
        "src_port": src_port.astype(np.uint16), "dst_port": dst_port.astype(np.uint16),
        "protocol": proto, "ip_version": np.full(n, 4, dtype=np.uint8),
        "vlan_id": np.zeros(n, dtype=np.uint16), "ifindex": np.full(n, 7, dtype=np.uint32),
        "interface": np.array(["veth-a", "veth-b"], dtype=object)[rng.integers(0, 2, n)],
    }
    first = start_ms + rng.integers(0, 10_000, n).astype(np.uint64)
    last = first + dur.astype(np.uint64)
    for d in ("bidirectional", "src2dst", "dst2src"):
        cols[f"{d}_first_seen_ms"] = first.copy()
        cols[f"{d}_last_seen_ms"] = last.copy()
    cols["expiration_id"] = np.zeros(n, dtype=np.int8)
    s_by = (s_pk * s_mean).astype(np.uint64)
    d_by = (d_pk * d_mean).astype(np.uint64)
    per = {
        "src2dst": (s_pk, s_by, s_mean, dict(syn=syn_s, ack=ack_s, psh=psh_s, fin=fin_s, rst=rst_s)),
        "dst2src": (d_pk, d_by, d_mean, dict(syn=syn_d, ack=ack_d, psh=psh_d, fin=fin_d, rst=rst_d)),
    }
    b_pk, b_by = s_pk + d_pk, s_by + d_by
    per["bidirectional"] = (b_pk, b_by, np.where(b_pk > 0, b_by / np.maximum(b_pk, 1), 0.0),
                            {f: per["src2dst"][3][f] + per["dst2src"][3][f] for f in ("syn", "ack", "psh", "fin", "rst")})
    for d, (pk, by, mean, flags) in per.items():
        cols[f"{d}_duration_ms"] = dur.astype(np.float64)
        cols[f"{d}_packets"] = pk.astype(np.uint64)
        cols[f"{d}_bytes"] = by.astype(np.uint64)
        cols[f"{d}_min_ps"] = mean * 0.5
        cols[f"{d}_mean_ps"] = mean.astype(np.float64)
        cols[f"{d}_stddev_ps"] = mean * 0.2
        cols[f"{d}_max_ps"] = mean * 1.5
        piat = dur / np.maximum(pk.astype(np.float64) - 1, 1)
        cols[f"{d}_min_piat_ms"] = piat * 0.1
        cols[f"{d}_mean_piat_ms"] = piat
        cols[f"{d}_stddev_piat_ms"] = piat * 0.5
        cols[f"{d}_max_piat_ms"] = piat * 3
        for f in FLAGS:
            cols[f"{d}_{f}_packets"] = np.asarray(flags.get(f, np.zeros(n)), dtype=np.uint32)
    cols["src2dst_init_window"] = np.full(n, 64240, dtype=np.uint16)
    cols["dst2src_init_window"] = np.where(d_pk > 0, 65160, 0).astype(np.uint16)
    cols["src2dst_ttl"] = np.full(n, 64, dtype=np.uint8)
    cols["dst2src_ttl"] = np.full(n, 64, dtype=np.uint8)
    cols["src2dst_tos"] = np.zeros(n, dtype=np.uint8)
    cols["dst2src_tos"] = np.zeros(n, dtype=np.uint8)
    cols["bps"] = b_by / np.maximum(b_pk, 1)
    cols["pps"] = b_pk / np.maximum(dur / 1000.0, 1e-3)
    cols["log_bytes"] = np.log1p(b_by.astype(np.float64))
    cols["log_packets"] = np.log1p(b_pk.astype(np.float64))
    tcp_flags = np.zeros(n, dtype=np.uint8)
    for f, bit in FLAG_BITS.items():
        tcp_flags |= np.where(cols[f"bidirectional_{f}_packets"] > 0, bit, 0).astype(np.uint8)
    cols["tcp_flags"] = tcp_flags
    for side, port in (("src", cols["src_port"]), ("dst", cols["dst_port"])):
        cols[f"{side}_port_low"] = port < 1024
        cols[f"{side}_port_mid"] = (port >= 1024) & (port < 49152)
        cols[f"{side}_port_high"] = port >= 49152
    slots = np.arange(first_n)
    used = slots[None, :] < np.minimum(b_pk, first_n)[:, None].astype(np.int64)
    cols["splt_direction"] = np.where(used, (slots[None, :] % 2), -1).astype(np.int8)
    cols["splt_ps"] = np.where(used, rng.integers(54, 1500, (n, first_n)), -1).astype(np.int32)
    cols["splt_piat_ms"] = np.where(used, rng.uniform(0, 50, (n, first_n)), -1.0)
    cols["splt_flags"] = np.where(used, 0x18, -1).astype(np.int16)
    specs = {name: ColumnSpec(name, col.dtype.str.lstrip("<|="),
                              unit="ms" if name.endswith("_ms") else "",
                              role=_role(name), fill=-1 if name.startswith("splt_") else None)
             for name, col in cols.items()}
    return ColumnBatch("flow", cols, specs)


def _role(name: str) -> str:
    if name in ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "ip_version", "vlan_id", "ifindex", "interface"):
        return "key"
    if name.endswith("_seen_ms") or name == "expiration_id":
        return "time"
    if name.startswith("splt_"):
        return "sequence"
    return "feature"
