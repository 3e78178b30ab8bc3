/* tunnel.h - decapsulation: the flow of a tunnelled packet is its inner 5-tuple.
 *
 * After parse.h read the outer packet, tunnel_detect() looks at what it carries:
 *   UDP to a VXLAN port (4789, 8472)  8-byte header, I flag set, 24-bit VNI, Ethernet inside
 *   UDP to the Geneve port (6081)     version 0, options skipped by their length, VNI;
 *                                     Ethernet (0x6558), IPv4 or IPv6 inside
 *   UDP to the GTP-U port (2152)      version 1, PT 1, G-PDU (type 255) only; optional
 *                                     sequence / N-PDU / extension headers skipped; TEID;
 *                                     IPv4 or IPv6 inside (first nibble)
 *   IP protocol 4 / 41                IPv4 / IPv6 inside IPv4 or IPv6 (ipip, sit, ip6tnl)
 *   IP protocol 47 (GRE, RFC 2784/2890) version 0, C/K/S fields skipped (K: the key);
 *                                     0x0800, 0x86DD inside (gre) or 0x6558 Ethernet (gretap)
 * and the inner packet is parsed by parse.h's parse_at(), the same code path as the outer
 * one, up to XDPML_TUNNEL_MAX_DEPTH tunnels deep. The flow key is the inner 5-tuple plus
 * the VXLAN/Geneve VNI (overlapping tenant address spaces stay apart); the outermost
 * tunnel's type, id and outer addresses go to the flow entry. Frame sizes stay the bytes
 * on the wire (outer frame): abi.h.
 *
 * Encrypted tunnels are not opened: WireGuard (UDP port 51820, either side), ESP (IP
 * protocol 50) and ESP in UDP (NAT-T, port 4500, a non-zero first word) stay outer flows
 * labelled wireguard / esp (ESP: tunnel_id = SPI).
 *
 * Anything malformed (cut short by the frame or by the outer IP length, a VXLAN
 * header without the I flag, a Geneve version or option length that does not fit, GRE
 * with flags or a version we do not know, a payload type not decoded, an inner packet
 * that does not parse, nesting deeper than the limit, a fragmented outer packet) leaves
 * the packet in its OUTER flow and counts the reason (C_TUN_*). Nothing is dropped.
 *
 * Tunables (-D, set by the loader from TunnelSettings): XDPML_DECAP_{VXLAN,GENEVE,IPIP,
 * GRE,GTPU} and XDPML_LABEL_{WIREGUARD,ESP} (1 on, 0 compiled out), XDPML_TUNNEL_MAX_DEPTH,
 * XDPML_VXLAN_PORT1..4 (0 unused), XDPML_GENEVE_PORT, XDPML_GTPU_PORT,
 * XDPML_WIREGUARD_PORT, XDPML_ESP_NATT_PORT (0: no NAT-T label). */
#ifndef XDPML_TUNNEL_H
#define XDPML_TUNNEL_H

#include "counters.h"

#ifndef XDPML_DECAP_VXLAN
#define XDPML_DECAP_VXLAN 1
#endif
#ifndef XDPML_DECAP_GENEVE
#define XDPML_DECAP_GENEVE 1
#endif
#ifndef XDPML_DECAP_IPIP
#define XDPML_DECAP_IPIP 1 /* protocols 4 and 41: 4in4, 6in4, 4in6, 6in6 */
#endif
#ifndef XDPML_DECAP_GRE
#define XDPML_DECAP_GRE 1 /* gre and gretap */
#endif
#ifndef XDPML_DECAP_GTPU
#define XDPML_DECAP_GTPU 1
#endif
#ifndef XDPML_LABEL_WIREGUARD
#define XDPML_LABEL_WIREGUARD 1
#endif
#ifndef XDPML_LABEL_ESP
#define XDPML_LABEL_ESP 1
#endif
#ifndef XDPML_TUNNELS
#define XDPML_TUNNELS (XDPML_DECAP_VXLAN || XDPML_DECAP_GENEVE || XDPML_DECAP_IPIP || \
                       XDPML_DECAP_GRE || XDPML_DECAP_GTPU || XDPML_LABEL_WIREGUARD || XDPML_LABEL_ESP)
