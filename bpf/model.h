/* model.h - a scikit-learn model as data: one table walk per packet.
 *
 * Compiled in only with -DXDPML_MODEL=1 (the default datapath and its cost are
 * unchanged). The compiler (xdpml/models/compiler.py) turns a fitted estimator into
 * one struct model_slot; user space writes it to the idle one of two slots and then
 * flips model_ctl.active, so a model is swapped live without recompiling or
 * re-attaching. A packet reads the active index once and finishes on that slot.
 *
 * Per packet: the model's inputs (feature ids, MF_* below, the names of the
 * exported packet columns; xdpml/models/features.py is the same table) are computed
 * from the parsed headers, then
 *   trees   bounded walk of each tree (pf[feat] <= thr ? left : right) to a leaf;
 *           the leaf's class (one tree), or its fixed-point values summed into acc[]
 *   linear  acc[o] = bias[o] + sum_i w[o][i] * x[i]           (fixed point, 64-bit)
 *   mlp     int8 weights, int16 activations, 64-bit accumulators, ReLU
 * and the class is argmax(acc) (first on ties) or, binary, acc[0] >= 0.
 * A walk that reaches no leaf, or an index out of range, is counted (C_MODEL_ERR)
 * and the packet is not classified; the packet always passes either way.
 * Limits are -D flags (xdpml/models/layout.py Limits builds them); nodes, leaf
 * values and features are powers of two (indices are masked, not branched on). */
#ifndef XDPML_MODEL_H
#define XDPML_MODEL_H

#include "abi.h"
#include "counters.h"
#include "parse.h"

#ifndef XDPML_MODEL_MAX_FEATURES
#define XDPML_MODEL_MAX_FEATURES 16
#endif
#ifndef XDPML_MODEL_MAX_DEPTH
#define XDPML_MODEL_MAX_DEPTH 16 /* a multiple of 4 */
#endif
#ifndef XDPML_MODEL_MAX_TREES
#define XDPML_MODEL_MAX_TREES 128
#endif
#ifndef XDPML_MODEL_MAX_NODES
#define XDPML_MODEL_MAX_NODES 8192
#endif
#ifndef XDPML_MODEL_MAX_LEAF_VALUES
#define XDPML_MODEL_MAX_LEAF_VALUES 8192
#endif
#ifndef XDPML_MODEL_MAX_OUTPUTS
#define XDPML_MODEL_MAX_OUTPUTS 8
#endif
#ifndef XDPML_MODEL_MAX_LAYERS
#define XDPML_MODEL_MAX_LAYERS 3
#endif
#ifndef XDPML_MODEL_MAX_WIDTH
#define XDPML_MODEL_MAX_WIDTH 16
#endif

#define MODEL_KIND_TREES 1
#define MODEL_KIND_LINEAR 2
#define MODEL_KIND_MLP 3
#define MODEL_DEC_LEAF 0
#define MODEL_DEC_ARGMAX 1
#define MODEL_DEC_BINARY 2
#define MODEL_DEC_ARGMAX_LAST0 3 /* argmax over acc[] and a last class n_outputs whose score is 0 */
#define MODEL_REQ_SHIFT 24
/* clang's unrolling and vectorising turn these bounded loops into shapes the verifier
 * cannot bound (and multiply its work): each loop stays one simple loop */
#define MODEL_LOOP _Pragma("clang loop unroll(disable) vectorize(disable)")
/* loop bounds are re-read from the slot at each test: a bound kept in a register would
 * carry what each exit taught the verifier about it, and no two exits would prune */
#define MODEL_RD(x) (*(volatile __typeof__(x) *)&(x))
#define MODEL_ACT_MAX 32767

/* feature ids: the order of xdpml/models/features.py */
#define MF_IP_VERSION 0
#define MF_IP_IHL 1
#define MF_TOS 2
#define MF_IP_DSCP 3
#define MF_IP_ECN 4
#define MF_IP_TOTAL_LENGTH 5
#define MF_IP_FRAG_OFFSET 6
#define MF_IP_FLAGS 7
#define MF_IP_ID 8
#define MF_IP_TTL 9
#define MF_PROTOCOL 10
#define MF_SRC_PORT 11
#define MF_DST_PORT 12
#define MF_TCP_SEQUENCE_NUM 13
#define MF_TCP_ACK_NUM 14
#define MF_TCP_WINDOW_SIZE 15
#define MF_TCP_URGENT_POINTER 16
#define MF_TCP_FIN 17
#define MF_TCP_SYN 18
#define MF_TCP_RST 19
#define MF_TCP_PSH 20
#define MF_TCP_ACK 21
#define MF_TCP_URG 22
#define MF_TCP_ECE 23
#define MF_TCP_CWR 24
#define MF_PKT_LEN 25
#define MF_PAYLOAD_LEN 26
#define MF_VLAN_ID 27
#define MF_PR_TCP 28
#define MF_PR_UDP 29
#define MF_PR_ICMP 30
#define MF_PR_OTHER 31
#define MF_SRC_PORT_LOW 32
#define MF_SRC_PORT_MID 33
#define MF_SRC_PORT_HIGH 34
#define MF_DST_PORT_LOW 35
#define MF_DST_PORT_MID 36
#define MF_DST_PORT_HIGH 37
/* flow features: the flow table's statistics at the k-th packet (features.py FLOW_TABLE) */
#define MF_SRC2DST_PACKETS 38
#define MF_DST2SRC_PACKETS 39
#define MF_BIDIRECTIONAL_PACKETS 40
#define MF_SRC2DST_BYTES 41
#define MF_DST2SRC_BYTES 42
#define MF_BIDIRECTIONAL_BYTES 43
#define MF_SRC2DST_MIN_PS 44
#define MF_SRC2DST_MAX_PS 45
#define MF_DST2SRC_MIN_PS 46
#define MF_DST2SRC_MAX_PS 47
#define MF_SRC2DST_MEAN_PS 48
#define MF_DST2SRC_MEAN_PS 49
#define MF_BIDIRECTIONAL_MEAN_PS 50
#define MF_BIDIRECTIONAL_DURATION_MS 51
#define MF_BIDIRECTIONAL_MEAN_PIAT_MS 52
#define MF_BIDIRECTIONAL_MIN_PIAT_MS 53
#define MF_BIDIRECTIONAL_MAX_PIAT_MS 54
/* flag counts, [direction][FIN..CWR]: read by index in model_flow_feature() */
#define MF_SRC2DST_FIN_PACKETS 55
#define MF_SRC2DST_SYN_PACKETS 56
#define MF_SRC2DST_RST_PACKETS 57
#define MF_SRC2DST_PSH_PACKETS 58
#define MF_SRC2DST_ACK_PACKETS 59
#define MF_SRC2DST_URG_PACKETS 60
#define MF_SRC2DST_ECE_PACKETS 61
#define MF_SRC2DST_CWR_PACKETS 62
#define MF_DST2SRC_FIN_PACKETS 63
#define MF_DST2SRC_SYN_PACKETS 64
#define MF_DST2SRC_RST_PACKETS 65
#define MF_DST2SRC_PSH_PACKETS 66
#define MF_DST2SRC_ACK_PACKETS 67
#define MF_DST2SRC_URG_PACKETS 68
#define MF_DST2SRC_ECE_PACKETS 69
#define MF_DST2SRC_CWR_PACKETS 70

