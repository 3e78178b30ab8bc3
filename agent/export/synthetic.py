"""Synthetic flow batches with the agent's full flow schema, for tests and benchmarks.

The values are plausible, not measured: normal TCP sessions (handshake, data, FIN),
DNS-like UDP pairs and ICMP echo pairs; a port scan (one SYN answered by a RST per
port); a SYN flood (one unanswered SYN per spoofed source port). Counters obey the
identities a real agent's do (bidirectional = src2dst + dst2src, bps = bytes/packets),
so a model trained on them learns the same relations it would on real flows.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class _Traffic:
    """Per-flow draws of one traffic kind: what differs between kinds."""

    proto: np.ndarray
    s_pk: np.ndarray  # src2dst packets
    d_pk: np.ndarray  # dst2src packets
    s_mean: np.ndarray  # mean packet size per direction
    d_mean: np.ndarray
    dur: np.ndarray  # duration, ms
    src_port: np.ndarray
    dst_port: np.ndarray
    flags: dict[str, dict[str, np.ndarray]]  # direction -> flag -> packets with it
    src: np.ndarray
    dst: np.ndarray


def _zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


def _normal(rng: np.random.Generator, n: int) -> _Traffic:
    proto = np.full(n, 6, dtype=np.uint8)
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
    one = np.where(tcp, 1, 0)
    flags = {  # handshake, data, FIN both ways
        "src2dst": dict(
            syn=one,
            ack=np.where(tcp, s_pk - 1, 0),
            psh=np.where(tcp, np.maximum(1, s_pk // 3), 0),
            fin=one,
            rst=_zeros(n),
        ),
        "dst2src": dict(
            syn=one, ack=np.where(tcp, d_pk, 0), psh=np.where(tcp, np.maximum(1, d_pk // 2), 0), fin=one, rst=_zeros(n)
        ),
    }
    src = _ipv4(rng, n, (10, 0, 1, 10), 20)
    dst = _ipv4(rng, n, (10, 0, 2, 10), 20)
    return _Traffic(proto, s_pk, d_pk, s_mean, d_mean, dur, src_port, dst_port, flags, src, dst)


def _portscan(rng: np.random.Generator, n: int) -> _Traffic:
    """One SYN per port, answered by a RST (with ACK)."""
    dur = rng.uniform(0.02, 0.3, n)
    dst_port = rng.permutation(np.arange(1, n + 1) % 65535 + 1)
    src_port = np.full(n, 40000) + rng.integers(0, 3, n)
    ones = np.ones(n, dtype=np.int64)
    flags = {
        "src2dst": dict(syn=ones, ack=_zeros(n), psh=_zeros(n), fin=_zeros(n), rst=_zeros(n)),
        "dst2src": dict(syn=_zeros(n), ack=ones, psh=_zeros(n), fin=_zeros(n), rst=ones),
    }
    src = _ipv4(rng, n, (10, 0, 9, 66), 1)
    dst = _ipv4(rng, n, (10, 0, 2, 10), 1)
    return _Traffic(
        np.full(n, 6, dtype=np.uint8),
        np.ones(n, dtype=np.uint64),
        np.ones(n, dtype=np.uint64),
        np.full(n, 58.0),
        np.full(n, 54.0),
        dur,
        src_port,
        dst_port,
        flags,
        src,
        dst,
    )


def _synflood(rng: np.random.Generator, n: int) -> _Traffic:
    """One unanswered SYN per spoofed source port."""
    src_port = rng.integers(1024, 65535, n)
    flags = {
        "src2dst": dict(syn=np.ones(n, dtype=np.int64), ack=_zeros(n), psh=_zeros(n), fin=_zeros(n), rst=_zeros(n)),
        "dst2src": dict(syn=_zeros(n), ack=_zeros(n), psh=_zeros(n), fin=_zeros(n), rst=_zeros(n)),
    }
    src = _ipv4(rng, n, (10, 0, 9, 0), 250)
    dst = _ipv4(rng, n, (10, 0, 2, 10), 1)
    return _Traffic(
        np.full(n, 6, dtype=np.uint8),
        np.ones(n, dtype=np.uint64),
        np.zeros(n, dtype=np.uint64),
        np.full(n, 54.0),
        np.zeros(n),
        np.zeros(n),
        src_port,
        np.full(n, 80),
        flags,
        src,
        dst,
    )


KINDS = {"normal": _normal, "portscan": _portscan, "synflood": _synflood}


def flow_batch(
    n: int, *, kind: str = "normal", seed: int = 0, first_n: int = 10, start_ms: int = 1_700_000_000_000
) -> ColumnBatch:
    """``n`` flows of one traffic ``kind``: normal | portscan | synflood."""
    if kind not in KINDS:
        raise ValueError(f"unknown traffic kind {kind!r}")
    rng = np.random.default_rng(seed)
    t = KINDS[kind](rng, n)
    cols = _key_columns(rng, t, n)
    first = start_ms + rng.integers(0, 10_000, n).astype(np.uint64)
    last = first + t.dur.astype(np.uint64)
    for d in DIRS:
        cols[f"{d}_first_seen_ms"] = first.copy()
        cols[f"{d}_last_seen_ms"] = last.copy()
    cols["expiration_id"] = np.zeros(n, dtype=np.int8)
    cols.update(_direction_columns(t, n))
    cols.update(_derived_columns(t, cols, n))
    cols.update(_splt_columns(rng, cols["bidirectional_packets"], n, first_n))
    specs = {
        name: ColumnSpec(
            name,
            col.dtype.str.lstrip("<|="),
            unit="ms" if name.endswith("_ms") else "",
            role=_role(name),
            fill=-1 if name.startswith("splt_") else None,
        )
        for name, col in cols.items()
    }
    return ColumnBatch("flow", cols, specs)


def _key_columns(rng: np.random.Generator, t: _Traffic, n: int) -> dict[str, np.ndarray]:
    cols = {
        "src_ip": t.src,
        "dst_ip": t.dst,
        "src_port": t.src_port.astype(np.uint16),
        "dst_port": t.dst_port.astype(np.uint16),
        "protocol": t.proto,
        "ip_version": np.full(n, 4, dtype=np.uint8),
        "vlan_id": np.zeros(n, dtype=np.uint16),
        "ifindex": np.full(n, 7, dtype=np.uint32),
        "interface": np.array(["veth-a", "veth-b"], dtype=object)[rng.integers(0, 2, n)],
        "tunnel_type": np.full(n, "none", dtype=object),
        "tunnel_id": np.zeros(n, dtype=np.uint32),
        "outer_src_ip": np.zeros(n, dtype="S16"),
        "outer_dst_ip": np.zeros(n, dtype="S16"),
    }
    # one observation point each (the rows' own interface), placed as the agent's columns are
    cols["seen_on"] = np.char.add(cols["interface"].astype(str), ":ingress").astype(object)
    cols["observation_points"] = np.ones(n, dtype=np.uint8)
    order = ["src_ip", "dst_ip", "src_port", "dst_port", "protocol", "ip_version", "vlan_id", "ifindex", "interface"]
    order += ["seen_on", "observation_points"]
    return {k: cols[k] for k in order + [k for k in cols if k not in order]}


def _direction_columns(t: _Traffic, n: int) -> dict[str, np.ndarray]:
    """Counts, sizes, inter-arrival times and flag counts per direction; bidirectional
    values are the sums (means weighted by packets), as the agent's are."""
    s_by = (t.s_pk * t.s_mean).astype(np.uint64)
    d_by = (t.d_pk * t.d_mean).astype(np.uint64)
    per = {
        "src2dst": (t.s_pk, s_by, t.s_mean, t.flags["src2dst"]),
        "dst2src": (t.d_pk, d_by, t.d_mean, t.flags["dst2src"]),
    }
    b_pk, b_by = t.s_pk + t.d_pk, s_by + d_by
    per["bidirectional"] = (
        b_pk,
        b_by,
        np.where(b_pk > 0, b_by / np.maximum(b_pk, 1), 0.0),
        {f: t.flags["src2dst"][f] + t.flags["dst2src"][f] for f in t.flags["src2dst"]},
    )
    cols: dict[str, np.ndarray] = {}
    for d, (pk, by, mean, flags) in per.items():
        cols[f"{d}_duration_ms"] = t.dur.astype(np.float64)
        cols[f"{d}_packets"] = pk.astype(np.uint64)
        cols[f"{d}_bytes"] = by.astype(np.uint64)
        cols[f"{d}_min_ps"] = mean * 0.5
        cols[f"{d}_mean_ps"] = mean.astype(np.float64)
        cols[f"{d}_stddev_ps"] = mean * 0.2
        cols[f"{d}_max_ps"] = mean * 1.5
        piat = t.dur / np.maximum(pk.astype(np.float64) - 1, 1)
        cols[f"{d}_min_piat_ms"] = piat * 0.1
        cols[f"{d}_mean_piat_ms"] = piat
        cols[f"{d}_stddev_piat_ms"] = piat * 0.5
        cols[f"{d}_max_piat_ms"] = piat * 3
        for f in FLAGS:
            cols[f"{d}_{f}_packets"] = np.asarray(flags.get(f, np.zeros(n)), dtype=np.uint32)
    return cols


