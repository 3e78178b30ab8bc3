/* flow.h - the bidirectional flow table update shared by every hook.
 *
 * Algorithm, per packet (after parse_packet succeeded; a packet without a readable
 * L4 header arrives with ports 0 and the reason in p->l4_note, counted here):
 *  1. Normalise the 5-tuple (+VLAN, +ifindex, +VXLAN/Geneve VNI) so both directions map to one key:
 *     the (ip, port) endpoint that compares lower is "lo".
 *  2. One hash lookup; a miss inserts an all-zero value with BPF_NOEXIST (a race
 *     with another CPU just finds the entry) and looks up again. Insert failures
 *     are counted (table full vs other) and the packet still passes.
 *  3. Under the entry's spin lock (no helper calls inside): the first packet fixes
 *     the initiator; the packet's direction is initiator->responder when its
 *     orientation equals the initiator's. Per-direction counters, size and
 *     inter-arrival accumulators, TCP flag counts, bidirectional inter-arrival,
 *     the first N packets, and FIN/RST end flags are updated in place.
 *  One clock read per packet, taken before the lock. The lock (~56 ns on a 2-vCPU VM,
 *  a third of the program, docs/benchmarks.md) can be compiled out with
 *  -DXDPML_FLOW_LOCK=0: faster, but two CPUs updating one flow at the same instant
 *  (XDP ingress and TC egress of a busy flow) may then lose an update.
 *
 * GSO: TC hooks can see one super-packet standing for `segs` wire segments. It is
 * accounted as segs packets: segs-1 of `size` bytes and one of `last_size`, with
 * zero inter-arrival between them, ACK/URG/ECE/RST counted on every segment and
 * CWR (first), FIN and PSH (last) once, as the kernel's segmentation sets them. */
#ifndef XDPML_FLOW_H
#define XDPML_FLOW_H

#include "counters.h"
#include "parse.h"

#define TCP_FIN_ 0x01
#define TCP_SYN_ 0x02
#define TCP_RST_ 0x04
#define TCP_PSH_ 0x08

struct seg_info {
    __u32 size;      /* frame bytes of each segment but the last */
    __u32 last_size; /* frame bytes of the last segment */
    __u32 segs;      /* >= 1 */
};

static __always_inline int endpoint_lo_first(struct pkt_info *p)
{
    __u64 s0, s1, d0, d1;
    __builtin_memcpy(&s0, p->src_ip, 8);
    __builtin_memcpy(&s1, p->src_ip + 8, 8);
    __builtin_memcpy(&d0, p->dst_ip, 8);
    __builtin_memcpy(&d1, p->dst_ip + 8, 8);
    if (s0 != d0)
        return s0 < d0;
    if (s1 != d1)
        return s1 < d1;
    return p->src_port <= p->dst_port;
}

/* *lo, *hi += x * x as one 128-bit number. With x = a * 2^32 + b:
 * x^2 = a^2 * 2^64 + ab * 2^33 + b^2, and every product fits 64 bits. Gaps below
 * 4.3 s (a == 0) take the short way. */
static __always_inline void sq_add128(__u64 *lo, __u64 *hi, __u64 x)
{
    __u64 a = x >> 32;
    __u64 b = x & 0xffffffffULL;
    __u64 bb = b * b;
    __u64 l = *lo + bb;
    __u64 h = *hi + (l < bb);
    if (a) {
        __u64 ab = a * b;
        __u64 mid = ab << 33;
        l += mid;
        h += (l < mid) + (ab >> 31) + a * a;
    }
    *lo = l;
    *hi = h;
}

static __always_inline void iat_add(__u64 *sum, __u64 *sq_lo, __u64 *sq_hi, __u64 *mn, __u64 *mx,
                                    __u64 iat, int first)
{
    *sum += iat;
    sq_add128(sq_lo, sq_hi, iat);
    if (first || iat < *mn)
        *mn = iat;
    if (iat > *mx)
        *mx = iat;
}

static __always_inline void flags_add(struct dir_stats *s, __u8 f, __u32 segs)
{
    /* header bit order: FIN SYN RST PSH ACK URG ECE CWR */
    if (f & 0x01) s->flag_count[0] += 1;
    if (f & 0x02) s->flag_count[1] += 1;
    if (f & 0x04) s->flag_count[2] += segs;
    if (f & 0x08) s->flag_count[3] += 1;
    if (f & 0x10) s->flag_count[4] += segs;
    if (f & 0x20) s->flag_count[5] += segs;
    if (f & 0x40) s->flag_count[6] += segs;
    if (f & 0x80) s->flag_count[7] += 1;
}