#ifndef XDPML_MODEL_FLOW_PTR
#define XDPML_MODEL_FLOW_PTR 0 /* 1: model_run() stores the class through the caller's flow pointer */
#endif
#ifndef XDPML_MODEL_FLOW_K
#define XDPML_MODEL_FLOW_K 4 /* flow-feature models classify a flow once, at its k-th packet */
#endif

/* Offsets are stored in bytes, premultiplied: a step of the walk then adds and masks,
 * with no shift (the walk's cost is its instruction count, docs/benchmarks.md). */
struct model_node {
    __s64 thr;      /* go left when pf[feat] <= thr (integer threshold, see compiler.py) */
    __u32 left_off; /* 16 x the index of the left child (over all trees); right is the next
                     * node; a leaf: 16 x its own index */
    __u16 feat_off; /* 8 x the feature's MF_* id: its byte offset in pf[] (0 at a leaf) */
    __u16 leaf;     /* leaf: the class (one tree) or the offset of its n_outputs values */
};

struct model_trees {
    __u16 root[XDPML_MODEL_MAX_TREES];
    struct model_node node[XDPML_MODEL_MAX_NODES];
    /* the leaves' values; MAX_OUTPUTS more, never written: a leaf's values are read at its
     * masked offset plus o < MAX_OUTPUTS, with no mask per value */
    __s64 leaf[XDPML_MODEL_MAX_LEAF_VALUES + XDPML_MODEL_MAX_OUTPUTS];
};

struct model_linear {
    __s64 w[XDPML_MODEL_MAX_OUTPUTS][XDPML_MODEL_MAX_FEATURES];
};

struct model_mlp {
    __s64 in_mul[XDPML_MODEL_MAX_FEATURES]; /* input j: (x * in_mul + in_add) >> in_shift */
    __s64 in_add[XDPML_MODEL_MAX_FEATURES];
    __s64 in_shift[XDPML_MODEL_MAX_FEATURES];
    __s64 mult[XDPML_MODEL_MAX_LAYERS];     /* requantisation: (relu(acc) * mult + 2^23) >> 24 */
    __s64 bias[XDPML_MODEL_MAX_LAYERS][XDPML_MODEL_MAX_WIDTH];
    __u32 width[XDPML_MODEL_MAX_LAYERS];    /* outputs of each layer */
    __s8  w[XDPML_MODEL_MAX_LAYERS][XDPML_MODEL_MAX_WIDTH][XDPML_MODEL_MAX_WIDTH]; /* [layer][in][out] */
};

struct model_slot {
    __u32 kind;       /* 0: empty (no model; packets are not classified) */
    __u32 decision;   /* MODEL_DEC_* */
    __u32 n_features;
    __u32 n_outputs;
    __u32 n_trees;
    __u32 n_layers;
    __u32 model_id;   /* set by user space, for `xdpml model show` */
    __u32 depth;      /* trees: levels walked (the deepest leaf) */
    __u32 flow;       /* 1: reads flow features (classified once per flow, at packet k) */
    __u32 fskip;      /* MODEL_FG_* groups of packet features the model does not read */
    __u32 heap;       /* 1: one tree, in heap order (node h's children at 2h+1, 2h+2) */
    __u8  action[XDPML_MODEL_MAX_OUTPUTS]; /* per class: MODEL_ACT_* */
    __u16 feat_id[XDPML_MODEL_MAX_FEATURES]; /* model input i -> MF_* */
    __s64 bias[XDPML_MODEL_MAX_OUTPUTS];
    /* rate-limit classes: ns per packet (1e9 / packets per second) and the burst as
     * time (burst packets x ns per packet); the bucket state is in model_rl */
    __u64 rl_ns[XDPML_MODEL_MAX_OUTPUTS];
    __u64 rl_burst_ns[XDPML_MODEL_MAX_OUTPUTS];
    struct model_trees trees;
    struct model_linear lin;
    struct model_mlp mlp;
};

/* The kernel reads only `active`; the rest is user space's (xdpml/models/kernel.py):
 * how many models were loaded, when the index last flipped (a slot is rewritten only
 * GRACE after it stopped being active, whichever process flipped it), and the limits
 * this program was compiled with, so `xdpml model` checks a model against them. */