#endif
#ifndef XDPML_VXLAN_PORT1
#define XDPML_VXLAN_PORT1 4789 /* IANA */
#endif
#ifndef XDPML_VXLAN_PORT2
#define XDPML_VXLAN_PORT2 8472 /* Linux / Flannel / Cilium default */
#endif
#ifndef XDPML_VXLAN_PORT3
#define XDPML_VXLAN_PORT3 0
#endif
#ifndef XDPML_VXLAN_PORT4
#define XDPML_VXLAN_PORT4 0
#endif
#ifndef XDPML_GENEVE_PORT
#define XDPML_GENEVE_PORT 6081
#endif
#ifndef XDPML_GTPU_PORT
#define XDPML_GTPU_PORT 2152
#endif
#ifndef XDPML_WIREGUARD_PORT
#define XDPML_WIREGUARD_PORT 51820
#endif
#ifndef XDPML_ESP_NATT_PORT
#define XDPML_ESP_NATT_PORT 4500
#endif
#define GTPU_MAX_EXT 4      /* GTP-U extension headers followed */
#define GTPU_MAX_HLEN 64    /* GTP-U header with its extensions, bytes, at most */

#define TUN_GO 1 /* tunnel_detect(): decapsulate */

struct tun_next {
    __u32 off;   /* frame offset of the inner packet */
    __u32 id;    /* VNI, GRE key, TEID */
    __u32 vni;   /* VXLAN/Geneve: the VNI again (flow key), else 0 */
    __u8  type;  /* enum xdpml_tunnel */
    __u8  kind;  /* what starts at off: PARSE_ETH / PARSE_IP / PARSE_IPV4 / PARSE_IPV6 */
};

static __always_inline __u32 be24(__u8 *b)
{
    return ((__u32)b[0] << 16) | ((__u32)b[1] << 8) | b[2];
}

static __always_inline __u32 be32(__u8 *b)
{
    return ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
}

static __always_inline int vxlan_port(__u16 port)
{
    return (XDPML_VXLAN_PORT1 && port == XDPML_VXLAN_PORT1) || (XDPML_VXLAN_PORT2 && port == XDPML_VXLAN_PORT2) ||
           (XDPML_VXLAN_PORT3 && port == XDPML_VXLAN_PORT3) || (XDPML_VXLAN_PORT4 && port == XDPML_VXLAN_PORT4);
}

/* v & 0x7ff, the mask kept even where the compiler can prove it useless: the
 * verifier, which sees a copy of the bounded value, cannot (offsets are < 2048 here). */
static __always_inline __u32 off_bound(__u32 v)
{
    asm volatile("" : "+r"(v));
    return v & 0x7ff;
}

/* An inner packet's offset (< 2048: the outer headers end by XDPML_PARSE_MAX_OFF, a
 * tunnel header adds at most 260 bytes, an inner Ethernet header 22), made opaque to
 * the verifier: every path into the inner parser then arrives with one offset range
 * [0, 2047] instead of the exact range of its outer path, so the parser's states
 * merge instead of multiplying (outer paths x inner paths). Bytes read back from a
 * 32-bit spill are unknown to the verifier; volatile keeps the compiler in memory. The
 * mask bounds the value in whichever register the compiler uses. */
static __always_inline __u32 verifier_opaque_off(__u32 v)
{
    volatile __u32 box = v;
    volatile __u8 *q = (volatile __u8 *)&box;
    return ((__u32)q[0] | ((__u32)q[1] << 8)) & 0x7ff;
}

/* Label an encrypted tunnel's flow, unless a decapsulated tunnel already names it
 * (inner: a compile-time constant, so the verifier never branches on tunnel_type). */
static __always_inline int tun_label(struct pkt_info *p, int inner, __u8 type, __u32 id)
{
    if (!inner) {
        p->tunnel_type = type;
        p->tunnel_id = id;
    }
    return 0;
}

/* The inner packet's L2 (Ethernet and up to two VLAN tags, skipped: the flow keeps
 * the outer VLAN) and IP version, so the inner parser is always entered at an IP
 * header: one verifier state there, whatever the tunnel kind. A non-IP inner frame
 * (ARP in VXLAN...) stays in the outer flow. */