def _derived_columns(t: _Traffic, cols: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Header snapshots, rates, logs, flag ORs and port ranges."""
    b_pk, b_by = cols["bidirectional_packets"], cols["bidirectional_bytes"]
    out = {
        "src2dst_init_window": np.full(n, 64240, dtype=np.uint16),
        "dst2src_init_window": np.where(t.d_pk > 0, 65160, 0).astype(np.uint16),
        "src2dst_ttl": np.full(n, 64, dtype=np.uint8),
        "dst2src_ttl": np.full(n, 64, dtype=np.uint8),
        "src2dst_tos": np.zeros(n, dtype=np.uint8),
        "dst2src_tos": np.zeros(n, dtype=np.uint8),
        "bps": b_by / np.maximum(b_pk, 1),
        "pps": b_pk / np.maximum(t.dur / 1000.0, 1e-3),
        "log_bytes": np.log1p(b_by.astype(np.float64)),
        "log_packets": np.log1p(b_pk.astype(np.float64)),
    }
    tcp_flags = np.zeros(n, dtype=np.uint8)
    for f, bit in FLAG_BITS.items():
        tcp_flags |= np.where(cols[f"bidirectional_{f}_packets"] > 0, bit, 0).astype(np.uint8)
    out["tcp_flags"] = tcp_flags
    for side in ("src", "dst"):
        port = cols[f"{side}_port"]
        out[f"{side}_port_low"] = port < 1024
        out[f"{side}_port_mid"] = (port >= 1024) & (port < 49152)
        out[f"{side}_port_high"] = port >= 49152
    return out


def _splt_columns(rng: np.random.Generator, packets: np.ndarray, n: int, first_n: int) -> dict[str, np.ndarray]:
    """The first-N packet sequences, -1 past the flow's packets."""
    slots = np.arange(first_n)
    used = slots[None, :] < np.minimum(packets, first_n)[:, None].astype(np.int64)
    return {
        "splt_direction": np.where(used, (slots[None, :] % 2), -1).astype(np.int8),
        "splt_ps": np.where(used, rng.integers(54, 1500, (n, first_n)), -1).astype(np.int32),
        "splt_piat_ms": np.where(used, rng.uniform(0, 50, (n, first_n)), -1.0),
        "splt_flags": np.where(used, 0x18, -1).astype(np.int16),
    }


def _role(name: str) -> str:
    if name in (
        "src_ip",
        "dst_ip",
        "src_port",
        "dst_port",
        "protocol",
        "ip_version",
        "vlan_id",
        "ifindex",
        "interface",
        "seen_on",
        "observation_points",
        "tunnel_type",
        "tunnel_id",
        "outer_src_ip",
        "outer_dst_ip",
    ):
        return "key"
    if name.endswith("_seen_ms") or name == "expiration_id":
        return "time"
    if name.startswith("splt_"):
        return "sequence"
    return "feature"