struct model_ctl {
    __u32 active;     /* slot the next packet uses: 0 or 1 */
    __u32 seq;        /* models loaded so far (model_id of the last one) */
    __u64 flipped_ns; /* CLOCK_MONOTONIC of the last flip */
    __u32 limits[8];  /* XDPML_MODEL_MAX_* in the order of layout.Limits */
    __u32 sample_every; /* 1 in N classified packets to model_events (0: off) */
    __u32 _pad2;
};

/* model_events: sampled decisions with the model's inputs, for auditing and retraining
 * (the agent's --model-decisions FILE). */
struct model_event {
    __u64 ts_ns;
    struct flow_key key;
    __u32 model_id;
    __s32 cls;
    __u8  action;   /* MODEL_ACT_* of the class */
    __u8  dropped;  /* 1: the packet was dropped */
    __u8  slot;
    __u8  n_features;
    __s64 x[XDPML_MODEL_MAX_FEATURES];
};
BPF_RINGBUF_OUTPUT(model_events, 64);

struct model_scratch {
    struct flow_key key; /* model_run(): the packet's flow (looked up again, or for model_after()) */
    __u32 model_id;      /* model_id of the slot the packet was classified on */
    __s32 cls;           /* its class, -1 none */
    __u32 act_slot;      /* the slot, for model_after() */
    __u8  drop_class;    /* this packet's class says drop */
    __u8  sampled;       /* this packet's decision goes to model_events */
    __u8  cls_action;    /* its class's action */
    __u8  n_feat;
    __u32 frame_len;
    __u64 rl_ns;         /* rate-limit class: its ns per packet and burst (model_slot) */
    __u64 rl_burst_ns;
    __u32 rl_key;        /* ... and its bucket in model_rl */
    __u32 _rl_pad;
    struct pkt_info pkt; /* the parsed packet, copied (but its outer_* addresses): see model_run() */
    struct dir_stats fdir[2]; /* flow models: the flow entry's statistics at packet k */
    struct iat_stats fiat;
    __u64 ffirst_ns, flast_ns;
    __s64 x[XDPML_MODEL_MAX_FEATURES];
    __s64 pf[128];       /* the features by MF_* id (MODEL_PF_N; a model's skipped groups stale) */
    __s64 acc[XDPML_MODEL_MAX_OUTPUTS];
    __s64 act[2][XDPML_MODEL_MAX_WIDTH];
};

#define MODEL_STATS_PER_SLOT (XDPML_MODEL_MAX_OUTPUTS + 1)

/* What a class does (model_slot.action), through the enforcement rules' mode, allowlist
 * and kill switch (rules.h): pass; alert (counted); drop (only in enforce mode, never an
 * allowlisted address, never with the kill switch on; in dry-run counted as would-drop);
 * rate-limit (the same controls, then a per-slot, per-class GCRA bucket: packets within
 * the rate and burst pass, the others are dropped as a drop class's are). */
#define MODEL_ACT_PASS 0
#define MODEL_ACT_ALERT 1
#define MODEL_ACT_DROP 2
#define MODEL_ACT_RATE_LIMIT 3
/* model_act counters, per slot: */
#define MODEL_AC_ALERT 0
#define MODEL_AC_WOULD_DROP 1 /* drop class in dry-run mode */
#define MODEL_AC_DROPPED 2
#define MODEL_AC_ALLOWLISTED 3 /* drop class, but an address is allowlisted */
#define MODEL_AC_KILL_PASSED 4 /* drop class, kill switch on */
#define MODEL_AC_OFF 5 /* drop class, enforcement mode off */
#define MODEL_AC_RATE_PASSED 6 /* rate-limit class, within its rate */
#define MODEL_AC_N 7

/* model_slots: the two slots; model_ctl[0]: the active index; model_stats: per CPU,
 * per slot, packets classified as each class, then packets seen while empty. */
BPF_TABLE("array", __u32, struct model_slot, model_slots, 2);
BPF_TABLE("array", __u32, struct model_ctl, model_ctl, 1);
BPF_TABLE("percpu_array", __u32, struct model_scratch, model_scratch, 1);
BPF_TABLE("percpu_array", __u32, __u64, model_stats, 2 * MODEL_STATS_PER_SLOT);
BPF_TABLE("percpu_array", __u32, __u64, model_act, 2 * MODEL_AC_N);
/* model_push[0]: the newest version of a model the collector pushed that this node loaded
 * (agent/model.py: versions only go up). Pinned beside the rules when the agent pins them,
 * so a restarted agent still refuses an older, replayed version; the kernel never reads it. */
ENF_TABLE("array", __u32, __u64, model_push, 1, 0);
/* model_rl: per slot and class, the rate-limit bucket (GCRA's theoretical arrival time;
 * 0 = a full burst). User space zeroes a slot's buckets when it loads the slot. */
struct model_bucket {
    struct bpf_spin_lock lock;
    __u32 _pad;
    __u64 tat_ns;
};
BPF_TABLE("array", __u32, struct model_bucket, model_rl, 2 * XDPML_MODEL_MAX_OUTPUTS);

static __always_inline void model_act_count(__u32 slot, __u32 what)
{
    __u32 k = (slot & 1) * MODEL_AC_N + what;
    __u64 *c = model_act.lookup(&k);
    if (c)
        *c += 1;
}

/* The class's action for this packet: 0 pass (counted when alert), 2 a drop or
 * rate-limit class (decided by the tail-called model_drop_*: mode, allowlist, kill
 * switch, the class's bucket). The decision
 * is a tail call so that its lookups are verified once, not after every way out of the
 * walk. */
static __always_inline int model_act_on(struct model_slot *m, __u32 slot, int cls, struct model_scratch *s)
{
    if (cls < 0 || cls >= XDPML_MODEL_MAX_OUTPUTS)
        return 0;
    __u8 a = m->action[cls];
    s->cls_action = a;
    s->act_slot = slot;
    if (a == MODEL_ACT_ALERT)
        model_act_count(slot, MODEL_AC_ALERT);
    if (a == MODEL_ACT_RATE_LIMIT) {
        s->rl_ns = m->rl_ns[cls];
        s->rl_burst_ns = m->rl_burst_ns[cls];
        s->rl_key = (slot & 1) * XDPML_MODEL_MAX_OUTPUTS + cls;
    } else if (a != MODEL_ACT_DROP) {
        return 0;
    }
    s->drop_class = 1;
    return 2;
}

