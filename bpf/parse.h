/* parse.h - bounds-checked parsers for Ethernet, 802.1Q/802.1ad, IPv4, IPv6
 * (bounded extension-header chain), TCP, UDP, ICMP and ICMPv6.
 *
 * parse_packet() returns 0 when the packet belongs to a flow, otherwise the
 * counter (enum xdpml_counter) that explains why not. A packet whose L4 header
 * cannot be read (non-first fragment, header cut by the IP length or by the
 * frame, bad TCP data offset) still belongs to a flow: the port-less flow of its
 * protocol, with p->l4_note set to the counter of the reason. Callers always pass
 * the packet on: parsing never decides a verdict (fail open). A tunnel's inner
 * packet is parsed by the same functions (tunnel.h). */
#ifndef XDPML_PARSE_H
#define XDPML_PARSE_H

#include "abi.h"

#define ETH_HLEN_ 14
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define MAX_VLAN_TAGS 2
#ifndef XDPML_IPV6_MAX_EXT
#define XDPML_IPV6_MAX_EXT 8 /* extension headers followed before giving up */
#endif

struct pkt_info {
    __u8  src_ip[16];
    __u8  dst_ip[16];
    __u16 src_port;
    __u16 dst_port;
    __u16 vlan_id;
    __u16 ip_len;
    __u16 frag_off;
    __u16 ip_id;
    __u16 tcp_window;
    __u16 tcp_urg;
    __u32 tcp_seq;
    __u32 tcp_ack;
    __u32 hdr_len;   /* bytes from frame start to L4 payload */
    __u32 l3_end;    /* frame offset where the IP datagram ends (from its length field) */
    __u32 payload;   /* L4 payload bytes inside the IP length (0 when the L4 header is cut) */
    __u8  proto;
    __u8  ip_version;
    __u8  ttl;
    __u8  tos;
    __u8  tcp_flags;
    __u8  ihl;
    __u8  has_vlan;
    __u8  l4_note;   /* counter for a packet put in its protocol's port-less flow, else 0 */
    /* tunnel.h: the outermost tunnel decapsulated (all zero when none) */
    __u8  tunnel_type; /* enum xdpml_tunnel; also the encrypted labels (wireguard, esp) */
    __u8  _tpad;
    __u16 udp_len;     /* UDP length field (set with the ports of a UDP packet, read only then) */
    __u32 tunnel_id;   /* VNI, GRE key, TEID (ESP: SPI) of the first decapsulated header */
    __u32 tunnel_vni;  /* VXLAN/Geneve VNI: part of the flow key (abi.h flow_key.vni) */
    __u8  outer_src_ip[16];
    __u8  outer_dst_ip[16];
} __attribute__((aligned(8))); /* 8: copies and zeroing move 8 bytes at a time */

#ifndef XDPML_TUNNEL_MAX_DEPTH
#define XDPML_TUNNEL_MAX_DEPTH 1 /* tunnels decapsulated per packet (1..4), tunnel.h */
#endif
#define PKT_SLOT_LEVELS 8 /* >= 1 + XDPML_TUNNEL_MAX_DEPTH, a power of two (see pkt_level) */

/* pkt_slot: where a hook parses its packet (per CPU, one slot per hook; a hook's run
 * is never interrupted by another run of the same hook on its CPU, as the per-CPU
 * counters already assume): pk[0] the packet as on the wire, pk[d] its inner packet d
 * tunnels deep (tunnel.h), so falling back to the outer packet copies nothing. In map memory, not on the stack, on purpose: the
 * verifier does not track values stored there, so every parse path reaches the flow
 * update in (nearly) one state and the code after the parser is verified once, not
 * once per parse path; this keeps the program with tunnels, windows, rules and a model
 * far below the verifier's 1M-instruction budget. */
struct pkt_slot {
    struct pkt_info pk[PKT_SLOT_LEVELS];
};
BPF_TABLE("percpu_array", __u32, struct pkt_slot, pkt_slots, 3);