static __always_inline int tun_inner(void *data, void *end, struct tun_next *t)
{
    __u8 *b = data + off_bound(t->off);
    __u8 want = t->kind;
    if (want == PARSE_ETH) {
        if ((void *)(b + ETH_HLEN_) > end)
            return C_TUN_BAD_INNER;
        __u16 proto = ((__u16)b[12] << 8) | b[13];
        b += ETH_HLEN_;
#pragma unroll
        for (int i = 0; i < MAX_VLAN_TAGS; i++) {
            if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
                break;
            if ((void *)(b + 4) > end)
                return C_TUN_BAD_INNER;
            proto = ((__u16)b[2] << 8) | b[3];
            b += 4;
        }
        if (proto == ETH_P_IP_)
            want = PARSE_IPV4;
        else if (proto == ETH_P_IPV6_)
            want = PARSE_IPV6;
        else
            return C_TUN_UNKNOWN_PROTO;
    }
    if ((void *)(b + 1) > end)
        return C_TUN_BAD_INNER;
    __u8 v = b[0] >> 4;
    if (want == PARSE_IP ? v != 4 && v != 6 : v != want)
        return C_TUN_BAD_INNER;
    t->off = (__u32)((void *)b - data);
    return TUN_GO;
}

/* What the packet just parsed carries: 0 nothing to decapsulate (maybe labelled),
 * TUN_GO with *t filled, or the C_TUN_* counter of why it cannot be decapsulated. */