/* [0]: the drop decision program for this hook type (xdpml_*_model_drop), set by the loader */
BPF_PROG_ARRAY(model_drop_xdp, 1);
BPF_PROG_ARRAY(model_drop_tc, 1);

/* A rate-limit class's packet: 1 = over the rate. GCRA, as rules.h's enf_act(): a
 * packet conforms when, after paying its cost, the theoretical arrival time is at most
 * one burst ahead of now; one that does not conform pays nothing. */
static __always_inline int model_over_rate(struct model_scratch *s)
{
    __u32 k = s->rl_key;
    struct model_bucket *b = model_rl.lookup(&k);
    if (!b)
        return 0;
    __u64 now = bpf_ktime_get_ns(), cost = s->rl_ns, burst = s->rl_burst_ns;
    int over = 0;
    bpf_spin_lock(&b->lock);
    __u64 t = b->tat_ns > now ? b->tat_ns : now;
    if (t + cost > now + burst)
        over = 1;
    else
        b->tat_ns = t + cost;
    bpf_spin_unlock(&b->lock);
    return over;
}

/* A packet of a drop or rate-limit class: 1 = drop it. Only in enforce mode, never an
 * allowlisted address, never with the kill switch on; a rate-limit class's packet only
 * when over its rate (the bucket is consulted in dry-run too, so would_drop counts what
 * enforce would drop); counted either way. */
static __always_inline int model_drop_decide(struct model_scratch *s)
{
    __u32 z = 0;
    __u32 slot = s->act_slot & 1;
    struct enf_config *cfg = enf_config.lookup(&z);
    if (!cfg || cfg->mode == XDPML_ENF_OFF) {
        model_act_count(slot, MODEL_AC_OFF);
        return 0;
    }
    if (enf_allowlisted(&s->pkt)) {
        model_act_count(slot, MODEL_AC_ALLOWLISTED);
        return 0;
    }
    __u32 *kill = enf_kill.lookup(&z);
    if (kill && *kill) {
        model_act_count(slot, MODEL_AC_KILL_PASSED);
        return 0;
    }
    if (s->cls_action == MODEL_ACT_RATE_LIMIT && !model_over_rate(s)) {
        model_act_count(slot, MODEL_AC_RATE_PASSED);
        return 0;
    }
    if (cfg->mode != XDPML_ENF_ENFORCE) {
        model_act_count(slot, MODEL_AC_WOULD_DROP);
        return 0;
    }
    model_act_count(slot, MODEL_AC_DROPPED);
    return 1;
}

/* The tail-called part of a packet's decision: the drop decision for a drop class, then
 * the sampled record. Returns 1 to drop. */
static __always_inline int model_after(void)
{
    __u32 z = 0;
    struct model_scratch *s = model_scratch.lookup(&z);
    if (!s)
        return 0;
    int drop = s->drop_class ? model_drop_decide(s) : 0;
    if (s->sampled) {
        struct model_event *e = model_events.ringbuf_reserve(sizeof(struct model_event));
        if (e) {
            e->ts_ns = bpf_ktime_get_ns();
            __builtin_memcpy(&e->key, &s->key, sizeof(e->key));
            e->model_id = s->model_id;
            e->cls = s->cls;
            e->action = s->cls_action;
            e->dropped = drop;
            e->slot = s->act_slot & 1;
            e->n_features = s->n_feat;
            __builtin_memcpy(e->x, s->x, sizeof(e->x));
            model_events.ringbuf_submit(e, 0);
        }
    }
    return drop;
}

#define MODEL_PF_N 128 /* model_scratch.pf[]: every feature by MF_* id (a power of two) */

/* Every flow feature at once, into v[MF_SRC2DST_PACKETS..]: a flow model is classified
 * once per flow, so what it does not read costs little. */
static __always_inline void model_flow_features(struct model_scratch *s, __s64 *v)
{
    struct dir_stats *a = &s->fdir[0], *b = &s->fdir[1];
    __u64 n = a->packets + b->packets;
    v[MF_SRC2DST_PACKETS] = a->packets;
    v[MF_DST2SRC_PACKETS] = b->packets;
    v[MF_BIDIRECTIONAL_PACKETS] = n;
    v[MF_SRC2DST_BYTES] = a->bytes;
    v[MF_DST2SRC_BYTES] = b->bytes;
    v[MF_BIDIRECTIONAL_BYTES] = a->bytes + b->bytes;
    v[MF_SRC2DST_MIN_PS] = a->size_min;
    v[MF_SRC2DST_MAX_PS] = a->size_max;
    v[MF_DST2SRC_MIN_PS] = b->size_min;
    v[MF_DST2SRC_MAX_PS] = b->size_max;
    v[MF_SRC2DST_MEAN_PS] = a->packets ? (a->bytes << 8) / a->packets : 0;
    v[MF_DST2SRC_MEAN_PS] = b->packets ? (b->bytes << 8) / b->packets : 0;
    v[MF_BIDIRECTIONAL_MEAN_PS] = n ? ((a->bytes + b->bytes) << 8) / n : 0;
    v[MF_BIDIRECTIONAL_DURATION_MS] = n ? ((s->flast_ns - s->ffirst_ns) * 128) / 125 : 0;
    v[MF_BIDIRECTIONAL_MEAN_PIAT_MS] = n > 1 ? (s->fiat.sum_ns * 128) / (125 * (n - 1)) : 0;
    v[MF_BIDIRECTIONAL_MIN_PIAT_MS] = n > 1 ? (s->fiat.min_ns * 128) / 125 : 0;
    v[MF_BIDIRECTIONAL_MAX_PIAT_MS] = n > 1 ? (s->fiat.max_ns * 128) / 125 : 0;
    MODEL_LOOP
    for (__u32 j = 0; j < 16; j++) /* flag counts: [direction][FIN..CWR] */
        v[MF_SRC2DST_FIN_PACKETS + j] = s->fdir[j >> 3].flag_count[j & 7];
}