/* The hook's slot with a zeroed pk[0], NULL never in practice (the caller passes). */
static __always_inline struct pkt_slot *pkt_slot_get(__u32 hook)
{
    struct pkt_slot *s = pkt_slots.lookup(&hook);
    if (s)
        __builtin_memset(&s->pk[0], 0, sizeof(s->pk[0]));
    return s;
}

/* &s->pk[level] with the level masked where the verifier sees it: one state for the
 * code after the parser, whatever level the packet ended at. */
static __always_inline struct pkt_info *pkt_level(struct pkt_slot *s, __u32 level)
{
    asm volatile("" : "+r"(level));
    return &s->pk[level & (PKT_SLOT_LEVELS - 1)];
}

struct vlan_hdr_ {
    __be16 tci;
    __be16 proto;
};

static __always_inline void ip4_mapped(__u8 *dst, __be32 addr)
{
    __u32 *d = (__u32 *)dst;
    d[0] = 0;
    d[1] = 0;
    d[2] = bpf_htonl(0x0000ffff);
    d[3] = addr;
}

/* The L4 header is read only when the IP length covers all of it (TCP: with its
 * options) and the frame holds the fixed part we read; otherwise the packet
 * joins the port-less flow of its protocol and p->l4_note names the reason
 * (counted by flow_account). Bytes past the IP length (Ethernet padding) are
 * never read as L4 and never count as payload. */
static __always_inline int l4_portless(struct pkt_info *p, __u8 why)
{
    p->l4_note = why;
    p->payload = 0; /* a partial L4 header is no payload */
    return 0;
}

static __always_inline int parse_l4(void *data, void *l4, void *end, struct pkt_info *p)
{
    __u32 off = (__u32)(l4 - data);
    __u32 room = p->l3_end > off ? p->l3_end - off : 0; /* L4 bytes inside the IP length */
    __u32 l4len;
    p->hdr_len = off;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if (room < sizeof(*th))
            return l4_portless(p, C_L4_TRUNC_IP_LEN);
        if ((void *)(th + 1) > end)
            return l4_portless(p, C_ERR_TRUNC_L4);
        l4len = th->doff * 4;
        if (l4len < sizeof(*th))
            return l4_portless(p, C_ERR_TCP_DOFF);
        if (room < l4len)
            return l4_portless(p, C_L4_TRUNC_IP_LEN);
        p->src_port = bpf_ntohs(th->source);
        p->dst_port = bpf_ntohs(th->dest);
        p->tcp_seq = bpf_ntohl(th->seq);
        p->tcp_ack = bpf_ntohl(th->ack_seq);
        p->tcp_window = bpf_ntohs(th->window);
        p->tcp_urg = bpf_ntohs(th->urg_ptr);
        p->tcp_flags = ((__u8 *)th)[13];
    } else if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if (room < sizeof(*uh))
            return l4_portless(p, C_L4_TRUNC_IP_LEN);
        if ((void *)(uh + 1) > end)
            return l4_portless(p, C_ERR_TRUNC_L4);
        p->src_port = bpf_ntohs(uh->source);
        p->dst_port = bpf_ntohs(uh->dest);
        p->udp_len = bpf_ntohs(uh->len);
        l4len = sizeof(*uh);
    } else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
        /* type, code, checksum and 4 bytes of rest-of-header; ports stay 0
         * (NFStream's convention) */
        if (room < 8)
            return l4_portless(p, C_L4_TRUNC_IP_LEN);
        if (l4 + 8 > end)
            return l4_portless(p, C_ERR_TRUNC_L4);
        l4len = 8;
    } else {
        l4len = 0; /* 'other' L4: a flow keyed by addresses and protocol */
    }
    p->hdr_len = off + l4len;
    p->payload = room - l4len;
    return 0;
}