static __always_inline void dir_add(struct dir_stats *s, struct pkt_info *p,
                                    struct seg_info *g, __u64 now, __u8 seen)
{
    __u32 extra = g->segs - 1;
    if (s->packets == 0) {
        s->first_ns = now;
        s->size_min = g->last_size;
        s->size_max = g->last_size;
        s->init_window = p->tcp_window;
        s->ttl = p->ttl;
        s->tos = p->tos;
    } else {
        /* the first inter-arrival time of this direction sets the minimum */
        iat_add(&s->iat_sum_ns, &s->iat_sumsq_lo, &s->iat_sumsq_hi, &s->iat_min_ns, &s->iat_max_ns,
                now - s->last_ns, s->packets == 1);
    }
    s->last_ns = now;
    s->packets += g->segs;
    s->bytes += g->last_size;
    s->size_sumsq += (__u64)g->last_size * g->last_size;
    if (g->last_size < s->size_min)
        s->size_min = g->last_size;
    if (g->last_size > s->size_max)
        s->size_max = g->last_size;
    if (extra) {
        s->bytes += (__u64)g->size * extra;
        s->size_sumsq += (__u64)g->size * g->size * extra;
        if (g->size < s->size_min)
            s->size_min = g->size;
        if (g->size > s->size_max)
            s->size_max = g->size;
        s->iat_min_ns = 0; /* segments of one super-packet left together */
    }
    if (p->proto == IPPROTO_TCP)
        flags_add(s, p->tcp_flags, g->segs);
    /* last: placed here, the verifier's count for the fully featured TC program fell
     * (833,796 vs 851,880 without seen_at); at the top of the function it rose to 873,758 */
    s->seen_at |= seen;
}

/* The packet's flow key (lower endpoint first); returns 1 when the packet goes lo -> hi. */
static __always_inline int flow_key_fill(struct flow_key *key, struct pkt_info *p, __u32 ifindex)
{
    int lo_to_hi = endpoint_lo_first(p);
    if (lo_to_hi) {
        __builtin_memcpy(key->lo_ip, p->src_ip, 16);
        __builtin_memcpy(key->hi_ip, p->dst_ip, 16);
        key->lo_port = p->src_port;
        key->hi_port = p->dst_port;
    } else {
        __builtin_memcpy(key->lo_ip, p->dst_ip, 16);
        __builtin_memcpy(key->hi_ip, p->src_ip, 16);
        key->lo_port = p->dst_port;
        key->hi_port = p->src_port;
    }
    key->proto = p->proto;
    key->ip_version = p->ip_version;
    key->vlan_id = p->vlan_id;
    key->ifindex = ifindex;
    key->vni = p->tunnel_vni;
    return lo_to_hi;
}

/* Returns the flow's entry (rules.h caches its decision there), NULL if none.
 * seen: XDPML_SEEN_INGRESS or XDPML_SEEN_EGRESS, which side of the interface the hook is on. */
static __always_inline struct flow_value *flow_account(struct pkt_info *p, __u32 ifindex, __u64 now,
                                         struct seg_info *g, __u8 seen)
{
    struct flow_key key;
    if (p->l4_note)
        count(p->l4_note); /* why this packet is in a port-less flow */
    int lo_to_hi = flow_key_fill(&key, p, ifindex);