/* Groups of packet features a model may not read (model_slot.fskip, set by the
 * compiler from the model's inputs: xdpml/models/features.py GROUPS): a group skipped
 * is not computed, and its entries of pf[] keep an earlier packet's values, which no
 * input of this model reads. The other features cost a load and a store each. */
#define MODEL_FG_FRAG 1    /* ip_frag_offset, ip_flags, ip_id */
#define MODEL_FG_TCP 2     /* tcp_sequence_num, tcp_ack_num, tcp_window_size, tcp_urgent_pointer */
#define MODEL_FG_FLAGS 4   /* the eight TCP flags */
#define MODEL_FG_CLASS 8   /* pr_tcp .. pr_other, the port classes */
#define MODEL_FG_PAYLOAD 16 /* payload_len */

/* The packet features into v[MF_*] (but the groups in skip), with masks instead of
 * branches: a model input is then one indexed load (a switch per input cost ~2 ns each). */
static __always_inline void model_packet_features(struct pkt_info *p, __u32 frame_len, __s64 *v, __u32 skip)
{
    __u64 tcp = p->proto == IPPROTO_TCP;
    __u64 tm = -tcp, v4m = -(__u64)(p->ip_version == 4);
    __u32 sp = p->src_port, dp = p->dst_port;
    v[MF_IP_VERSION] = p->ip_version;
    v[MF_IP_IHL] = p->ihl & v4m;
    v[MF_TOS] = p->tos;
    v[MF_IP_DSCP] = p->tos >> 2;
    v[MF_IP_ECN] = p->tos & 3;
    v[MF_IP_TOTAL_LENGTH] = p->ip_len;
    v[MF_IP_TTL] = p->ttl;
    v[MF_PROTOCOL] = p->proto;
    v[MF_SRC_PORT] = sp;
    v[MF_DST_PORT] = dp;
    v[MF_PKT_LEN] = frame_len;
    v[MF_VLAN_ID] = p->vlan_id;
    if (!(skip & MODEL_FG_FRAG)) {
        __u32 fo = p->frag_off;
        v[MF_IP_FRAG_OFFSET] = ((fo & 0x1fff) & v4m) | ((fo >> 3) & ~v4m);
        v[MF_IP_FLAGS] = (((fo >> 13) & 3) & v4m) | ((fo & 1) & ~v4m);
        v[MF_IP_ID] = p->ip_id & v4m;
    }
    if (!(skip & MODEL_FG_TCP)) {
        v[MF_TCP_SEQUENCE_NUM] = p->tcp_seq & tm;
        v[MF_TCP_ACK_NUM] = p->tcp_ack & tm;
        v[MF_TCP_WINDOW_SIZE] = p->tcp_window & tm;
        v[MF_TCP_URGENT_POINTER] = p->tcp_urg & tm;
    }
    if (!(skip & MODEL_FG_FLAGS)) {
        /* the flags byte is TCP header byte 13, bit 0 FIN ... bit 7 CWR: no byte swap */
        __u32 f = p->tcp_flags & (__u32)tm;
        v[MF_TCP_FIN] = f & 1;
        v[MF_TCP_SYN] = (f >> 1) & 1;
        v[MF_TCP_RST] = (f >> 2) & 1;
        v[MF_TCP_PSH] = (f >> 3) & 1;
        v[MF_TCP_ACK] = (f >> 4) & 1;
        v[MF_TCP_URG] = (f >> 5) & 1;
        v[MF_TCP_ECE] = (f >> 6) & 1;
        v[MF_TCP_CWR] = (f >> 7) & 1;
    }
    if (!(skip & MODEL_FG_PAYLOAD))
        v[MF_PAYLOAD_LEN] = (__u16)(p->l3_end > p->hdr_len ? p->l3_end - p->hdr_len : 0);
    if (!(skip & MODEL_FG_CLASS)) {
        __u64 udp = p->proto == IPPROTO_UDP;
        __u64 icmp = p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6;
        v[MF_PR_TCP] = tcp;
        v[MF_PR_UDP] = udp;
        v[MF_PR_ICMP] = icmp;
        v[MF_PR_OTHER] = !(tcp | udp | icmp);
        v[MF_SRC_PORT_LOW] = sp < 1024;
        v[MF_SRC_PORT_MID] = sp >= 1024 && sp < 49152;
        v[MF_SRC_PORT_HIGH] = sp >= 49152;
        v[MF_DST_PORT_LOW] = dp < 1024;
        v[MF_DST_PORT_MID] = dp >= 1024 && dp < 49152;
        v[MF_DST_PORT_HIGH] = dp >= 49152;
    }
}

#define MODEL_NODE_MASK (XDPML_MODEL_MAX_NODES - 1)
#define MODEL_FEAT_MASK (XDPML_MODEL_MAX_FEATURES - 1)
#define MODEL_LEAFV_MASK (XDPML_MODEL_MAX_LEAF_VALUES - 1)

#define MODEL_NODE_SIZE 16 /* sizeof(struct model_node) */
#define MODEL_NODE_OFF_MASK (MODEL_NODE_MASK * MODEL_NODE_SIZE)
#define MODEL_PF_OFF_MASK ((MODEL_PF_N - 1) * 8)
#define MODEL_NODE_AT(nd, o) ((struct model_node *)((void *)(nd) + (o)))