/* A fragment after the first: its bytes continue the datagram's L4 payload, so
 * no header is read from them (they may look like anything, a TCP SYN...). */
static __always_inline int l4_nonfirst_fragment(void *data, void *cur, struct pkt_info *p)
{
    __u32 off = (__u32)(cur - data);
    p->hdr_len = off;
    p->payload = p->l3_end > off ? p->l3_end - off : 0;
    p->l4_note = C_FRAG_NONFIRST;
    return 0;
}

static __always_inline int parse_ipv4(void *l3, void *data, void *end, struct pkt_info *p)
{
    struct iphdr *iph = l3;
    if ((void *)(iph + 1) > end)
        return C_ERR_TRUNC_IP;
    if (iph->ihl < 5)
        return C_ERR_BAD_IHL;
    __u32 hlen = (iph->ihl & 0xf) * 4;
    if (l3 + hlen > end)
        return C_ERR_BAD_IHL;
    __u16 tot = bpf_ntohs(iph->tot_len);
    if (tot < hlen)
        return C_ERR_BAD_IP_LEN;
    p->ip_version = 4;
    p->ihl = iph->ihl;
    p->proto = iph->protocol;
    p->ttl = iph->ttl;
    p->tos = iph->tos;
    p->ip_len = tot;
    p->ip_id = bpf_ntohs(iph->id);
    p->frag_off = bpf_ntohs(iph->frag_off);
    ip4_mapped(p->src_ip, iph->saddr);
    ip4_mapped(p->dst_ip, iph->daddr);
    p->l3_end = (__u32)(l3 - data) + tot;
    if (p->frag_off & 0x1fff)
        return l4_nonfirst_fragment(data, l3 + hlen, p);
    return parse_l4(data, l3 + hlen, end, p);
}

static __always_inline int parse_ipv6(void *l3, void *data, void *end, struct pkt_info *p)
{
    struct ipv6hdr *ip6 = l3;
    if ((void *)(ip6 + 1) > end)
        return C_ERR_TRUNC_IP;
    p->ip_version = 6;
    p->ttl = ip6->hop_limit;
    p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
    __u16 plen = bpf_ntohs(ip6->payload_len);
    p->ip_len = plen + sizeof(*ip6);
    __builtin_memcpy(p->src_ip, &ip6->saddr, 16);
    __builtin_memcpy(p->dst_ip, &ip6->daddr, 16);
    /* payload length 0: a jumbogram (or BIG TCP) whose length is elsewhere; the
     * frame bounds it instead */
    p->l3_end = plen ? (__u32)(l3 - data) + p->ip_len : (__u32)(end - data);

    __u8 nexthdr = ip6->nexthdr;
    void *cur = l3 + sizeof(*ip6);
#pragma unroll
    for (int i = 0; i < XDPML_IPV6_MAX_EXT; i++) {
        __u32 len;
        if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
            nexthdr == IPPROTO_DSTOPTS || nexthdr == 135 /* mobility */) {
            __u8 *h = cur;
            if ((void *)(h + 2) > end)
                return C_ERR_IPV6_EXT;
            nexthdr = h[0];
            len = ((__u32)h[1] + 1) * 8;
        } else if (nexthdr == IPPROTO_AH) {
            __u8 *h = cur;
            if ((void *)(h + 2) > end)
                return C_ERR_IPV6_EXT;
            nexthdr = h[0];
            len = ((__u32)h[1] + 2) * 4;
        } else if (nexthdr == IPPROTO_FRAGMENT) {
            __u8 *h = cur;
            if ((void *)(h + 8) > end)
                return C_ERR_IPV6_EXT;
            nexthdr = h[0];
            __u16 off = ((__u16)h[2] << 8) | h[3];
            p->frag_off = off;
            if (off & 0xfff8) {
                p->proto = nexthdr;
                return l4_nonfirst_fragment(data, cur + 8, p);
            }
            len = 8;
        } else {
            p->proto = nexthdr;
            return parse_l4(data, cur, end, p);
        }
        cur += len;
    }
    return C_ERR_IPV6_EXT;
}

