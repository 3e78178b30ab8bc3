/* abi.h - structs shared by the kernel programs and user space.
 *
 * This file is the kernel/user contract. agent/bpf/abi.py mirrors every struct
 * with ctypes and tests/bpf/test_abi.py checks sizes and offsets against this
 * file compiled by the host C compiler. Change both together.
 *
 * Sizes: packet sizes are L2 frame bytes as on the wire without FCS (a VLAN tag
 * offloaded to skb metadata is counted back in); for a decapsulated tunnel packet
 * too: the outer frame, headers of every tunnel included (bpf/tunnel.h). Times are CLOCK_MONOTONIC ns
 * (bpf_ktime_get_ns); user space converts them to Unix time.
 */
#ifndef XDPML_ABI_H
#define XDPML_ABI_H

/* The includer provides __u8..__u64 and struct bpf_spin_lock first: the BPF
 * programs through <uapi/linux/bpf.h> (BCC), the ABI test through the host's
 * <linux/bpf.h>. */

#ifndef XDPML_FIRST_N
#define XDPML_FIRST_N 10 /* packets per flow kept for sequence features */
#endif

/* Flow key, normalised so both directions of a conversation hit one entry:
 * the (ip, port) pair that sorts lower is "lo". Which side started the flow is
 * in the value (init_lo_to_hi), so user space can name initiator -> responder. */
struct flow_key {
    __u8  lo_ip[16];     /* IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d) */
    __u8  hi_ip[16];
    __u16 lo_port;       /* host byte order; 0 for protocols without ports */
    __u16 hi_port;
    __u8  proto;         /* IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6...) */
    __u8  ip_version;    /* 4 or 6 */
    __u16 vlan_id;       /* outermost 802.1Q VLAN id, 0 if untagged */
    __u32 ifindex;       /* interface the packet was seen on */
    __u32 vni;           /* VXLAN/Geneve VNI of a decapsulated packet, else 0 (tenant
                          * address spaces may overlap; GRE keys and TEIDs may differ per
                          * direction, so they are not part of the key) */
};

/* Tunnel types (bpf/tunnel.h): the outermost tunnel a flow's packets were
 * decapsulated from, or the encrypted tunnel a flow is (wireguard, esp). */
enum xdpml_tunnel {
    XDPML_TUNNEL_NONE = 0,
    XDPML_TUNNEL_VXLAN,
    XDPML_TUNNEL_GENEVE,
    XDPML_TUNNEL_IPIP,       /* IPv4 in IPv4 */
    XDPML_TUNNEL_6IN4,       /* IPv6 in IPv4 (sit) */
    XDPML_TUNNEL_4IN6,       /* IPv4 in IPv6 */
    XDPML_TUNNEL_6IN6,       /* IPv6 in IPv6 */
    XDPML_TUNNEL_GRE,        /* GRE carrying IPv4 / IPv6 */
    XDPML_TUNNEL_GRETAP,     /* GRE carrying Ethernet (0x6558) */
    XDPML_TUNNEL_GTPU,
    XDPML_TUNNEL_WIREGUARD,  /* not decapsulated: encrypted */
    XDPML_TUNNEL_ESP,        /* not decapsulated: encrypted */
};

/* Per-direction accumulators. Sums of squares let user space compute exact
 * means and standard deviations without per-packet data. Inter-arrival times
 * are summed in ns and their squares in ns^2, 128 bits wide: the sum of squares
 * is at most (flow duration in ns)^2, so only a flow longer than 584 years could
 * overflow it (64 bits of ns^2 would overflow on one gap of 4.3 s). */
struct dir_stats {
    __u64 packets;
    __u64 bytes;         /* L2 frame bytes */
    __u64 first_ns;
    __u64 last_ns;
    __u64 size_sumsq;    /* sum of frame size^2 (bytes^2) */
    __u64 iat_sum_ns;    /* inter-arrival times between packets of this direction */
    __u64 iat_sumsq_lo;  /* sum of iat_ns^2 in 128 bits: low 64 bits ... */
    __u64 iat_sumsq_hi;  /* ... and high 64 bits */
    __u64 iat_min_ns;
    __u64 iat_max_ns;
    __u32 flag_count[8]; /* TCP flags in header bit order: FIN SYN RST PSH ACK URG ECE CWR */
    __u32 size_min;
    __u32 size_max;
    __u16 init_window;   /* TCP window of the first packet (unscaled) */
    __u8  ttl;           /* IPv4 TTL / IPv6 hop limit of the first packet */
    __u8  tos;           /* IPv4 ToS / IPv6 traffic class of the first packet */
    __u8  seen_at;       /* XDPML_SEEN_*: hooks this direction's packets were seen at */
    __u8  _pad[3];
};