/* one level: o, the node's byte offset in nd[], becomes its child's */
#define MODEL_STEP(nd, pf, o)                                                                   \
    do {                                                                                        \
        struct model_node *n_ = MODEL_NODE_AT(nd, o);                                           \
        __s64 x_ = *(__s64 *)((void *)(pf) + (n_->feat_off & MODEL_PF_OFF_MASK));               \
        o = ((__u64)n_->left_off + ((__u64)((n_->thr - x_) >> 63) & MODEL_NODE_SIZE)) & MODEL_NODE_OFF_MASK; \
    } while (0)

/* one level of a tree in heap order (model_slot.heap): the children of the node at byte
 * offset o are at 2o + 16 and 2o + 32, so the next offset is a few ALU operations away
 * from the predicted compare, not a load away: the CPU runs the levels' loads ahead (a
 * level ~0.9 ns here against ~1.5 for MODEL_STEP, docs/benchmarks.md). A leaf's left child
 * position holds a copy of it (thr 2^62: the walk goes left). z is the root's offset, 0 in
 * a packed slot: xor-ed into the step (z or z ^ 16, both ready before the compare, so no
 * longer a path for the CPU), it is a no-op, but the verifier does not know its bits, so
 * o's known low bits (one more per level, each outcome its own) are forgotten and the
 * walk's states prune as MODEL_STEP's do, instead of doubling per level. */
#define MODEL_HEAP_STEP(nd, pf, o, cl, cr)                                                      \
    do {                                                                                        \
        struct model_node *n_ = MODEL_NODE_AT(nd, o);                                           \
        __s64 x_ = *(__s64 *)((void *)(pf) + (n_->feat_off & MODEL_PF_OFF_MASK));               \
        o = ((o << 1) + (x_ > n_->thr ? (cr) : (cl))) & MODEL_NODE_OFF_MASK;                    \
    } while (0)

/* acc[o] += the leaf values at bi, plus those at bj masked by keep (0 or -1) */
static __always_inline void model_leaf_sum(struct model_slot *m, struct model_scratch *s, __u32 bi, __u32 bj,
                                           __s64 keep)
{
    __s64 *vi = &m->trees.leaf[bi & MODEL_LEAFV_MASK], *vj = &m->trees.leaf[bj & MODEL_LEAFV_MASK];
    MODEL_LOOP
    for (__u32 o = 0; o < XDPML_MODEL_MAX_OUTPUTS; o++) {
        if (o >= MODEL_RD(m->n_outputs))
            break;
        s->acc[o] += vi[o] + (vj[o] & keep);
    }
}

/* Walk every tree `depth` levels (rounded up to 2 for one tree in heap order, to 4 for
 * trees in pairs). A tree that fits in heap order (the compiler's choice: one tree, and
 * 2^(levels+1) - 1 positions within MAX_NODES) is walked by MODEL_HEAP_STEP; otherwise
 * the two children of a node are adjacent (right = left + 1), so a step is left + (x > thr),
 * written as the sign of thr - x (|thr|, |x| < 2^62: no overflow), on byte offsets
 * (left_off, feat_off: no shift per level); a leaf points to itself with thr 2^62, so
 * shallower leaves stay put. Offsets are masked (the limits are powers of two), so a
 * corrupt slot gives a wrong class, never a bad access; the compiler guarantees every
 * walk ends on a leaf. A level costs ~1.3 ns in pairs, ~0.9 in heap order (docs/benchmarks.md,
 * section split). Clang turns the sign into a compare and a branch: the CPU then
 * predicts the path and runs ahead of the loads, which measured faster here than the
 * branch-free form (an empty asm on thr - x: 35% fewer verifier instructions, but
 * +12 ns on a depth-10 tree and +55 ns on a 10-tree forest, docs/benchmarks.md).
 * Trees not in heap order are walked two at a time: a level is a chain of dependent loads
 * (node, feature value, next node), and two chains overlap their latency. An odd last
 * tree (or a single tree too deep for heap order) is walked twice and summed once.
 * Returns the class (one tree) or 0 (sums in acc[]). */
static __always_inline int model_trees_eval(struct model_slot *m, struct model_scratch *s)
{
    struct model_node *nd = m->trees.node;
    __s64 *pf = s->pf;
    if (MODEL_RD(m->heap)) {
        /* one tree in heap order: walked once (the pairs below would walk it twice), and
         * the next node's offset is computed, not loaded */
        __u64 z = (m->trees.root[0] & MODEL_NODE_MASK) * MODEL_NODE_SIZE, i = z;
        __u64 cl = MODEL_NODE_SIZE + z, cr = MODEL_NODE_SIZE + (MODEL_NODE_SIZE ^ z);
        MODEL_LOOP
        for (__u32 d = 0; d < XDPML_MODEL_MAX_DEPTH; d += 2) {
            if (d >= MODEL_RD(m->depth))
                break;
            MODEL_HEAP_STEP(nd, pf, i, cl, cr);
            MODEL_HEAP_STEP(nd, pf, i, cl, cr);
        }
        __u32 b = MODEL_NODE_AT(nd, i)->leaf;
        if (m->decision == MODEL_DEC_LEAF)
            return b;
        model_leaf_sum(m, s, b, b, 0);
        return 0;
    }
    __u32 last = 0;
    MODEL_LOOP
    for (__u32 t = 0; t < XDPML_MODEL_MAX_TREES; t += 2) {
        __u32 n = MODEL_RD(m->n_trees);
        if (t >= n)
            break;
        /* pair = t + 1 < n from the sign bit: a compare would be a branch, and the
         * verifier would walk the trees once per outcome */
        __s32 dn = (__s32)(t + 1) - (__s32)n;
        asm volatile("" : "+r"(dn));
        __u32 pair = (__u32)dn >> 31;
        __u64 i = (m->trees.root[t] & MODEL_NODE_MASK) * MODEL_NODE_SIZE;
        __u64 j = (m->trees.root[(t + pair) & (XDPML_MODEL_MAX_TREES - 1)] & MODEL_NODE_MASK) * MODEL_NODE_SIZE;
        MODEL_LOOP
        for (__u32 d = 0; d < XDPML_MODEL_MAX_DEPTH; d += 4) {
            if (d >= MODEL_RD(m->depth))
                break;
            MODEL_STEP(nd, pf, i);
            MODEL_STEP(nd, pf, j);
            MODEL_STEP(nd, pf, i);
            MODEL_STEP(nd, pf, j);
            MODEL_STEP(nd, pf, i);
            MODEL_STEP(nd, pf, j);
            MODEL_STEP(nd, pf, i);
            MODEL_STEP(nd, pf, j);
        }
        __u32 bi = MODEL_NODE_AT(nd, i)->leaf, bj = MODEL_NODE_AT(nd, j)->leaf;
        last = bj; /* j is tree t when unpaired */
        if (m->decision == MODEL_DEC_LEAF)
            continue;
        model_leaf_sum(m, s, bi, bj, -(__s64)pair); /* an unpaired tree's second walk adds nothing */
    }
    /* one tree: its leaf's class (the last tree's, as before, if a model had more) */
    if (m->decision == MODEL_DEC_LEAF)
        return last;
    return 0;
}