    struct flow_value *v = flows.lookup(&key);
    if (!v) {
        __u32 z = 0;
        struct flow_value_bytes *zero = flow_zero.lookup(&z);
        if (!zero)
            return 0;
        int err = flows.insert(&key, (struct flow_value *)zero);
        if (err == 0)
            count(C_FLOW_NEW);
        else if (err != -EEXIST) {
            count(err == -E2BIG ? C_FLOW_FULL : C_FLOW_BUSY);
            return 0;
        }
        v = flows.lookup(&key);
        if (!v) {
            count(C_FLOW_BUSY);
            return 0;
        }
    }

#if XDPML_FLOW_LOCK
    bpf_spin_lock(&v->lock);
#endif
    __u64 prev = v->last_ns;
    int first = v->dir[0].packets == 0 && v->dir[1].packets == 0;
    if (first) {
        v->init_lo_to_hi = lo_to_hi;
        v->first_ns = now;
        v->tunnel_type = p->tunnel_type;
        v->tunnel_id = p->tunnel_id;
        __builtin_memcpy(v->outer_src_ip, p->outer_src_ip, 16);
        __builtin_memcpy(v->outer_dst_ip, p->outer_dst_ip, 16);
    } else {
        iat_add(&v->iat.sum_ns, &v->iat.sumsq_lo, &v->iat.sumsq_hi, &v->iat.min_ns, &v->iat.max_ns,
                now - prev, v->dir[0].packets + v->dir[1].packets == 1);
    }
    if (g->segs > 1)
        v->iat.min_ns = 0;
    v->last_ns = now;
    __u8 d = lo_to_hi == v->init_lo_to_hi ? 0 : 1;
    if (d == 0)
        dir_add(&v->dir[0], p, g, now, seen);
    else
        dir_add(&v->dir[1], p, g, now, seen);
    if (p->proto == IPPROTO_TCP) {
        v->tcp_flags_or |= p->tcp_flags;
        if (p->tcp_flags & TCP_FIN_)
            v->end_flags |= d == 0 ? XDPML_END_FIN_INIT : XDPML_END_FIN_RESP;
        if (p->tcp_flags & TCP_RST_)
            v->end_flags |= XDPML_END_RST;
    }
#if XDPML_FIRST_N > 0
    __u32 n = v->n_seq;
    if (n < XDPML_FIRST_N) {
        __u32 piat = first ? 0 : (__u32)((now - prev) / 1000);
        v->seq[n].piat_us = piat;
        v->seq[n].size = g->segs > 1 ? (g->size > 0xffff ? 0xffff : g->size)
                                     : (g->last_size > 0xffff ? 0xffff : g->last_size);
        v->seq[n].dir = d;
        v->seq[n].flags = p->tcp_flags;
        n++;
        if (g->segs > 1) {
            /* the rest of the super-packet's segments, as far as N allows; the
             * slot index is the loop variable so the verifier sees its bound */
            __u32 last = n + g->segs - 2; /* slot of the final segment */
#pragma unroll
            for (__u32 k = 1; k < XDPML_FIRST_N; k++) {
                if (k < n)
                    continue;
                if (k > last)
                    break;
                v->seq[k].piat_us = 0;
                v->seq[k].size = k == last ? (g->last_size > 0xffff ? 0xffff : g->last_size)
                                           : (g->size > 0xffff ? 0xffff : g->size);
                v->seq[k].dir = d;
                v->seq[k].flags = p->tcp_flags;
            }
            n = last + 1 < XDPML_FIRST_N ? last + 1 : XDPML_FIRST_N;
        }
        v->n_seq = n;
    }
#endif
#if XDPML_EARLY
    /* early export: one notice per entry, when it reaches K packets or gets a packet
     * T ms after its first; the bit is set under the lock, so only one CPU sends it */
    int early = 0;
    if (!(v->end_flags & XDPML_EARLY_SENT) &&
        ((XDPML_EARLY_PACKETS > 0 && v->dir[0].packets + v->dir[1].packets >= XDPML_EARLY_PACKETS) ||
         (XDPML_EARLY_MS > 0 && now - v->first_ns >= (__u64)XDPML_EARLY_MS * 1000000ULL))) {
        v->end_flags |= XDPML_EARLY_SENT;
        early = 1;
    }
#endif
#if XDPML_FLOW_LOCK
    bpf_spin_unlock(&v->lock);
#endif
#if XDPML_EARLY
    if (early) {
        struct early_event *e = early_events.ringbuf_reserve(sizeof(struct early_event));
        if (e) {
            __builtin_memcpy(&e->key, &key, sizeof(key));
            early_events.ringbuf_submit(e, 0);
            count(C_EARLY_SENT);
        } else {
            count(C_RB_EARLY_FULL);
        }
    }
#endif
    return v;
}

/* TC egress of a packet that came in on this same interface (a hairpin): its ingress hook
 * (TC ingress or XDP: every hook set with TC egress has one) already accounted it in this
 * interface's entry, so only the egress side is recorded in that direction's seen_at.
 * Returns 1 then; 0 when the entry's direction never saw an ingress packet (e.g. NAT on the
 * way changed the 5-tuple): the packet is accounted as any other. */
