/* parse.h - bounds-checked parsers for Ethernet, 802.1Q/802.1ad, IPv4, IPv6
 * (bounded extension-header chain), TCP, UDP, ICMP and ICMPv6.
 *
 * parse_packet() returns 0 when the packet belongs to a flow, otherwise the
 * counter (enum xdpml_counter) that explains why not. Callers always pass the
 * packet on: parsing never decides a verdict (fail open). */
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
    __u8  proto;
    __u8  ip_version;
    __u8  ttl;
    __u8  tos;
    __u8  tcp_flags;
    __u8  ihl;
    __u8  has_vlan;
    __u8  _pad;
};

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

static __always_inline int parse_l4(void *l4, void *end, struct pkt_info *p)
{
    __u32 l4len;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > end)
            return C_ERR_TRUNC_L4;
        if (th->doff < 5)
            return C_ERR_TRUNC_L4;
        p->src_port = bpf_ntohs(th->source);
        p->dst_port = bpf_ntohs(th->dest);
        p->tcp_seq = bpf_ntohl(th->seq);
        p->tcp_ack = bpf_ntohl(th->ack_seq);
        p->tcp_window = bpf_ntohs(th->window);
        p->tcp_urg = bpf_ntohs(th->urg_ptr);
        p->tcp_flags = ((__u8 *)th)[13];
        l4len = th->doff * 4;
    } else if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > end)
            return C_ERR_TRUNC_L4;
        p->src_port = bpf_ntohs(uh->source);
        p->dst_port = bpf_ntohs(uh->dest);
        l4len = sizeof(*uh);
    } else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
        /* type, code, checksum and 4 bytes of rest-of-header; ports stay 0
         * (NFStream's convention) */
        if (l4 + 8 > end)
            return C_ERR_TRUNC_L4;
        l4len = 8;
    } else {
        l4len = 0; /* 'other' L4: a flow keyed by addresses and protocol */
    }
    p->hdr_len += l4len;
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
    p->hdr_len = (__u32)(l3 - data) + hlen;
    p->l3_end = (__u32)(l3 - data) + tot;
    if (p->frag_off & 0x1fff)
        return C_FRAG_NONFIRST;
    return parse_l4(l3 + hlen, end, p);
}

static __always_inline int parse_ipv6(void *l3, void *data, void *end, struct pkt_info *p)
{
    struct ipv6hdr *ip6 = l3;
    if ((void *)(ip6 + 1) > end)
        return C_ERR_TRUNC_IP;
    p->ip_version = 6;
    p->ttl = ip6->hop_limit;
    p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
    p->ip_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
    __builtin_memcpy(p->src_ip, &ip6->saddr, 16);
    __builtin_memcpy(p->dst_ip, &ip6->daddr, 16);
    p->l3_end = (__u32)(l3 - data) + p->ip_len;

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
                return C_FRAG_NONFIRST;
            }
            len = 8;
        } else {
            p->proto = nexthdr;
            p->hdr_len = (__u32)(cur - data);
            return parse_l4(cur, end, p);
        }
        cur += len;
    }
    return C_ERR_IPV6_EXT;
}

/* vlan_offloaded: the outer tag was already stripped into skb metadata (TC). */
static __always_inline int parse_packet(void *data, void *end, struct pkt_info *p)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return C_ERR_TRUNC_ETH;
    __u16 proto = bpf_ntohs(eth->h_proto);
    void *cur = data + ETH_HLEN_;
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
    if (proto == ETH_P_IP_)
        return parse_ipv4(cur, data, end, p);
    if (proto == ETH_P_IPV6_)
        return parse_ipv6(cur, data, end, p);
    return C_OTHER_L3;
}

#endif /* XDPML_PARSE_H */