static __always_inline void model_linear_eval(struct model_slot *m, struct model_scratch *s)
{
    MODEL_LOOP
    for (__u32 o = 0; o < XDPML_MODEL_MAX_OUTPUTS; o++) {
        if (o >= MODEL_RD(m->n_outputs))
            break;
        __s64 a = s->acc[o];
        /* four inputs per compare (the weights and feat_id past n_features are 0 in a
         * packed slot, so the rest of the last four add nothing) */
        MODEL_LOOP
        for (__u32 i = 0; i < XDPML_MODEL_MAX_FEATURES; i += 4) {
            if (i >= MODEL_RD(m->n_features))
                break;
#pragma unroll
            for (__u32 k = 0; k < 4; k++)
                a += m->lin.w[o][(i + k) & MODEL_FEAT_MASK] * s->pf[m->feat_id[(i + k) & MODEL_FEAT_MASK] & (MODEL_PF_N - 1)];
        }
        s->acc[o] = a;
    }
}

static __always_inline int model_mlp_eval(struct model_slot *m, struct model_scratch *s)
{
    MODEL_LOOP
    for (__u32 i = 0; i < XDPML_MODEL_MAX_FEATURES; i++) {
        if (i >= MODEL_RD(m->n_features))
            break;
        __s64 a = (s->pf[m->feat_id[i] & (MODEL_PF_N - 1)] * m->mlp.in_mul[i] + m->mlp.in_add[i]) >> (m->mlp.in_shift[i] & 63);
        if (a > MODEL_ACT_MAX)
            a = MODEL_ACT_MAX;
        if (a < -MODEL_ACT_MAX)
            a = -MODEL_ACT_MAX;
        s->act[0][i] = a;
    }
    MODEL_LOOP
    for (__u32 l = 0; l < XDPML_MODEL_MAX_LAYERS; l++) {
        if (l >= MODEL_RD(m->n_layers))
            break;
        __u32 src = l & 1, dst = src ^ 1;
        MODEL_LOOP
        for (__u32 j = 0; j < XDPML_MODEL_MAX_WIDTH; j++) {
            if (j >= MODEL_RD(m->mlp.width[l]))
                break;
            __s64 a = m->mlp.bias[l][j];
            /* inputs of layer l: the features, then the previous layer's outputs; every
             * input slot, unrolled: the packed weights past the layer's inputs are 0 */
#pragma unroll
            for (__u32 i = 0; i < XDPML_MODEL_MAX_WIDTH; i++)
                a += (__s64)m->mlp.w[l][i][j] * s->act[src][i];
            if (l + 1 == MODEL_RD(m->n_layers)) {
                if (j < XDPML_MODEL_MAX_OUTPUTS)
                    s->acc[j] = a;
            } else {
                a = a > 0 ? (a * m->mlp.mult[l] + (1LL << (MODEL_REQ_SHIFT - 1))) >> MODEL_REQ_SHIFT : 0;
                s->act[dst][j] = a > MODEL_ACT_MAX ? MODEL_ACT_MAX : a;
            }
        }
    }
    return 0;
}

/* Classify one parsed packet on slot m (index slot); returns the class or -1. */
static __always_inline int model_classify(struct pkt_info *p, __u32 frame_len, struct model_slot *m, __u32 slot,
                                          struct model_scratch *s)
{
    __u32 kind = m->kind;
    if (kind == 0) {
        __u32 k = slot * MODEL_STATS_PER_SLOT + XDPML_MODEL_MAX_OUTPUTS;
        __u64 *c = model_stats.lookup(&k);
        if (c)
            *c += 1;
        return -1;
    }
    model_packet_features(p, frame_len, s->pf, m->fskip);
    if (m->flow)
        model_flow_features(s, s->pf);
    MODEL_LOOP
    for (__u32 o = 0; o < XDPML_MODEL_MAX_OUTPUTS; o++) {
        if (o >= MODEL_RD(m->n_outputs))
            break;
        s->acc[o] = m->bias[o];
    }
    int cls = 0;
    if (kind == MODEL_KIND_TREES)
        cls = model_trees_eval(m, s);
    else if (kind == MODEL_KIND_LINEAR)
        model_linear_eval(m, s);
    else if (kind == MODEL_KIND_MLP)
        cls = model_mlp_eval(m, s);
    else
        cls = -1;
    if (cls < 0) {
        count(C_MODEL_ERR);
        return -1;
    }
    if (m->decision == MODEL_DEC_BINARY) {
        cls = s->acc[0] >= 0;
    } else if (m->decision == MODEL_DEC_ARGMAX || m->decision == MODEL_DEC_ARGMAX_LAST0) {
        __s64 best = s->acc[0];
        cls = 0;
        MODEL_LOOP
        for (__u32 o = 1; o < XDPML_MODEL_MAX_OUTPUTS; o++) {
            if (o >= MODEL_RD(m->n_outputs))
                break;
            if (s->acc[o] > best) {
                best = s->acc[o];
                cls = o;
            }
        }
        /* a forest's probabilities less the last class's (compiler.py): that class scores 0
         * and wins only above every other, as the first of equal scores wins */
        if (m->decision == MODEL_DEC_ARGMAX_LAST0 && best < 0)
            cls = MODEL_RD(m->n_outputs);
    }
    if (cls >= XDPML_MODEL_MAX_OUTPUTS) {
        count(C_MODEL_ERR);
        return -1;
    }
    __u32 k = slot * MODEL_STATS_PER_SLOT + (__u32)cls;
    __u64 *c = model_stats.lookup(&k);
    if (c)
        *c += 1;
    s->model_id = m->model_id;
    s->cls = cls;
    return cls;
}