static __always_inline int tunnel_detect(void *data, void *end, struct pkt_info *p, struct tun_next *t, int inner)
{
    if (p->l4_note)
        return 0; /* no readable L4 header: nothing to look into */
    /* first byte after the UDP header / the IP header chain, and the bytes from there
     * to the IP datagram's end */
    __u32 off = p->hdr_len;
    __u32 room = p->payload;
    __u32 frame = (__u32)(end - data);
    __u32 hlen;
    __u8 *b;
    int udp = p->proto == IPPROTO_UDP;

    t->type = XDPML_TUNNEL_NONE;
    if (udp) {
        /* the UDP length bounds the tunnel header too (RFC 768: header included; shorter
         * than the IP payload, the rest is not the datagram's). 0 in an IPv6 jumbogram
         * (payload length 0, RFC 2675): the IP payload bounds it then. */
        __u32 ulen = p->udp_len;
        if (ulen || p->ip_version != 6 || p->ip_len != 40) {
            __u32 uroom = ulen > 8 ? ulen - 8 : 0;
            if (uroom < room)
                room = uroom;
        }
        __u16 dport = p->dst_port;
#if XDPML_DECAP_VXLAN
        if (vxlan_port(dport))
            t->type = XDPML_TUNNEL_VXLAN;
#endif
#if XDPML_DECAP_GENEVE
        if (dport == XDPML_GENEVE_PORT)
            t->type = XDPML_TUNNEL_GENEVE;
#endif
#if XDPML_DECAP_GTPU
        if (dport == XDPML_GTPU_PORT)
            t->type = XDPML_TUNNEL_GTPU;
#endif
        if (t->type == XDPML_TUNNEL_NONE) {
#if XDPML_LABEL_WIREGUARD
            if (dport == XDPML_WIREGUARD_PORT || p->src_port == XDPML_WIREGUARD_PORT)
                return tun_label(p, inner, XDPML_TUNNEL_WIREGUARD, 0);
#endif
#if XDPML_LABEL_ESP && XDPML_ESP_NATT_PORT
            if (dport == XDPML_ESP_NATT_PORT || p->src_port == XDPML_ESP_NATT_PORT) {
                /* RFC 3948: a zero first word is IKE (non-ESP marker), 0xff a keepalive */
                b = data + off_bound(off);
                if (room >= 8 && (void *)(b + 8) <= end && be32(b))
                    return tun_label(p, inner, XDPML_TUNNEL_ESP, be32(b));
            }
#endif
            return 0;
        }
    } else {
#if XDPML_DECAP_IPIP
        if (p->proto == 4 || p->proto == 41) {
            int in6 = p->proto == 41;
            if (p->ip_version == 4)
                t->type = in6 ? XDPML_TUNNEL_6IN4 : XDPML_TUNNEL_IPIP;
            else
                t->type = in6 ? XDPML_TUNNEL_6IN6 : XDPML_TUNNEL_4IN6;
        }
#endif
#if XDPML_DECAP_GRE
        if (p->proto == 47)
            t->type = XDPML_TUNNEL_GRE;
#endif
        if (t->type == XDPML_TUNNEL_NONE) {
#if XDPML_LABEL_ESP
            if (p->proto == 50) {
                b = data + off_bound(off);
                __u32 spi = room >= 4 && (void *)(b + 4) <= end ? be32(b) : 0;
                return tun_label(p, inner, XDPML_TUNNEL_ESP, spi);
            }
#endif
            return 0;
        }
    }

    /* a fragment's inner packet is incomplete: the whole datagram stays outer */
    if (p->ip_version == 4 ? (p->frag_off & 0x2000) : (p->frag_off & 1))
        return C_TUN_FRAGMENT;
    if (off > XDPML_PARSE_MAX_OFF)
        return C_TUN_TRUNC;
    off = off_bound(off);
    b = data + off;
    t->off = off;
    t->id = 0;
    t->vni = 0;

    if (!udp) {
#if XDPML_DECAP_IPIP
        if (p->proto == 4 || p->proto == 41) {
            t->kind = p->proto == 4 ? PARSE_IPV4 : PARSE_IPV6;
            return tun_inner(data, end, t);
        }
#endif
#if XDPML_DECAP_GRE
        /* RFC 2784 / 2890: C (checksum + reserved1), K (key), S (sequence), version 0 */
        if ((void *)(b + 4) > end || room < 4)
            return C_TUN_TRUNC;
        __u16 flags = ((__u16)b[0] << 8) | b[1];
        __u16 proto = ((__u16)b[2] << 8) | b[3];
        if (flags & ~0xB000)
            return C_TUN_BAD_GRE; /* routing, strict source route, recursion, version != 0 */
        __u32 koff = flags & 0x8000 ? 8 : 4;
        hlen = koff + (flags & 0x2000 ? 4 : 0) + (flags & 0x1000 ? 4 : 0);
        if (room < hlen || off + hlen > frame)
            return C_TUN_TRUNC;
        if (flags & 0x2000) {
            __u8 *k = b + koff;
            if ((void *)(k + 4) > end)
                return C_TUN_TRUNC;
            t->id = be32(k);
        }
        if (proto == ETH_P_IP_)
            t->kind = PARSE_IPV4;
        else if (proto == ETH_P_IPV6_)
            t->kind = PARSE_IPV6;
        else if (proto == 0x6558) {
            t->kind = PARSE_ETH;
            t->type = XDPML_TUNNEL_GRETAP;
        } else
            return C_TUN_UNKNOWN_PROTO;
        t->off = off + hlen;
        return tun_inner(data, end, t);
#endif
        return 0;
    }

    if ((void *)(b + 8) > end || room < 8)
        return C_TUN_TRUNC;
#if XDPML_DECAP_VXLAN
    if (t->type == XDPML_TUNNEL_VXLAN) {
        if (!(b[0] & 0x08))
            return C_TUN_BAD_VXLAN; /* RFC 7348: the I flag says the VNI is valid */
        t->id = be24(b + 4);
        t->vni = t->id;
        t->kind = PARSE_ETH;
        t->off = off + 8;
        return tun_inner(data, end, t);
    }
#endif
#if XDPML_DECAP_GENEVE
    if (t->type == XDPML_TUNNEL_GENEVE) {
        if (b[0] >> 6)
            return C_TUN_BAD_GENEVE; /* version 0 only */
        hlen = 8 + (__u32)(b[0] & 0x3f) * 4;
        if (room < hlen || off + hlen > frame)
            return C_TUN_BAD_GENEVE; /* options past the packet */
        __u16 proto = ((__u16)b[2] << 8) | b[3];
        if (proto == 0x6558)
            t->kind = PARSE_ETH;
        else if (proto == ETH_P_IP_)
            t->kind = PARSE_IPV4;
        else if (proto == ETH_P_IPV6_)
            t->kind = PARSE_IPV6;
        else
            return C_TUN_UNKNOWN_PROTO;
        t->id = be24(b + 4);
        t->vni = t->id;
        t->off = off + hlen;
        return tun_inner(data, end, t);
    }
#endif
#if XDPML_DECAP_GTPU
    if (t->type == XDPML_TUNNEL_GTPU) {
        /* TS 29.281: version 1, PT 1; E, S, PN add 4 bytes (sequence, N-PDU, next type) */
        if ((b[0] & 0xf0) != 0x30)
            return C_TUN_BAD_GTPU;
        if (b[1] != 255)
            return 0; /* echo, error indication...: signalling, an ordinary UDP flow */
        t->id = be32(b + 4);
        hlen = 8;
        if (b[0] & 0x07) {
            if ((void *)(b + 12) > end)
                return C_TUN_TRUNC;
            hlen = 12;
            __u8 next = b[0] & 0x04 ? b[11] : 0;
#pragma unroll
            for (int i = 0; i < GTPU_MAX_EXT; i++) {
                if (!next)
                    break;
                __u8 *e = b + hlen; /* hlen <= GTPU_MAX_HLEN: a bounded offset */
                if ((void *)(e + 1) > end)
                    return C_TUN_TRUNC;
                __u32 elen = (__u32)e[0] * 4; /* in 4-byte units, the next type last */
                if (!elen)
                    return C_TUN_BAD_GTPU;
                hlen += elen;
                if (hlen > GTPU_MAX_HLEN)
                    return C_TUN_BAD_GTPU;
                __u32 last = hlen - 1;
                /* keep clang from folding the -1 into the load: the verifier
                 * refuses a read at a negative offset from a checked pointer */
                asm volatile("" : "+r"(last));
                __u8 *nx = b + last;
                if ((void *)(nx + 1) > end)
                    return C_TUN_TRUNC;
                next = nx[0];
            }
            if (next)
                return C_TUN_BAD_GTPU; /* more extension headers than we follow */
        }
        if (room < hlen || off + hlen > frame)
            return C_TUN_TRUNC;
        t->kind = PARSE_IP;
        t->off = off + hlen;
        return tun_inner(data, end, t);
    }
#endif
    return 0;
}

