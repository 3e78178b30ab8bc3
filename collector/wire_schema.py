"""The columns of wire schema v1 (package ``xdpml.wire.v1``), per record kind: what the
collector checks batches against and what fixes its Parquet files' schema, so no
client decides either. ``role`` "sequence" columns are 2-D (rows x N packets).

Kept in step with the agent's column specs by tests/collector/test_collector_sinks.py
(the collector does not import the agent). A new column is a wire schema change:
add it here and to docs/wire-format.md.
"""

from __future__ import annotations

from typing import NamedTuple


class WireColumn(NamedTuple):
    dtype: str  # numpy dtype string; "O" = text
    unit: str
    role: str
    doc: str


def _t(rows):
    return {name: WireColumn(dtype, unit, role, doc) for name, dtype, unit, role, doc in rows}


SCHEMA_VERSION = "xdpml.wire.v1"

FLOW = _t(
    [
        ("src_ip", "S16", "", "key", "initiator address (side of the first packet seen); 16 bytes, IPv4 mapped"),
        ("dst_ip", "S16", "", "key", "responder address"),
        ("src_port", "u2", "", "key", "initiator port (0 for ICMP and protocols without ports)"),
        ("dst_port", "u2", "", "key", "responder port"),
        ("protocol", "u1", "", "key", "IP protocol number"),
        ("ip_version", "u1", "", "key", "4 or 6"),
        ("vlan_id", "u2", "", "key", "outermost 802.1Q VLAN id, 0 untagged"),
        (
            "ifindex",
            "u4",
            "",
            "key",
            "index of the interface whose counts the record reports (the preferred observation point)",
        ),
        ("interface", "O", "", "key", "name of that interface"),
        (
            "seen_on",
            "O",
            "",
            "key",
            "every interface of the node the conversation was seen on, as ifname:direction "
            "(ingress, egress or ingress+egress: how the initiator's packets crossed it), space separated, "
            "in the order its first packet reached them; one entry with --record-per interface",
        ),
        ("observation_points", "u1", "", "key", "entries in seen_on"),
        (
            "tunnel_type",
            "O",
            "",
            "key",
            "tunnel the flow's packets were decapsulated from (the outermost): none, vxlan, geneve, ipip (4in4), "
            "6in4, 4in6, 6in6, gre, gretap, gtpu; or an encrypted tunnel kept as the outer flow: wireguard, esp",
        ),
        (
            "tunnel_id",
            "u4",
            "",
            "key",
            "VXLAN/Geneve VNI, GRE key, GTP-U TEID or ESP SPI of the flow's first packet; 0 if none",
        ),
        (
            "outer_src_ip",
            "S16",
            "",
            "key",
            "outer (tunnel) source address of the flow's first packet; 16 bytes, IPv4 mapped; all zero if not decapsulated",
        ),
        ("outer_dst_ip", "S16", "", "key", "outer (tunnel) destination address of the flow's first packet"),
        (
            "expiration_id",
            "i1",
            "",
            "time",
            "why the flow was exported: 0 idle timeout, 1 active timeout, 2 TCP FIN/RST, "
            "3 early snapshot (the flow goes on), -1 agent stop",
        ),
        ("bidirectional_first_seen_ms", "u8", "ms", "time", "Unix time of the first bidirectional packet"),
        ("bidirectional_last_seen_ms", "u8", "ms", "time", "Unix time of the last bidirectional packet"),
        ("src2dst_first_seen_ms", "u8", "ms", "time", "Unix time of the first src2dst packet"),
        ("src2dst_last_seen_ms", "u8", "ms", "time", "Unix time of the last src2dst packet"),
        ("dst2src_first_seen_ms", "u8", "ms", "time", "Unix time of the first dst2src packet"),
        ("dst2src_last_seen_ms", "u8", "ms", "time", "Unix time of the last dst2src packet"),
        ("bidirectional_duration_ms", "f8", "ms", "feature", "last minus first packet time, both directions"),
        (
            "bidirectional_packets",
            "u8",
            "packets",
            "feature",
            "packets, both directions (GSO super-packets count as their wire segments)",
        ),
        ("bidirectional_bytes", "u8", "bytes", "feature", "L2 frame bytes, both directions"),
        ("bidirectional_min_ps", "f8", "bytes", "feature", "smallest L2 frame, both directions"),
        ("bidirectional_mean_ps", "f8", "bytes", "feature", "mean L2 frame size, both directions"),
        (
            "bidirectional_stddev_ps",
            "f8",
            "bytes",
            "feature",
            "sample standard deviation of L2 frame size, both directions (0 below 2 packets)",
        ),
        ("bidirectional_max_ps", "f8", "bytes", "feature", "largest L2 frame, both directions"),
        ("bidirectional_min_piat_ms", "f8", "ms", "feature", "smallest packet inter-arrival time, both directions"),
        ("bidirectional_mean_piat_ms", "f8", "ms", "feature", "mean packet inter-arrival time, both directions"),
        (
            "bidirectional_stddev_piat_ms",
            "f8",
            "ms",
            "feature",
            "sample standard deviation (n-1) of the packets-1 inter-arrival times, both directions, from ns sums (0 below 3 packets)",
        ),
        ("bidirectional_max_piat_ms", "f8", "ms", "feature", "largest packet inter-arrival time, both directions"),
        ("bidirectional_fin_packets", "u4", "packets", "feature", "TCP packets with FIN set, both directions"),
        ("bidirectional_syn_packets", "u4", "packets", "feature", "TCP packets with SYN set, both directions"),
        ("bidirectional_rst_packets", "u4", "packets", "feature", "TCP packets with RST set, both directions"),
        ("bidirectional_psh_packets", "u4", "packets", "feature", "TCP packets with PSH set, both directions"),
        ("bidirectional_ack_packets", "u4", "packets", "feature", "TCP packets with ACK set, both directions"),
        ("bidirectional_urg_packets", "u4", "packets", "feature", "TCP packets with URG set, both directions"),
        ("bidirectional_ece_packets", "u4", "packets", "feature", "TCP packets with ECE set, both directions"),
        ("bidirectional_cwr_packets", "u4", "packets", "feature", "TCP packets with CWR set, both directions"),
        ("src2dst_duration_ms", "f8", "ms", "feature", "last minus first packet time, initiator to responder"),
        (
            "src2dst_packets",
            "u8",
            "packets",
            "feature",
            "packets, initiator to responder (GSO super-packets count as their wire segments)",
        ),
        ("src2dst_bytes", "u8", "bytes", "feature", "L2 frame bytes, initiator to responder"),
        ("src2dst_min_ps", "f8", "bytes", "feature", "smallest L2 frame, initiator to responder"),
        ("src2dst_mean_ps", "f8", "bytes", "feature", "mean L2 frame size, initiator to responder"),
        (
            "src2dst_stddev_ps",
            "f8",
            "bytes",
            "feature",
            "sample standard deviation of L2 frame size, initiator to responder (0 below 2 packets)",
        ),
        ("src2dst_max_ps", "f8", "bytes", "feature", "largest L2 frame, initiator to responder"),
        ("src2dst_min_piat_ms", "f8", "ms", "feature", "smallest packet inter-arrival time, initiator to responder"),
        ("src2dst_mean_piat_ms", "f8", "ms", "feature", "mean packet inter-arrival time, initiator to responder"),
        (
            "src2dst_stddev_piat_ms",
            "f8",
            "ms",
            "feature",
            "sample standard deviation (n-1) of the packets-1 inter-arrival times, initiator to responder, from ns sums (0 below 3 packets)",
        ),
        ("src2dst_max_piat_ms", "f8", "ms", "feature", "largest packet inter-arrival time, initiator to responder"),
        ("src2dst_fin_packets", "u4", "packets", "feature", "TCP packets with FIN set, initiator to responder"),
        ("src2dst_syn_packets", "u4", "packets", "feature", "TCP packets with SYN set, initiator to responder"),
        ("src2dst_rst_packets", "u4", "packets", "feature", "TCP packets with RST set, initiator to responder"),
        ("src2dst_psh_packets", "u4", "packets", "feature", "TCP packets with PSH set, initiator to responder"),
        ("src2dst_ack_packets", "u4", "packets", "feature", "TCP packets with ACK set, initiator to responder"),
        ("src2dst_urg_packets", "u4", "packets", "feature", "TCP packets with URG set, initiator to responder"),
        ("src2dst_ece_packets", "u4", "packets", "feature", "TCP packets with ECE set, initiator to responder"),
        ("src2dst_cwr_packets", "u4", "packets", "feature", "TCP packets with CWR set, initiator to responder"),
        ("dst2src_duration_ms", "f8", "ms", "feature", "last minus first packet time, responder to initiator"),
        (
            "dst2src_packets",
            "u8",
            "packets",
            "feature",
            "packets, responder to initiator (GSO super-packets count as their wire segments)",
        ),
        ("dst2src_bytes", "u8", "bytes", "feature", "L2 frame bytes, responder to initiator"),
        ("dst2src_min_ps", "f8", "bytes", "feature", "smallest L2 frame, responder to initiator"),
        ("dst2src_mean_ps", "f8", "bytes", "feature", "mean L2 frame size, responder to initiator"),
        (
            "dst2src_stddev_ps",
            "f8",
            "bytes",
            "feature",
            "sample standard deviation of L2 frame size, responder to initiator (0 below 2 packets)",
        ),
        ("dst2src_max_ps", "f8", "bytes", "feature", "largest L2 frame, responder to initiator"),
        ("dst2src_min_piat_ms", "f8", "ms", "feature", "smallest packet inter-arrival time, responder to initiator"),
        ("dst2src_mean_piat_ms", "f8", "ms", "feature", "mean packet inter-arrival time, responder to initiator"),
        (
            "dst2src_stddev_piat_ms",
            "f8",
            "ms",
            "feature",
            "sample standard deviation (n-1) of the packets-1 inter-arrival times, responder to initiator, from ns sums (0 below 3 packets)",
        ),
        ("dst2src_max_piat_ms", "f8", "ms", "feature", "largest packet inter-arrival time, responder to initiator"),
        ("dst2src_fin_packets", "u4", "packets", "feature", "TCP packets with FIN set, responder to initiator"),
        ("dst2src_syn_packets", "u4", "packets", "feature", "TCP packets with SYN set, responder to initiator"),
        ("dst2src_rst_packets", "u4", "packets", "feature", "TCP packets with RST set, responder to initiator"),
        ("dst2src_psh_packets", "u4", "packets", "feature", "TCP packets with PSH set, responder to initiator"),
        ("dst2src_ack_packets", "u4", "packets", "feature", "TCP packets with ACK set, responder to initiator"),
        ("dst2src_urg_packets", "u4", "packets", "feature", "TCP packets with URG set, responder to initiator"),
        ("dst2src_ece_packets", "u4", "packets", "feature", "TCP packets with ECE set, responder to initiator"),
        ("dst2src_cwr_packets", "u4", "packets", "feature", "TCP packets with CWR set, responder to initiator"),
        ("src2dst_init_window", "u2", "bytes", "feature", "TCP window field of the first src2dst packet (unscaled)"),
        ("src2dst_ttl", "u1", "hops", "feature", "IPv4 TTL / IPv6 hop limit of the first src2dst packet"),
        (
            "src2dst_tos",
            "u1",
            "",
            "feature",
            "IPv4 ToS / IPv6 traffic class of the first src2dst packet (DSCP = tos >> 2)",
        ),
        ("dst2src_init_window", "u2", "bytes", "feature", "TCP window field of the first dst2src packet (unscaled)"),
        ("dst2src_ttl", "u1", "hops", "feature", "IPv4 TTL / IPv6 hop limit of the first dst2src packet"),
        (
            "dst2src_tos",
            "u1",
            "",
            "feature",
            "IPv4 ToS / IPv6 traffic class of the first dst2src packet (DSCP = tos >> 2)",
        ),
        ("bps", "f8", "bytes/packet", "feature", "seed 002 'bps': bidirectional bytes per packet"),
        ("pps", "f8", "packets/s", "feature", "bidirectional packets per second of duration (0 when duration is 0)"),
        ("log_bytes", "f8", "", "feature", "log1p(bidirectional_bytes)"),
        ("log_packets", "f8", "", "feature", "log1p(bidirectional_packets)"),
        ("tcp_flags", "u1", "", "feature", "bitwise OR of the TCP flags of every packet"),
        ("src_port_low", "?", "", "feature", "src_port < 1024"),
        ("src_port_mid", "?", "", "feature", "1024 <= src_port < 49152"),
        ("src_port_high", "?", "", "feature", "src_port >= 49152"),
        ("dst_port_low", "?", "", "feature", "dst_port < 1024"),
        ("dst_port_mid", "?", "", "feature", "1024 <= dst_port < 49152"),
        ("dst_port_high", "?", "", "feature", "dst_port >= 49152"),
        ("splt_direction", "i1", "", "sequence", "first N packets: 0 initiator->responder, 1 reverse; -1 unused"),
        ("splt_ps", "i4", "bytes", "sequence", "first N packets: L2 frame size; -1 unused"),
        (
            "splt_piat_ms",
            "f8",
            "ms",
            "sequence",
            "first N packets: time since the previous packet of the flow (0 for the first); -1 unused",
        ),
        ("splt_flags", "i2", "", "sequence", "first N packets: TCP flags byte; -1 unused"),
        (
            "model_class",
            "i2",
            "",
            "meta",
            "class the kernel's model gave the flow's last classified packet (docs/models.md); -1 none",
        ),
        ("model_id", "u4", "", "meta", "model_id of the kernel model that gave model_class; 0 none"),
        ("src_namespace", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("src_pod", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("src_workload_kind", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("src_workload", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("src_node", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("src_service", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("dst_namespace", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("dst_pod", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("dst_workload_kind", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("dst_workload", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("dst_node", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
        ("dst_service", "O", "", "meta", "Kubernetes pod metadata (agent enrichment)"),
    ]
)

WINDOW = _t(
    [
        ("interface", "O", "", "key", "interface the window's packets were seen on"),
        ("buffer_size", "u4", "packets", "feature", "packets in the window"),
        ("timestamp_start", "f8", "s", "time", "Unix time of the window's first packet"),
        ("timestamp_end", "f8", "s", "time", "Unix time of the window's last packet"),
        ("duration_ms", "f8", "ms", "feature", "last minus first packet time"),
        ("avg_packet_size", "f8", "bytes", "feature", "mean L2 frame size"),
        ("min_packet_size", "f8", "bytes", "feature", "smallest L2 frame"),
        ("max_packet_size", "f8", "bytes", "feature", "largest L2 frame"),
        ("std_packet_size", "f8", "bytes", "feature", "population standard deviation of L2 frame size"),
        (
            "median_packet_size",
            "f8",
            "bytes",
            "feature",
            "median L2 frame size (mean of the middle two for even counts)",
        ),
        ("avg_inter_arrival_ms", "f8", "ms", "feature", "mean of the buffer_size-1 inter-arrival times"),
        ("min_inter_arrival_ms", "f8", "ms", "feature", "smallest inter-arrival time"),
        ("max_inter_arrival_ms", "f8", "ms", "feature", "largest inter-arrival time"),
        ("std_inter_arrival_ms", "f8", "ms", "feature", "population standard deviation of inter-arrival times"),
        ("total_payload", "u8", "bytes", "feature", "L4 payload bytes (IP length minus IP and L4 headers)"),
        ("avg_payload", "f8", "bytes", "feature", "mean L4 payload per packet"),
        ("unique_src_ips", "u4", "", "feature", "distinct source addresses"),
        ("unique_dst_ips", "u4", "", "feature", "distinct destination addresses"),
        ("unique_src_ports", "u4", "", "feature", "distinct source ports"),
        ("unique_dst_ports", "u4", "", "feature", "distinct destination ports"),
        ("proto_tcp", "u4", "packets", "feature", "TCP packets"),
        ("proto_udp", "u4", "packets", "feature", "UDP packets"),
        ("proto_icmp", "u4", "packets", "feature", "ICMP and ICMPv6 packets"),
        ("proto_other", "u4", "packets", "feature", "packets of other IP protocols"),
        ("protocol_distribution", "O", "", "feature", "JSON object text: IP protocol number -> packets"),
        (
            "tunnel_packets",
            "u4",
            "packets",
            "feature",
            "packets decapsulated from a tunnel (not the wireguard / esp labelled ones: tunnel_distribution)",
        ),
        ("unique_tunnel_ids", "u4", "", "feature", "distinct (tunnel_type, tunnel_id) pairs among the tunnel_packets"),
        ("unique_outer_src_ips", "u4", "", "feature", "distinct outer (tunnel) source addresses of the tunnel_packets"),
        ("unique_outer_dst_ips", "u4", "", "feature", "distinct outer (tunnel) destination addresses"),
        ("tunnel_distribution", "O", "", "feature", "JSON object text: tunnel_type -> packets, none included"),
    ]
)

PACKET = _t(
    [
        ("timestamp_ns", "u8", "ns", "time", "Unix time the packet was seen"),
        ("interface", "O", "", "key", "interface name"),
        ("hook", "O", "", "key", "xdp, tc_ingress or tc_egress"),
        ("src_ip", "S16", "", "key", "source address (IPv4 mapped)"),
        ("dst_ip", "S16", "", "key", "destination address"),
        ("ip_version", "u1", "", "feature", "4 or 6"),
        ("protocol", "u1", "", "feature", "IP protocol number"),
        ("pr_tcp", "?", "", "feature", "protocol is TCP"),
        ("pr_udp", "?", "", "feature", "protocol is UDP"),
        ("pr_icmp", "?", "", "feature", "protocol is ICMP or ICMPv6"),
        ("pr_other", "?", "", "feature", "any other protocol"),
        ("tcp_fin", "?", "", "feature", "TCP FIN flag"),
        ("tcp_syn", "?", "", "feature", "TCP SYN flag"),
        ("tcp_rst", "?", "", "feature", "TCP RST flag"),
        ("tcp_psh", "?", "", "feature", "TCP PSH flag"),
        ("tcp_ack", "?", "", "feature", "TCP ACK flag"),
        ("tcp_urg", "?", "", "feature", "TCP URG flag"),
        ("tcp_ece", "?", "", "feature", "TCP ECE flag"),
        ("tcp_cwr", "?", "", "feature", "TCP CWR flag"),
        ("src_port", "u2", "", "feature", "source port (0 without ports)"),
        ("src_port_low", "?", "", "feature", "src_port < 1024"),
        ("src_port_mid", "?", "", "feature", "1024 <= src_port < 49152"),
        ("src_port_high", "?", "", "feature", "src_port >= 49152"),
        ("dst_port", "u2", "", "feature", "destination port"),
        ("dst_port_low", "?", "", "feature", "dst_port < 1024"),
        ("dst_port_mid", "?", "", "feature", "1024 <= dst_port < 49152"),
        ("dst_port_high", "?", "", "feature", "dst_port >= 49152"),
        ("pkt_len", "u4", "bytes", "feature", "L2 frame bytes (a GSO super-packet's whole length; see segs)"),
        ("payload_len", "u2", "bytes", "feature", "L4 payload bytes"),
        ("tos", "u1", "", "feature", "IPv4 ToS / IPv6 traffic class"),
        ("ip_dscp", "u1", "", "feature", "tos >> 2"),
        ("ip_ihl", "u1", "words", "feature", "IPv4 header length in 32-bit words (0 for IPv6)"),
        ("ip_total_length", "u2", "bytes", "feature", "IPv4 total length / IPv6 payload length + 40"),
        ("ip_frag_offset", "u2", "8 bytes", "feature", "fragment offset (flags masked off)"),
        ("ip_flags", "u1", "", "feature", "IPv4 flags: 2 DF, 1 MF"),
        ("ip_id", "u2", "", "feature", "IPv4 identification"),
        ("ip_ttl", "u1", "hops", "feature", "TTL / hop limit"),
        ("tcp_sequence_num", "u4", "", "feature", "TCP sequence number"),
        ("tcp_ack_num", "u4", "", "feature", "TCP acknowledgement number"),
        ("tcp_window_size", "u2", "", "feature", "TCP window field (unscaled)"),
        ("tcp_urgent_pointer", "u2", "", "feature", "TCP urgent pointer"),
        ("vlan_id", "u2", "", "feature", "outermost VLAN id, 0 untagged"),
        ("segs", "u2", "packets", "feature", "wire segments this record stands for (GSO), 1 normally"),
        (
            "tunnel_type",
            "O",
            "",
            "key",
            "tunnel the packet was decapsulated from (the header fields above then describe the inner packet, "
            "pkt_len the outer frame), wireguard or esp (encrypted, not decapsulated); none",
        ),
        ("tunnel_id", "u4", "", "key", "VXLAN/Geneve VNI, GRE key, GTP-U TEID or ESP SPI; 0 if none"),
        ("outer_src_ip", "S16", "", "key", "outer (tunnel) source address, IPv4 mapped; all zero if not decapsulated"),
        ("outer_dst_ip", "S16", "", "key", "outer (tunnel) destination address"),
    ]
)

# A sampled decision of the model in an agent's kernel (agent/model.py DECISION_SPECS);
# the model's inputs follow as x_<feature> int64 columns, which differ by model.
DECISION = _t(
    [
        ("timestamp_ns", "u8", "ns", "time", "Unix time of the decision"),
        ("lo_ip", "S16", "", "key", "the flow key's lower address (IPv4 mapped)"),
        ("hi_ip", "S16", "", "key", "the flow key's higher address"),
        ("lo_port", "u2", "", "key", "port of lo_ip"),
        ("hi_port", "u2", "", "key", "port of hi_ip"),
        ("protocol", "u1", "", "key", "IP protocol number"),
        ("ifindex", "u4", "", "key", "interface index the packet was classified on"),
        ("model_id", "u4", "", "meta", "the model's id (xdpml model show)"),
        ("class", "i4", "", "meta", "the class index the kernel chose"),
        ("action", "O", "", "meta", "the class's action: pass, alert, drop or rate-limit"),
        ("dropped", "?", "", "meta", "the packet was dropped"),
    ]
)

V1 = {"flow": FLOW, "window": WINDOW, "packet": PACKET, "decision": DECISION}
