"""Random packets for the parity tests: header fields, their feature values (computed
here from the fields, independently of the kernel and of the compiler), and the
frames themselves (built by scapy)."""

from __future__ import annotations

import numpy as np
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from xdpml.models.features import FEATURES

ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
PROTOS = np.array([6, 6, 6, 17, 17, 1, 47])  # TCP most often; 47 (GRE): an 'other' protocol


def random_fields(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    v6 = rng.random(n) < 0.25
    proto = PROTOS[rng.integers(0, len(PROTOS), n)]
    proto = np.where(v6 & (proto == 1), 58, proto)
    f = {
        "v6": v6,
        "proto": proto,
        "opt_words": np.where(v6, 0, rng.integers(0, 4, n) * (rng.random(n) < 0.3)),
        "tos": rng.integers(0, 256, n),
        "ttl": rng.integers(1, 256, n),
        "ip_id": rng.integers(0, 65536, n),
        "df": rng.integers(0, 2, n),
        "mf": (rng.random(n) < 0.1).astype(np.int64),
        "sport": rng.integers(0, 65536, n),
        "dport": rng.integers(0, 65536, n),
        # sequence numbers over the whole u32 range: thresholds far above 2^24
        "seq": rng.integers(0, 2**32, n),
        "ack": rng.integers(0, 2**32, n),
        "window": rng.integers(0, 65536, n),
        "urg": np.where(rng.random(n) < 0.3, rng.integers(0, 65536, n), 0),
        "flags": rng.integers(0, 256, n),  # every flag, CWR and ECE included
        "payload": rng.integers(0, 200, n),
        "vlan": np.where(rng.random(n) < 0.2, rng.integers(1, 4095, n), 0),
    }
    low = rng.random(n) < 0.3  # well-known ports often enough to matter
    f["dport"] = np.where(low, rng.integers(0, 1024, n), f["dport"])
    return f


def l4_len(proto: np.ndarray) -> np.ndarray:
    return np.select([proto == 6, proto == 17, (proto == 1) | (proto == 58)], [20, 8, 8], 0)


def feature_matrix(f: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Feature values (int64 [n, len(names)]) as docs/features.md defines the columns."""
    v6, proto = f["v6"], f["proto"]
    tcp = proto == 6
    ports = np.isin(proto, (6, 17))
    sport, dport = np.where(ports, f["sport"], 0), np.where(ports, f["dport"], 0)
    frag_hdr = v6 & (f["mf"] == 1)  # IPv6: a fragment header (offset 0, M set)
    ihl = np.where(v6, 0, 5 + f["opt_words"])
    ip_hdr = np.where(v6, 40 + 8 * frag_hdr, ihl * 4)
    ip_len = ip_hdr + l4_len(proto) + f["payload"]
    flags = np.where(tcp, f["flags"], 0)
    col = {
        "ip_version": np.where(v6, 6, 4),
        "ip_ihl": ihl,
        "tos": f["tos"],
        "ip_dscp": f["tos"] >> 2,
        "ip_ecn": f["tos"] & 3,
        "ip_total_length": ip_len,
        "ip_frag_offset": np.zeros_like(proto),
        "ip_flags": np.where(v6, f["mf"], f["df"] * 2 + f["mf"]),
        "ip_id": np.where(v6, 0, f["ip_id"]),
        "ip_ttl": f["ttl"],
        "protocol": proto,
        "src_port": sport,
        "dst_port": dport,
        "tcp_sequence_num": np.where(tcp, f["seq"], 0),
        "tcp_ack_num": np.where(tcp, f["ack"], 0),
        "tcp_window_size": np.where(tcp, f["window"], 0),
        "tcp_urgent_pointer": np.where(tcp, f["urg"], 0),
        "pkt_len": 14 + 4 * (f["vlan"] > 0) + ip_len,
        "payload_len": f["payload"],
        "vlan_id": f["vlan"],
        "pr_tcp": tcp,
        "pr_udp": proto == 17,
        "pr_icmp": (proto == 1) | (proto == 58),
        "pr_other": ~np.isin(proto, (1, 6, 17, 58)),
    }
    for i, name in enumerate(("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")):
        col[f"tcp_{name}"] = (flags >> i) & 1
    for side, port in (("src", sport), ("dst", dport)):
        col[f"{side}_port_low"] = port < 1024
        col[f"{side}_port_mid"] = (port >= 1024) & (port < 49152)
        col[f"{side}_port_high"] = port >= 49152
    assert set(col) == {f.name for f in FEATURES if not f.flow}
    return np.stack([np.asarray(col[n], np.int64) for n in names], axis=1)


def frame(f: dict[str, np.ndarray], i: int) -> bytes:
    """Row i of the fields as an Ethernet frame."""
    g = {k: int(v[i]) for k, v in f.items()}
    proto = g["proto"]
    if proto == 6:
        l4 = TCP(
            sport=g["sport"],
            dport=g["dport"],
            seq=g["seq"],
            ack=g["ack"],
            window=g["window"],
            urgptr=g["urg"],
            flags=g["flags"],
        )
    elif proto == 17:
        l4 = UDP(sport=g["sport"], dport=g["dport"])
    elif proto == 1:
        l4 = ICMP()
    elif proto == 58:
        l4 = ICMPv6EchoRequest()
    else:
        l4 = Raw(b"")
    if g["v6"]:
        ip = IPv6(src="fd00::1", dst="fd00::2", tc=g["tos"], hlim=g["ttl"])
        if g["mf"]:
            ip = ip / IPv6ExtHdrFragment(offset=0, m=1, nh=proto)
        elif proto not in (6, 17, 58):
            ip.nh = proto
    else:
        ip = IP(
            src="10.0.0.1",
            dst="10.0.0.2",
            tos=g["tos"],
            ttl=g["ttl"],
            id=g["ip_id"],
            flags=g["df"] * 2 + g["mf"],
            proto=proto,
            options=b"\x01" * (4 * g["opt_words"]) if g["opt_words"] else [],
        )
    l2 = Ether(**ETH) / Dot1Q(vlan=g["vlan"]) if g["vlan"] else Ether(**ETH)
    pkt = l2 / ip / l4 / Raw(bytes(g["payload"]))
    return bytes(pkt)