/* Parse the inner packet(s) of s->pk[0] into s->pk[1..]: returns the level of the
 * packet to account (0: the outer one, on any failure). */
static __always_inline __u32 tunnel_decap(void *data, void *end, struct pkt_slot *s)
{
    struct pkt_info *p = &s->pk[0];
    struct tun_next t = {};
    int k = tunnel_detect(data, end, p, &t, 0);
    if (k != TUN_GO) {
        if (k)
            count(k);
        return 0;
    }
    k = C_TUN_TOO_DEEP;
#pragma unroll
    for (int depth = 1; depth <= XDPML_TUNNEL_MAX_DEPTH; depth++) {
        struct pkt_info *q = &s->pk[depth];
        /* a stale packet of an earlier run: every field the parser may leave alone */
        q->src_port = 0;
        q->dst_port = 0;
        q->frag_off = 0;
        q->ip_id = 0;
        q->ihl = 0;
        q->tcp_flags = 0;
        q->tcp_window = 0;
        q->tcp_urg = 0;
        q->tcp_seq = 0;
        q->tcp_ack = 0;
        q->l4_note = 0;
        q->vlan_id = p->vlan_id; /* the flow's VLAN is the outer frame's */
        q->has_vlan = 1;         /* so an inner VLAN tag is skipped, not recorded */
        if (depth == 1) {
            q->tunnel_type = t.type;
            q->tunnel_id = t.id;
            q->tunnel_vni = t.vni;
            __builtin_memcpy(q->outer_src_ip, p->src_ip, 16);
            __builtin_memcpy(q->outer_dst_ip, p->dst_ip, 16);
        } else {
            struct pkt_info *first = &s->pk[1]; /* the outermost tunnel names the flow */
            q->tunnel_type = first->tunnel_type;
            q->tunnel_id = first->tunnel_id;
            q->tunnel_vni = first->tunnel_vni;
            __builtin_memcpy(q->outer_src_ip, first->outer_src_ip, 16);
            __builtin_memcpy(q->outer_dst_ip, first->outer_dst_ip, 16);
        }
        if (parse_at(data, end, verifier_opaque_off(t.off), PARSE_IP, q)) {
            k = C_TUN_BAD_INNER;
            break;
        }
        int n = tunnel_detect(data, end, q, &t, 1);
        if (n == 0) {
            count(C_TUN_DECAP);
            return depth;
        }
        if (n != TUN_GO) {
            k = n;
            break;
        }
    }
    count(k);
    return 0;
}

#endif /* XDPML_TUNNEL_H */