/* Ethernet and up to two VLAN tags at l2; *l3 and *proto say what follows. The
 * first tag seen is kept (p->has_vlan already set, e.g. a tag TC found offloaded in
 * skb metadata or an outer packet's: later tags are skipped, not recorded). */
static __always_inline int parse_l2(void *l2, void *end, struct pkt_info *p, void **l3, __u16 *proto_out)
{
    struct ethhdr *eth = l2;
    if ((void *)(eth + 1) > end)
        return C_ERR_TRUNC_ETH;
    __u16 proto = bpf_ntohs(eth->h_proto);
    void *cur = l2 + ETH_HLEN_;
#pragma unroll
    for (int i = 0; i < MAX_VLAN_TAGS; i++) {
        if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
            break;
        struct vlan_hdr_ *vh = cur;
        if ((void *)(vh + 1) > end)
            return C_ERR_TRUNC_VLAN;
        if (!p->has_vlan) {
            p->vlan_id = bpf_ntohs(vh->tci) & 0x0fff;
            p->has_vlan = 1;
        }
        proto = bpf_ntohs(vh->proto);
        cur += sizeof(*vh);
    }
    if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_)
        return C_ERR_TRUNC_VLAN; /* a third tag: not followed */
    *l3 = cur;
    *proto_out = proto;
    return 0;
}

#define PARSE_ETH  0 /* parse_at: an Ethernet frame starts at the offset */
#define PARSE_IP   1 /* ... an IP packet, version from its first nibble */
#define PARSE_IPV4 4 /* ... an IPv4 packet (the version nibble must say 4) */
#define PARSE_IPV6 6 /* ... an IPv6 packet (the version nibble must say 6) */

#ifndef XDPML_PARSE_MAX_OFF
#define XDPML_PARSE_MAX_OFF 1024 /* an inner packet starting further in is not followed */
#endif

/* Parse the packet (L2 or L3, per `kind`) that starts `off` bytes into the frame.
 * One code path for the outer packet and every decapsulated one (tunnel.h), so the
 * parsers exist once in the program. */
static __always_inline int parse_at(void *data, void *end, __u32 off, __u8 kind, struct pkt_info *p)
{
    if (off > XDPML_PARSE_MAX_OFF)
        return C_ERR_TRUNC_IP;
    void *cur = data + off;
    __u16 proto;
    if (kind == PARSE_ETH) {
        int rc = parse_l2(cur, end, p, &cur, &proto);
        if (rc)
            return rc;
    } else {
        __u8 *b = cur;
        if ((void *)(b + 1) > end)
            return C_ERR_TRUNC_IP;
        __u8 v = b[0] >> 4;
        if (kind != PARSE_IP && v != kind)
            return C_ERR_TRUNC_IP; /* tunnel.h counts it as a bad inner packet */
        proto = v == 4 ? ETH_P_IP_ : v == 6 ? ETH_P_IPV6_ : 0;
    }
    if (proto == ETH_P_IP_)
        return parse_ipv4(cur, data, end, p);
    if (proto == ETH_P_IPV6_)
        return parse_ipv6(cur, data, end, p);
    return C_OTHER_L3;
}

#include "tunnel.h"

/* The packet's flow: the outer one, or the inner one of a tunnel (tunnel.h). 0 and
 * *pp = the packet to account, or the counter of why there is none. */
static __always_inline int parse_packet(void *data, void *end, struct pkt_slot *s, struct pkt_info **pp)
{
    int rc = parse_at(data, end, 0, PARSE_ETH, &s->pk[0]);
    __u32 level = 0;
#if XDPML_TUNNELS
    if (rc == 0)
        level = tunnel_decap(data, end, s);
#endif
    *pp = pkt_level(s, level);
    return rc;
}

#endif /* XDPML_PARSE_H */