/* dir_stats.seen_at: where on the interface a direction's packets were seen, so user
 * space can say how a conversation crossed each interface (seen_on, docs/features.md). */
#define XDPML_SEEN_INGRESS 1 /* XDP or TC ingress: received on the interface */
#define XDPML_SEEN_EGRESS  2 /* TC egress: sent out of the interface */

/* Bidirectional inter-arrival accumulators (cannot be derived from the two
 * directions: they need the interleaving). */
struct iat_stats {
    __u64 sum_ns;
    __u64 sumsq_lo;      /* sum of iat_ns^2 in 128 bits, as in dir_stats */
    __u64 sumsq_hi;
    __u64 min_ns;
    __u64 max_ns;
};

/* One of the first N packets of a flow (seed 003: bounded per-session capture). */
struct seq_entry {
    __u32 piat_us;       /* time since the previous packet of the flow, microseconds; 0 for the first */
    __u16 size;          /* L2 frame bytes (saturates at 65535) */
    __u8  dir;           /* 0 initiator -> responder, 1 responder -> initiator */
    __u8  flags;         /* TCP flags byte */
};

#define XDPML_END_FIN_INIT  1 /* FIN seen from the initiator */
#define XDPML_END_FIN_RESP  2 /* FIN seen from the responder */
#define XDPML_END_RST       4 /* RST seen */
#define XDPML_EARLY_SENT 0x80 /* end_flags bit: the early-export notice for this entry went out */

/* early_events record: the key of a flow that reached XDPML_EARLY_PACKETS packets (or
 * got a packet XDPML_EARLY_MS after its first); user space exports a snapshot of it. */
struct early_event {
    struct flow_key key;
};

struct flow_value {
    struct bpf_spin_lock lock;
    __u8  init_lo_to_hi; /* 1: the first packet went lo -> hi */
    __u8  end_flags;     /* XDPML_END_* */
    __u8  tcp_flags_or;  /* OR of every packet's TCP flags */
    __u8  n_seq;         /* valid entries in seq[] */
    /* enforcement decision cache (bpf/rules.h), one per direction slot (rules are
     * directional; rules.h enf_dir() picks the slot): the rule slot decided (0 none,
     * XDPML_ENF_SLOT_ALLOWLISTED) at rule-set generation enf_gen (0 = never). Kept in
     * the entry's first cache line, which every packet's update writes anyway. */
    __u32 enf_gen[2];
    __u32 enf_slot[2];
    __u64 first_ns;
    __u64 last_ns;
    struct iat_stats iat;
    struct dir_stats dir[2]; /* [0] initiator -> responder, [1] the reverse */
    /* tunnel of the flow's first packet (bpf/tunnel.h); all zero when not tunnelled */
    __u8  outer_src_ip[16];  /* outer source address (IPv4 mapped) */
    __u8  outer_dst_ip[16];
    __u32 tunnel_id;     /* VNI, GRE key, TEID, ESP SPI; 0 if none */
    __u8  tunnel_type;   /* enum xdpml_tunnel */
    __u8  _tpad[3];
#if XDPML_FIRST_N > 0
    struct seq_entry seq[XDPML_FIRST_N];
#endif
    /* the kernel model's decision (model.h, -DXDPML_MODEL=1; zero without it): the class
     * of the flow's last classified packet plus one (0: never classified) and the
     * model_id of the model that gave it. Appended: the fields above keep their offsets. */
    __u32 model_id;
    __u16 model_class;
    __u16 _model_pad;
};

/* Hooks, as recorded in events and counters. */
#define XDPML_HOOK_XDP        0
#define XDPML_HOOK_TC_INGRESS 1
#define XDPML_HOOK_TC_EGRESS  2

/* Compact record of every packet, streamed only when window features are on. */
struct win_event {
    __u64 ts_ns;
    __u8  src_ip[16];
    __u8  dst_ip[16];
    __u16 src_port;
    __u16 dst_port;
    __u32 size;          /* L2 frame bytes of one segment (see segs) */
    __u32 payload;       /* L4 payload bytes of one segment */
    __u16 segs;          /* segments this record stands for (TC sees GSO super-packets) */
    __u8  proto;
    __u8  ip_version;
    __u32 ifindex;
    __u32 last_size;     /* frame bytes of the last segment when segs > 1 */
    /* the tunnel the packet was decapsulated from (bpf/tunnel.h), all zero when none;
     * src_ip..proto above are then the inner packet's, size the outer frame's */
    __u8  tunnel_type;   /* enum xdpml_tunnel */
    __u8  _tpad[3];
    __u32 tunnel_id;     /* VNI, GRE key, TEID, ESP SPI */
    __u8  outer_src_ip[16];
    __u8  outer_dst_ip[16];
};