/* Classify the packet, then put the class (plus one) and the model's id into its flow
 * entry. Plain stores beside the lock: one packet's decision, the last writer wins.
 * Returns 2 when the packet's class says drop or its decision is sampled (the caller
 * tail-calls model_drop_* -> model_after()), else 0.
 *
 * Two ways to reach the entry, chosen at compile time by the limits (layout.py
 * Limits.cflags(), XDPML_MODEL_FLOW_PTR):
 *   0  the entry is looked up again by key after the walk. A flow pointer live across
 *      the walk costs the verifier about 100k more instructions, whatever the walk's
 *      size, and past the budget at the default limits (128 trees x depth 16).
 *   1  small limits: fv, the pointer flow_account() returned, is used directly (no key,
 *      no second hash lookup: about 30 ns less per classified packet, docs/benchmarks.md).
 *      A packet whose flow has no entry (table full, C_FLOW_FULL / C_FLOW_BUSY) is then
 *      not classified, and the key is built only for a packet that goes on to the
 *      tail-called program (model_after() reads it). */
static __always_inline int model_run(struct pkt_info *p, __u32 frame_len, __u32 ifindex, struct flow_value *fv)
{
    __u32 z = 0;
#if XDPML_MODEL_FLOW_PTR
    if (!fv)
        return 0;
#endif
    struct model_scratch *s = model_scratch.lookup(&z);
    struct model_ctl *ctl = model_ctl.lookup(&z);
    if (!s || !ctl)
        return 0;
    __u32 slot = ctl->active & 1; /* read once: the packet finishes on this slot */
    struct model_slot *m = model_slots.lookup(&slot);
    if (!m)
        return 0;
#if !XDPML_MODEL_FLOW_PTR
    /* the key before the walk: the parsed packet is then dead during it, so the
     * verifier prunes the walk's states whatever path parsed the packet */
    flow_key_fill(&s->key, p, ifindex);
#endif
    /* the walk reads a copy of the parsed packet in the scratch: p differs by parse path
     * (pk[0] or a tunnel's inner level), so with p dead the walk starts from one state
     * and is verified about once. The outer addresses are not copied (nothing after
     * this reads them: s->pkt.outer_* are stale) */
    __builtin_memcpy(&s->pkt, p, offsetof(struct pkt_info, outer_src_ip));
    s->frame_len = frame_len;
    s->cls = -1;
    s->drop_class = 0;
    s->sampled = 0;
    if (m->flow && m->kind) {
        /* a flow model: once per flow, at the first packet that brings it to k packets
         * (a GSO super-packet can jump over k), on the statistics of its entry so far */
#if XDPML_MODEL_FLOW_PTR
        struct flow_value *f0 = fv;
#else
        struct flow_value *f0 = flows.lookup(&s->key);
        if (!f0)
            return 0;
#endif
        if (f0->model_class) { /* decided: this model's class acts on every later packet */
            int r0 = f0->model_id == m->model_id ? model_act_on(m, slot, f0->model_class - 1, s) : 0;
#if XDPML_MODEL_FLOW_PTR
            if (r0)
                flow_key_fill(&s->key, &s->pkt, ifindex);
#endif
            return r0;
        }
        if (f0->dir[0].packets + f0->dir[1].packets < XDPML_MODEL_FLOW_K)
            return 0;
        __builtin_memcpy(s->fdir, f0->dir, sizeof(s->fdir));
        __builtin_memcpy(&s->fiat, &f0->iat, sizeof(s->fiat));
        s->ffirst_ns = f0->first_ns;
        s->flast_ns = f0->last_ns;
    }
    model_classify(&s->pkt, MODEL_RD(s->frame_len), m, slot, s);
    /* re-read from the map: every way out of the walk then looks the same to the
     * verifier, which checks what follows once instead of once per way */
    int cls = MODEL_RD(s->cls);
    if (cls < 0)
        return 0;
#if XDPML_MODEL_FLOW_PTR
    struct flow_value *fw = fv;
#else
    struct flow_value *fw = flows.lookup(&s->key);
    if (fw)
#endif
    {
        fw->model_class = (__u16)(cls + 1);
        fw->model_id = s->model_id;
    }
    int r = model_act_on(m, slot, cls, s);
    __u32 every = ctl->sample_every;
    if (every && bpf_get_prandom_u32() % every == 0) {
        /* the model's inputs for the record: the walk reads pf[] by feature id, so they
         * are gathered only for a sampled packet */
        MODEL_LOOP
        for (__u32 i = 0; i < XDPML_MODEL_MAX_FEATURES; i++) {
            if (i >= MODEL_RD(m->n_features))
                break;
            s->x[i] = s->pf[m->feat_id[i] & (MODEL_PF_N - 1)];
        }
        s->sampled = 1;
        s->n_feat = (__u8)m->n_features;
        r = 2;
    }
#if XDPML_MODEL_FLOW_PTR
    if (r)
        flow_key_fill(&s->key, &s->pkt, ifindex);
#endif
    return r;
}

#endif /* XDPML_MODEL_H */
