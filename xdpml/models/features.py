"""The features a model in the kernel can read, by the names of the exported columns.

One table, used by both sides: the compiler maps a model's input names to these
ids, bpf/model.h computes the value of each id from the parsed packet (its
``MF_*`` constants carry the same numbers, checked by tests/models/test_features.py),
and the parity tests build the same values from the packets they craft.

Every packet feature is an integer, so a model trained on exported columns compares
exactly: the per-packet columns of docs/features.md (``kind: packet``) are already
integers or booleans (0/1), and ``ip_ecn`` (``tos & 3``) is the one model-only
addition, the ECN half of ``tos`` beside ``ip_dscp``.

Flow features (``flow=True``) are the flow table's statistics at the k-th packet of a
flow (-DXDPML_MODEL_FLOW_K), by the names of the exported flow columns. Counts, bytes
and sizes are integers. The derived ones (means, durations, inter-arrival times) are
fixed point in the kernel: ``floor(column * scale)`` with a power-of-two ``scale``,
computed from the integer counters (:data:`FLOW_TABLE`). The compiler compares them
with ``int_threshold(threshold * scale)``, which is exact for a model trained on
:func:`kernel_view` of the exported columns (the same values the kernel computes);
one trained on the raw float columns can disagree only within 1/scale of a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xdpml.errors import ModelError

U16, U32 = 0xFFFF, 0xFFFF_FFFF


@dataclass(frozen=True)
class Feature:
    id: int
    name: str
    max: int  # largest value the kernel can produce (bounds fixed-point sums)
    doc: str
    scale: int = 1  # the kernel holds floor(column value * scale)
    flow: bool = False  # from the flow table at the k-th packet (model.h MF_FLOW_*)


_TABLE = [
    ("ip_version", 6, "4 or 6"),
    ("ip_ihl", 15, "IPv4 header length in 32-bit words (0 for IPv6)"),
    ("tos", 255, "IPv4 ToS / IPv6 traffic class"),
    ("ip_dscp", 63, "tos >> 2"),
    ("ip_ecn", 3, "tos & 3 (model-only: the ECN bits of the tos column)"),
    ("ip_total_length", U16, "IPv4 total length / IPv6 payload length + 40"),
    ("ip_frag_offset", 8191, "fragment offset in 8-byte units (flags masked off)"),
    ("ip_flags", 3, "IPv4 flags (2 DF, 1 MF); IPv6: the fragment header's M flag"),
    ("ip_id", U16, "IPv4 identification (0 for IPv6)"),
    ("ip_ttl", 255, "TTL / hop limit"),
    ("protocol", 255, "IP protocol number"),
    ("src_port", U16, "source port (0 without ports)"),
    ("dst_port", U16, "destination port (0 without ports)"),
    ("tcp_sequence_num", U32, "TCP sequence number"),
    ("tcp_ack_num", U32, "TCP acknowledgement number"),
    ("tcp_window_size", U16, "TCP window field (unscaled)"),
    ("tcp_urgent_pointer", U16, "TCP urgent pointer"),
    ("tcp_fin", 1, "TCP FIN flag (header byte 13, bit 0)"),
    ("tcp_syn", 1, "TCP SYN flag (bit 1)"),
    ("tcp_rst", 1, "TCP RST flag (bit 2)"),
    ("tcp_psh", 1, "TCP PSH flag (bit 3)"),
    ("tcp_ack", 1, "TCP ACK flag (bit 4)"),
    ("tcp_urg", 1, "TCP URG flag (bit 5)"),
    ("tcp_ece", 1, "TCP ECE flag (bit 6)"),
    ("tcp_cwr", 1, "TCP CWR flag (bit 7)"),
    ("pkt_len", U32, "L2 frame bytes (TC: a GSO super-packet's whole length)"),
    ("payload_len", U16, "L4 payload bytes"),
    ("vlan_id", 4095, "outermost VLAN id, 0 untagged"),
    ("pr_tcp", 1, "protocol is TCP"),
    ("pr_udp", 1, "protocol is UDP"),
    ("pr_icmp", 1, "protocol is ICMP or ICMPv6"),
    ("pr_other", 1, "any other protocol"),
    ("src_port_low", 1, "src_port < 1024"),
    ("src_port_mid", 1, "1024 <= src_port < 49152"),
    ("src_port_high", 1, "src_port >= 49152"),
    ("dst_port_low", 1, "dst_port < 1024"),
    ("dst_port_mid", 1, "1024 <= dst_port < 49152"),
    ("dst_port_high", 1, "dst_port >= 49152"),
]

P40, B48, T50 = 2**40, 2**48, 2**50
MEAN_SCALE = 256  # bytes: 8 fractional bits
MS_SCALE = 1024  # milliseconds: 10 fractional bits (about 1 us)
FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")

# (name, largest kernel value, scale, meaning) of the flow features, from id 38 on
FLOW_TABLE = [
    ("src2dst_packets", P40, 1, "packets, initiator to responder, at the k-th packet"),
    ("dst2src_packets", P40, 1, "packets, responder to initiator"),
    ("bidirectional_packets", P40, 1, "packets, both directions (k)"),
    ("src2dst_bytes", B48, 1, "L2 frame bytes, initiator to responder"),
    ("dst2src_bytes", B48, 1, "L2 frame bytes, responder to initiator"),
    ("bidirectional_bytes", B48, 1, "L2 frame bytes, both directions"),
    ("src2dst_min_ps", U32, 1, "smallest frame, initiator to responder (0: none)"),
    ("src2dst_max_ps", U32, 1, "largest frame, initiator to responder"),
    ("dst2src_min_ps", U32, 1, "smallest frame, responder to initiator (0: none)"),
    ("dst2src_max_ps", U32, 1, "largest frame, responder to initiator"),
    ("src2dst_mean_ps", U32 * MEAN_SCALE, MEAN_SCALE, "bytes / packets, initiator to responder (0: none)"),
    ("dst2src_mean_ps", U32 * MEAN_SCALE, MEAN_SCALE, "bytes / packets, responder to initiator (0: none)"),
    ("bidirectional_mean_ps", U32 * MEAN_SCALE, MEAN_SCALE, "bytes / packets, both directions"),
    ("bidirectional_duration_ms", T50, MS_SCALE, "last minus first packet time"),
    ("bidirectional_mean_piat_ms", T50, MS_SCALE, "mean of the k-1 inter-arrival times"),
    ("bidirectional_min_piat_ms", T50, MS_SCALE, "smallest inter-arrival time"),
    ("bidirectional_max_piat_ms", T50, MS_SCALE, "largest inter-arrival time"),
]
FLOW_TABLE += [
    (f"src2dst_{f}_packets", P40, 1, f"TCP packets with {f.upper()} set, initiator to responder") for f in FLAGS
]
FLOW_TABLE += [
    (f"dst2src_{f}_packets", P40, 1, f"TCP packets with {f.upper()} set, responder to initiator") for f in FLAGS
]

FEATURES: tuple[Feature, ...] = tuple(Feature(i, n, m, d) for i, (n, m, d) in enumerate(_TABLE)) + tuple(
    Feature(len(_TABLE) + i, n, m, d, scale=sc, flow=True) for i, (n, m, sc, d) in enumerate(FLOW_TABLE)
)
BY_NAME = {f.name: f for f in FEATURES}

# Packet features the kernel computes only for a model that reads one of them (bpf/model.h
# MODEL_FG_*, model_slot.fskip); every other packet feature is always computed.
GROUPS: dict[int, tuple[str, ...]] = {
    1: ("ip_frag_offset", "ip_flags", "ip_id"),
    2: ("tcp_sequence_num", "tcp_ack_num", "tcp_window_size", "tcp_urgent_pointer"),
    4: tuple(f"tcp_{f}" for f in FLAGS),
    8: ("pr_tcp", "pr_udp", "pr_icmp", "pr_other")
    + tuple(f"{d}_port_{c}" for d in ("src", "dst") for c in ("low", "mid", "high")),
    16: ("payload_len",),
}


def skip_groups(features) -> int:
    """The MODEL_FG_* bits of the groups none of ``features`` is in (not computed for it)."""
    names = {f.name for f in features}
    return sum(bit for bit, members in GROUPS.items() if not names.intersection(members))


def resolve(names) -> list[Feature]:
    """Model input names -> features, in order; ModelError names the unknown ones."""
    names = [str(n) for n in names]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ModelError(
            f"unknown model feature(s) {', '.join(unknown)}; the kernel offers: {', '.join(BY_NAME)} (docs/models.md)"
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ModelError(f"feature(s) named twice: {', '.join(dup)}")
    return [BY_NAME[n] for n in names]


def packet_features(
    *,
    version: int,
    ihl: int = 0,
    tos: int = 0,
    ip_len: int = 0,
    frag_off: int = 0,
    ip_id: int = 0,
    ttl: int = 0,
    proto: int = 0,
    sport: int = 0,
    dport: int = 0,
    seq: int = 0,
    ack: int = 0,
    window: int = 0,
    urg: int = 0,
    flags: int = 0,
    pkt_len: int = 0,
    payload_len: int = 0,
    vlan_id: int = 0,
) -> dict[str, int]:
    """Feature values of one packet from its header fields, as the columns define them
    (``frag_off``: the IPv4 flags+offset field, or the IPv6 fragment header's offset word)."""
    v4 = version == 4
    tcp = proto == 6
    out = {
        "ip_version": version,
        "ip_ihl": ihl if v4 else 0,
        "tos": tos,
        "ip_dscp": tos >> 2,
        "ip_ecn": tos & 3,
        "ip_total_length": ip_len,
        "ip_frag_offset": (frag_off & 0x1FFF) if v4 else frag_off >> 3,
        "ip_flags": ((frag_off >> 13) & 3) if v4 else frag_off & 1,
        "ip_id": ip_id if v4 else 0,
        "ip_ttl": ttl,
        "protocol": proto,
        "src_port": sport,
        "dst_port": dport,
        "tcp_sequence_num": seq if tcp else 0,
        "tcp_ack_num": ack if tcp else 0,
        "tcp_window_size": window if tcp else 0,
        "tcp_urgent_pointer": urg if tcp else 0,
        "pkt_len": pkt_len,
        "payload_len": payload_len & U16,
        "vlan_id": vlan_id,
        "pr_tcp": int(tcp),
        "pr_udp": int(proto == 17),
        "pr_icmp": int(proto in (1, 58)),
        "pr_other": int(proto not in (1, 6, 17, 58)),
    }
    for i, f in enumerate(("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")):
        out[f"tcp_{f}"] = int(tcp and (flags >> i) & 1)
    for side, port in (("src", sport), ("dst", dport)):
        out[f"{side}_port_low"] = int(port < 1024)
        out[f"{side}_port_mid"] = int(1024 <= port < 49152)
        out[f"{side}_port_high"] = int(port >= 49152)
    return out


def kernel_view(columns, names) -> np.ndarray:
    """Exported column values -> the values the kernel compares, as float64 [n, len(names)]
    (``floor(value * scale) / scale``, from the integer counters where a column is derived).
    Train on this to compare exactly in the kernel: the one place the fixed-point form of
    the derived features is defined on the Python side (model.h computes the same)."""

    def col(name):
        return np.asarray(columns[name])

    out = []
    for f in resolve(names):
        if f.scale == 1:
            out.append(col(f.name).astype(np.float64))
            continue
        if f.name.endswith("_mean_ps"):
            d = f.name[: -len("_mean_ps")]
            byts = col(f"{d}_bytes").astype(np.uint64)
            pk = col(f"{d}_packets").astype(np.uint64)
            v = np.where(pk > 0, (byts * np.uint64(MEAN_SCALE)) // np.maximum(pk, np.uint64(1)), 0)
        elif f.name == "bidirectional_mean_piat_ms":
            n = col("bidirectional_packets").astype(np.int64) - 1
            sum_ns = np.rint(col(f.name).astype(np.float64) * 1e6 * np.maximum(n, 1)).astype(np.int64)
            v = np.where(n > 0, (sum_ns * 128) // (125 * np.maximum(n, 1)), 0)
        else:  # a time in ms, integer ns in the kernel
            ns = np.rint(col(f.name).astype(np.float64) * 1e6).astype(np.int64)
            v = (ns * 128) // 125
        out.append(np.asarray(v, np.float64) / f.scale)
    return np.stack(out, axis=1) if out else np.zeros((len(next(iter(columns.values()))), 0))