/* Sampled per-packet record: seed 001's schema plus seed 004's header fields. */
struct pkt_event {
    __u64 ts_ns;
    __u8  src_ip[16];
    __u8  dst_ip[16];
    __u16 src_port;
    __u16 dst_port;
    __u32 pkt_len;       /* L2 frame bytes (whole super-packet when segs > 1) */
    __u32 ifindex;
    __u16 ip_len;        /* IPv4 total length / IPv6 payload length + 40 */
    __u16 payload_len;   /* L4 payload bytes */
    __u16 frag_off;      /* IPv4 flags+fragment offset field, host order; 0 for IPv6 */
    __u16 ip_id;
    __u32 tcp_seq;
    __u32 tcp_ack;
    __u16 tcp_window;
    __u16 tcp_urg_ptr;
    __u16 vlan_id;
    __u16 segs;
    __u8  proto;
    __u8  ip_version;
    __u8  ihl;           /* IPv4 header length in 32-bit words; 0 for IPv6 */
    __u8  ttl;
    __u8  tos;
    __u8  tcp_flags;
    __u8  hook;
    __u8  tunnel_type;   /* enum xdpml_tunnel of a decapsulated packet (then the header
                          * fields above are the inner packet's, pkt_len the outer frame's) */
    __u32 tunnel_id;     /* VNI, GRE key, TEID, ESP SPI */
    __u8  outer_src_ip[16]; /* outer (tunnel) addresses, IPv4 mapped; zero when none */
    __u8  outer_dst_ip[16];
};

/* Per-CPU counters: index into the counters array. User space sums CPUs. */
enum xdpml_counter {
    C_PKT_XDP = 0,
    C_PKT_TC_INGRESS,
    C_PKT_TC_EGRESS,
    C_ERR_TRUNC_ETH,      /* shorter than an Ethernet header */
    C_ERR_TRUNC_VLAN,     /* VLAN tag cut short, or more than 2 tags */
    C_ERR_TRUNC_IP,       /* IP header cut short */
    C_ERR_BAD_IHL,        /* IPv4 IHL < 5 or beyond the packet */
    C_ERR_BAD_IP_LEN,     /* IP total length smaller than its header */
    C_ERR_TRUNC_L4,       /* TCP/UDP/ICMP header cut short by the frame: port-less flow */
    C_ERR_IPV6_EXT,       /* IPv6 extension chain longer than we follow, or cut short */
    C_FRAG_NONFIRST,      /* IP fragments after the first: port-less flow of their protocol */
    C_OTHER_L3,           /* not IPv4/IPv6 (ARP, LLDP...) */
    C_FLOW_NEW,           /* flows created */
    C_FLOW_FULL,          /* flow table full: packet not counted in any flow */
    C_FLOW_BUSY,          /* other insert failure (memory, race) */
    C_RB_WIN_FULL,        /* window ring buffer full: window record lost */
    C_RB_PKT_FULL,        /* sample ring buffer full: sample lost */
    C_PKT_SAMPLED,        /* samples written */
    C_GSO_SEGS,           /* extra segments accounted from GSO super-packets */
    C_L4_TRUNC_IP_LEN,    /* TCP/UDP/ICMP header (TCP: with options) beyond the IP length: port-less flow */
    C_ERR_TCP_DOFF,       /* TCP data offset below 5 words: port-less flow */
    /* enforcement (bpf/rules.h); packets, GSO segments counted as wire packets */
    C_ENF_DECIDED,        /* rule decisions taken (first packet of a flow per rule-set generation) */
    C_ENF_ALLOWLISTED,    /* packets a rule matched but the allowlist passed */
    C_ENF_EXPIRED,        /* decisions that found an expired rule and ignored it */
    C_ENF_PASSED,         /* packets matched by a pass rule */
    C_ENF_WOULD_DROP,     /* packets a rule would drop (dry-run mode or dry-run rule) */
    C_ENF_DROPPED,        /* packets dropped by a rule (enforce mode) */
    C_ENF_KILL_PASSED,    /* packets a rule matched that the kill switch passed */
    C_MODEL_ERR,          /* model walk reached no leaf / index out of range: not classified */
    /* tunnels (bpf/tunnel.h): every reason below leaves the packet in its outer flow */
    C_TUN_DECAP,          /* packets decapsulated: accounted to their inner flow */
    C_TUN_TRUNC,          /* tunnel header cut short by the frame, the outer IP length or the outer UDP length */
    C_TUN_BAD_VXLAN,      /* VXLAN header without the I (valid VNI) flag */
    C_TUN_BAD_GENEVE,     /* Geneve version != 0, or its options past the packet (or the UDP length) */
    C_TUN_BAD_GRE,        /* GRE with routing/recursion/unknown flags or version != 0 */
    C_TUN_BAD_GTPU,       /* GTP-U version/PT wrong, or an extension header chain we do not follow */
    C_TUN_UNKNOWN_PROTO,  /* GRE/Geneve payload type not decoded (not IPv4, IPv6, Ethernet) */
    C_TUN_BAD_INNER,      /* the inner packet does not parse (cut short, bad header) */
    C_TUN_TOO_DEEP,       /* more nested tunnels than XDPML_TUNNEL_MAX_DEPTH */
    C_TUN_FRAGMENT,       /* tunnel packet fragmented (its inner packet is incomplete) */
    C_EARLY_SENT,         /* early-export notices written (one per flow entry at most) */
    C_RB_EARLY_FULL,      /* early ring buffer full: notice lost (the flow is exported at its timeouts) */
    C_ENF_DROPPED_BYTES,  /* frame bytes of the packets counted in C_ENF_DROPPED */
    C_ENF_WOULD_DROP_BYTES, /* frame bytes of the packets counted in C_ENF_WOULD_DROP */
    C_HAIRPIN,            /* TC egress: packets routed back out of the interface they came in on,
                           * already accounted by its ingress hook (only seen_at is updated) */
    C_COUNTERS_MAX,
};

