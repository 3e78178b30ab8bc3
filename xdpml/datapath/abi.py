"""ctypes and numpy mirrors of bpf/abi.h: the kernel/user contract.

tests/bpf/test_abi.py compiles bpf/abi.h with the host C compiler and checks
every size and offset here against it. The flow value's length depends on the
compile-time first-N size, so its types are built per N by :func:`flow_types`.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from functools import cache

import numpy as np

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class FlowKey(C.Structure):
    _fields_ = [
        ("lo_ip", u8 * 16),
        ("hi_ip", u8 * 16),
        ("lo_port", u16),
        ("hi_port", u16),
        ("proto", u8),
        ("ip_version", u8),
        ("vlan_id", u16),
        ("ifindex", u32),
        ("vni", u32),
    ]


class DirStats(C.Structure):
    _fields_ = [
        ("packets", u64),
        ("bytes", u64),
        ("first_ns", u64),
        ("last_ns", u64),
        ("size_sumsq", u64),
        ("iat_sum_ns", u64),
        ("iat_sumsq_lo", u64),  # sum of iat_ns^2, 128 bits: low half
        ("iat_sumsq_hi", u64),  # high half
        ("iat_min_ns", u64),
        ("iat_max_ns", u64),
        ("flag_count", u32 * 8),
        ("size_min", u32),
        ("size_max", u32),
        ("init_window", u16),
        ("ttl", u8),
        ("tos", u8),
        ("seen_at", u8),  # SEEN_INGRESS | SEEN_EGRESS: the hooks this direction was seen at
        ("_pad", u8 * 3),
    ]


class IatStats(C.Structure):
    _fields_ = [("sum_ns", u64), ("sumsq_lo", u64), ("sumsq_hi", u64), ("min_ns", u64), ("max_ns", u64)]


class SeqEntry(C.Structure):
    _fields_ = [("piat_us", u32), ("size", u16), ("dir", u8), ("flags", u8)]


class EarlyEvent(C.Structure):
    _fields_ = [("key", FlowKey)]


class WinEvent(C.Structure):
    _fields_ = [
        ("ts_ns", u64),
        ("src_ip", u8 * 16),
        ("dst_ip", u8 * 16),
        ("src_port", u16),
        ("dst_port", u16),
        ("size", u32),
        ("payload", u32),
        ("segs", u16),
        ("proto", u8),
        ("ip_version", u8),
        ("ifindex", u32),
        ("last_size", u32),
        ("tunnel_type", u8),
        ("_tpad", u8 * 3),
        ("tunnel_id", u32),
        ("outer_src_ip", u8 * 16),
        ("outer_dst_ip", u8 * 16),
    ]


class PktEvent(C.Structure):
    _fields_ = [
        ("ts_ns", u64),
        ("src_ip", u8 * 16),
        ("dst_ip", u8 * 16),
        ("src_port", u16),
        ("dst_port", u16),
        ("pkt_len", u32),
        ("ifindex", u32),
        ("ip_len", u16),
        ("payload_len", u16),
        ("frag_off", u16),
        ("ip_id", u16),
        ("tcp_seq", u32),
        ("tcp_ack", u32),
        ("tcp_window", u16),
        ("tcp_urg_ptr", u16),
        ("vlan_id", u16),
        ("segs", u16),
        ("proto", u8),
        ("ip_version", u8),
        ("ihl", u8),
        ("ttl", u8),
        ("tos", u8),
        ("tcp_flags", u8),
        ("hook", u8),
        ("tunnel_type", u8),
        ("tunnel_id", u32),
        ("outer_src_ip", u8 * 16),
        ("outer_dst_ip", u8 * 16),
    ]


# ---- enforcement (bpf/rules.h) ----
ENF_DRY_RUN, ENF_OFF, ENF_ENFORCE = 0, 1, 2
ENF_MODES = {"dry-run": ENF_DRY_RUN, "off": ENF_OFF, "enforce": ENF_ENFORCE}
ACT_PASS, ACT_DROP, ACT_RATE_LIMIT = 1, 2, 3
ACTIONS = {"pass": ACT_PASS, "drop": ACT_DROP, "rate-limit": ACT_RATE_LIMIT}
RULE_DRY_RUN = 1
RULE_NO_EXPORT = 2  # pass rules: flows they matched are not exported (agent/harvest.py)
ENF_SLOT_ALLOWLISTED = 0xFFFFFFFF


class EnfConfig(C.Structure):
    _fields_ = [
        ("mode", u32),
        ("gen", u32),
        ("rules", u32),
        ("exact", u32),
        ("src4", u32),
        ("dst4", u32),
        ("src6", u32),
        ("dst6", u32),
    ]


class EnfExactKey(C.Structure):
    _fields_ = [
        ("src_ip", u8 * 16),
        ("dst_ip", u8 * 16),
        ("src_port", u16),
        ("dst_port", u16),
        ("proto", u8),
        ("_pad", u8 * 3),
    ]


class EnfExactVal(C.Structure):
    _fields_ = [("slot", u32), ("reverse", u32)]


class EnfLpm4Key(C.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 4)]


class EnfLpm6Key(C.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16)]


class EnfRule(C.Structure):
    _fields_ = [
        ("lock", u32),  # struct bpf_spin_lock
        ("gen", u32),
        ("expires_ns", u64),
        ("tat_pkt_ns", u64),
        ("tat_byte_ns", u64),
        ("ns_per_pkt", u64),
        ("ps_per_byte", u64),
        ("burst_pkt_ns", u64),
        ("burst_byte_ns", u64),
        ("hit_packets", u64),
        ("hit_bytes", u64),
        ("drop_packets", u64),
        ("first_hit_ns", u64),
        ("last_hit_ns", u64),
        ("action", u8),
        ("proto", u8),
        ("dst_port", u16),
        ("flags", u8),
        ("_pad", u8 * 3),
    ]


END_FIN_INIT, END_FIN_RESP, END_RST = 1, 2, 4
SEEN_INGRESS, SEEN_EGRESS = 1, 2  # dir_stats.seen_at bits (XDPML_SEEN_*)
EARLY_SENT = 0x80  # end_flags bit: the kernel sent this entry's early-export notice
HOOK_XDP, HOOK_TC_INGRESS, HOOK_TC_EGRESS = 0, 1, 2
# enum xdpml_tunnel, in order: the text of the tunnel_type column
TUNNEL_TYPES = (
    "none",
    "vxlan",
    "geneve",
    "ipip",
    "6in4",
    "4in6",
    "6in6",
    "gre",
    "gretap",
    "gtpu",
    "wireguard",
    "esp",
)
TCP_FLAG_NAMES = ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")  # header bit order

# enum xdpml_counter, in order
COUNTERS = (
    "pkt_xdp",
    "pkt_tc_ingress",
    "pkt_tc_egress",
    "err_trunc_eth",
    "err_trunc_vlan",
    "err_trunc_ip",
    "err_bad_ihl",
    "err_bad_ip_len",
    "err_trunc_l4",
    "err_ipv6_ext",
    "frag_nonfirst",
    "other_l3",
    "flow_new",
    "flow_full",
    "flow_busy",
    "rb_win_full",
    "rb_pkt_full",
    "pkt_sampled",
    "gso_segs",
    "l4_trunc_ip_len",
    "err_tcp_doff",
    "enf_decided",
    "enf_allowlisted",
    "enf_expired",
    "enf_passed",
    "enf_would_drop",
    "enf_dropped",
    "enf_kill_passed",
    "model_err",
    "tun_decap",
    "tun_trunc",
    "tun_bad_vxlan",
    "tun_bad_geneve",
    "tun_bad_gre",
    "tun_bad_gtpu",
    "tun_unknown_proto",
    "tun_bad_inner",
    "tun_too_deep",
    "tun_fragment",
    "early_sent",
    "rb_early_full",
    "enf_dropped_bytes",
    "enf_would_drop_bytes",
    "hairpin",
)
COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}


@dataclass(frozen=True)
class FlowTypes:
    first_n: int
    value: type  # ctypes.Structure for struct flow_value
    key_dtype: np.dtype
    value_dtype: np.dtype


@cache
def flow_types(first_n: int) -> FlowTypes:
    fields = [
        ("lock", u32),  # struct bpf_spin_lock
        ("init_lo_to_hi", u8),
        ("end_flags", u8),
        ("tcp_flags_or", u8),
        ("n_seq", u8),
        ("enf_gen", u32 * 2),
        ("enf_slot", u32 * 2),
        ("first_ns", u64),
        ("last_ns", u64),
        ("iat", IatStats),
        ("dir", DirStats * 2),
        ("outer_src_ip", u8 * 16),
        ("outer_dst_ip", u8 * 16),
        ("tunnel_id", u32),
        ("tunnel_type", u8),
        ("_tpad", u8 * 3),
    ]
    if first_n > 0:
        fields.append(("seq", SeqEntry * first_n))
    fields += [("model_id", u32), ("model_class", u16), ("_model_pad", u16)]
    value = type(f"FlowValue{first_n}", (C.Structure,), {"_fields_": fields})
    return FlowTypes(first_n, value, np.dtype(FlowKey), np.dtype(value))