static __always_inline int flow_hairpin(struct pkt_info *p, __u32 ifindex)
{
    struct flow_key key;
    int lo_to_hi = flow_key_fill(&key, p, ifindex);
    struct flow_value *v = flows.lookup(&key);
    if (!v)
        return 0;
    int again = 0;
#if XDPML_FLOW_LOCK
    bpf_spin_lock(&v->lock);
#endif
    if (lo_to_hi == v->init_lo_to_hi) {
        again = v->dir[0].seen_at & XDPML_SEEN_INGRESS;
        if (again)
            v->dir[0].seen_at |= XDPML_SEEN_EGRESS;
    } else {
        again = v->dir[1].seen_at & XDPML_SEEN_INGRESS;
        if (again)
            v->dir[1].seen_at |= XDPML_SEEN_EGRESS;
    }
#if XDPML_FLOW_LOCK
    bpf_spin_unlock(&v->lock);
#endif
    if (again)
        count(C_HAIRPIN);
    return again != 0;
}

static __always_inline void emit_events(struct pkt_info *p, __u32 ifindex, __u64 now,
                                        struct seg_info *g, __u32 frame_len, __u8 hook)
{
    __u32 payload = p->payload;
#if XDPML_WINDOW
    struct win_event *w = win_events.ringbuf_reserve(sizeof(struct win_event));
    if (w) {
        w->ts_ns = now;
        __builtin_memcpy(w->src_ip, p->src_ip, 16);
        __builtin_memcpy(w->dst_ip, p->dst_ip, 16);
        w->src_port = p->src_port;
        w->dst_port = p->dst_port;
        w->size = g->size;
        w->last_size = g->last_size;
        w->segs = g->segs;
        w->payload = g->segs > 1 ? g->size - p->hdr_len : payload;
        w->proto = p->proto;
        w->ip_version = p->ip_version;
        w->ifindex = ifindex;
        w->tunnel_type = p->tunnel_type;
        w->_tpad[0] = 0;
        w->_tpad[1] = 0;
        w->_tpad[2] = 0;
        w->tunnel_id = p->tunnel_id;
        __builtin_memcpy(w->outer_src_ip, p->outer_src_ip, 16);
        __builtin_memcpy(w->outer_dst_ip, p->outer_dst_ip, 16);
        win_events.ringbuf_submit(w, 0);
    } else {
        count(C_RB_WIN_FULL);
    }
#endif
#if XDPML_SAMPLE_RATE > 0
    if (XDPML_SAMPLE_RATE == 1 || bpf_get_prandom_u32() % XDPML_SAMPLE_RATE == 0) {
        struct pkt_event *e = pkt_events.ringbuf_reserve(sizeof(struct pkt_event));
        if (e) {
            e->ts_ns = now;
            __builtin_memcpy(e->src_ip, p->src_ip, 16);
            __builtin_memcpy(e->dst_ip, p->dst_ip, 16);
            e->src_port = p->src_port;
            e->dst_port = p->dst_port;
            e->pkt_len = frame_len;
            e->ifindex = ifindex;
            e->ip_len = p->ip_len;
            e->payload_len = payload;
            e->frag_off = p->frag_off;
            e->ip_id = p->ip_id;
            e->tcp_seq = p->tcp_seq;
            e->tcp_ack = p->tcp_ack;
            e->tcp_window = p->tcp_window;
            e->tcp_urg_ptr = p->tcp_urg;
            e->vlan_id = p->vlan_id;
            e->segs = g->segs;
            e->proto = p->proto;
            e->ip_version = p->ip_version;
            e->ihl = p->ihl;
            e->ttl = p->ttl;
            e->tos = p->tos;
            e->tcp_flags = p->tcp_flags;
            e->hook = hook;
            e->tunnel_type = p->tunnel_type;
            e->tunnel_id = p->tunnel_id;
            __builtin_memcpy(e->outer_src_ip, p->outer_src_ip, 16);
            __builtin_memcpy(e->outer_dst_ip, p->outer_dst_ip, 16);
            pkt_events.ringbuf_submit(e, 0);
            count(C_PKT_SAMPLED);
        } else {
            count(C_RB_PKT_FULL);
        }
    }
#endif
}

#endif /* XDPML_FLOW_H */