/* ---- enforcement (bpf/rules.h, docs/enforcement.md) ---------------------------- */

/* Modes. A zeroed config (fresh maps) is dry-run: the fail-safe default. */
#define XDPML_ENF_DRY_RUN 0   /* rules match and count "would drop"; traffic passes */
#define XDPML_ENF_OFF     1   /* rules are not looked at */
#define XDPML_ENF_ENFORCE 2   /* rules act */

#define XDPML_ACT_PASS       1
#define XDPML_ACT_DROP       2
#define XDPML_ACT_RATE_LIMIT 3

#define XDPML_RULE_DRY_RUN 1  /* rule flag: this rule only counts, whatever the mode */
#define XDPML_RULE_NO_EXPORT 2 /* pass rule flag: flows it matched are not exported (user space
                                * reads the decision cached in the flow entry; the kernel ignores it) */

#define XDPML_ENF_SLOT_ALLOWLISTED 0xffffffffu

/* enf_config[0], written by user space only (under its lock file). */
struct enf_config {
    __u32 mode;          /* XDPML_ENF_* */
    __u32 gen;           /* rule-set generation: bumped on every change; cached decisions
                          * older than it are taken again */
    __u32 rules;         /* rules installed; 0: the hook returns at once */
    __u32 exact;         /* entries per match map: empty maps are not looked up */
    __u32 src4;
    __u32 dst4;
    __u32 src6;
    __u32 dst6;
};

/* enf_exact key: one direction of a 5-tuple (a two-way rule has two entries). */
struct enf_exact_key {
    __u8  src_ip[16];    /* IPv4 as IPv4-mapped IPv6 */
    __u8  dst_ip[16];
    __u16 src_port;      /* host byte order */
    __u16 dst_port;
    __u8  proto;
    __u8  _pad[3];
};

/* enf_exact value: the rule slot; reverse = 1 for the entry of a two-way rule's
 * reverse direction (user space lists the rule by its forward entry). */
struct enf_exact_val {
    __u32 slot;
    __u32 reverse;
};

struct enf_lpm4_key {
    __u32 prefixlen;
    __u8  addr[4];
};

struct enf_lpm6_key {
    __u32 prefixlen;
    __u8  addr[16];
};

/* enf_rules[slot]: the rule the match maps point at. Slot 0 is never used. */
struct enf_rule {
    struct bpf_spin_lock lock; /* token bucket update */
    __u32 gen;           /* generation the rule was written at */
    __u64 expires_ns;    /* CLOCK_MONOTONIC; at or after it the rule never acts; 0 = empty */
    __u64 tat_pkt_ns;    /* token buckets as GCRA: theoretical arrival times */
    __u64 tat_byte_ns;
    __u64 ns_per_pkt;    /* 1e9 / packets per second; 0 = no packet limit */
    __u64 ps_per_byte;   /* 1e12 / bytes per second; 0 = no byte limit */
    __u64 burst_pkt_ns;  /* packet burst * ns_per_pkt */
    __u64 burst_byte_ns; /* byte burst * ps_per_byte / 1000 */
    __u64 hit_packets;   /* packets matched, whatever the action */
    __u64 hit_bytes;
    __u64 drop_packets;  /* dropped, or would have been (dry-run) */
    __u64 first_hit_ns;
    __u64 last_hit_ns;
    __u8  action;        /* XDPML_ACT_* */
    __u8  proto;         /* LPM rules: 0 any, else this IP protocol only */
    __u16 dst_port;      /* LPM rules: 0 any, else this destination port only */
    __u8  flags;         /* XDPML_RULE_* */
    __u8  _pad[3];
};

#endif /* XDPML_ABI_H */
