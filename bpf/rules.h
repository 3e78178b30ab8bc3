/* rules.h - acting on verdicts: expiring rules, an allowlist no rule overrides, a
 * kill switch. docs/enforcement.md describes the whole loop.
 *
 * Per packet, after flow_account() found the packet's flow entry:
 *  1. enf_config[0]: no rule installed, or mode off -> return (one inlined array
 *     lookup: the whole cost when enforcement is unused).
 *  2. The flow entry caches the decision (rule slot) per packet orientation (rules are
 *     directional) with the rule-set generation it was taken at. Same generation ->
 *     reuse it. Otherwise decide: exact 5-tuple
 *     rule, then source-prefix rules, then destination-prefix rules (each map
 *     skipped while empty); a rule whose protocol/port does not fit, or that has
 *     expired (kernel clock), is passed over. A rule found, the allowlist (either
 *     address in it) turns the decision into "allowlisted": pass and count.
 *  3. A rule found (or allowlisted): the kill switch set -> pass.
 *  4. The cached rule is re-read on every packet: expired -> decide again (so an
 *     expired rule never acts, whether or not the agent is alive to delete it).
 *  5. Action: pass; drop; rate-limit (GCRA token buckets for packets and bytes,
 *     under the rule's lock). A drop is only real in enforce mode and for rules
 *     without the dry-run flag; otherwise it is counted as "would drop".
 * Tunables (-D, set by agent/bpf/loader.py): XDPML_ENF_MAX_RULES, XDPML_ENF_MAX_ALLOW,
 * XDPML_PIN_DIR (maps pinned there, so rules outlive an agent restart). For
 * bench/bench_enforce.py only: XDPML_ENFORCE=0 (compiled out) and
 * XDPML_ENF_BENCH_NO_CACHE (decide on every packet, as on a flow's first one). */
#ifndef XDPML_RULES_H
#define XDPML_RULES_H

#include "counters.h"
#include "flow.h"

#ifndef XDPML_ENF_MAX_RULES
#define XDPML_ENF_MAX_RULES 16384   /* rule slots (slot 0 unused) */
#endif
#ifndef XDPML_ENFORCE
#define XDPML_ENFORCE 1             /* 0: compiled out (the benchmark's baseline) */
#endif
#ifndef XDPML_ENF_MAX_ALLOW
#define XDPML_ENF_MAX_ALLOW 1024    /* allowlist prefixes per address family */
#endif

#ifdef XDPML_PIN_DIR
#define ENF_TABLE(_type, _k, _v, _name, _size, _flags) \
    BPF_TABLE_PINNED(_type, _k, _v, _name, _size, XDPML_PIN_DIR "/" #_name, _flags)
#else
#define ENF_TABLE(_type, _k, _v, _name, _size, _flags) \
    BPF_F_TABLE(_type, _k, _v, _name, _size, _flags)
#endif

/* enf_config: [0] = struct enf_config (mode, generation, rule counts). */
ENF_TABLE("array", __u32, struct enf_config, enf_config, 1, 0);
/* enf_kill: [0] != 0 turns every action into pass from the next packet on. */
ENF_TABLE("array", __u32, __u32, enf_kill, 1, 0);
/* enf_rules: slot -> rule (action, expiry, buckets, hit counters). */
ENF_TABLE("array", __u32, struct enf_rule, enf_rules, XDPML_ENF_MAX_RULES, 0);
/* match maps: -> rule slot. Exact: one entry per direction a rule covers. */
ENF_TABLE("hash", struct enf_exact_key, struct enf_exact_val, enf_exact, 2 * XDPML_ENF_MAX_RULES, 0);
ENF_TABLE("lpm_trie", struct enf_lpm4_key, __u32, enf_src4, XDPML_ENF_MAX_RULES, BPF_F_NO_PREALLOC);
ENF_TABLE("lpm_trie", struct enf_lpm4_key, __u32, enf_dst4, XDPML_ENF_MAX_RULES, BPF_F_NO_PREALLOC);
ENF_TABLE("lpm_trie", struct enf_lpm6_key, __u32, enf_src6, XDPML_ENF_MAX_RULES, BPF_F_NO_PREALLOC);
ENF_TABLE("lpm_trie", struct enf_lpm6_key, __u32, enf_dst6, XDPML_ENF_MAX_RULES, BPF_F_NO_PREALLOC);
/* allowlist: prefix -> unused value. */
ENF_TABLE("lpm_trie", struct enf_lpm4_key, __u32, enf_allow4, XDPML_ENF_MAX_ALLOW, BPF_F_NO_PREALLOC);
ENF_TABLE("lpm_trie", struct enf_lpm6_key, __u32, enf_allow6, XDPML_ENF_MAX_ALLOW, BPF_F_NO_PREALLOC);

/* The rule in this slot may act on this packet now. */
static __always_inline int enf_rule_fits(__u32 *slotp, struct pkt_info *p, __u64 now)
{
    if (!slotp)
        return 0;
    __u32 slot = *slotp;
    struct enf_rule *r = enf_rules.lookup(&slot);
    if (!r || r->expires_ns == 0)
        return 0;
    if (r->proto && r->proto != p->proto)
        return 0;
    if (r->dst_port && r->dst_port != p->dst_port)
        return 0;
    if (r->expires_ns <= now) {
        count(C_ENF_EXPIRED);
        return 0;
    }
    return 1;
}

static __always_inline int enf_allowlisted(struct pkt_info *p)
{
    if (p->ip_version == 4) {
        struct enf_lpm4_key k = {.prefixlen = 32};
        __builtin_memcpy(k.addr, p->src_ip + 12, 4);
        if (enf_allow4.lookup(&k))
            return 1;
        __builtin_memcpy(k.addr, p->dst_ip + 12, 4);
        return enf_allow4.lookup(&k) != 0;
    }
    struct enf_lpm6_key k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, p->src_ip, 16);
    if (enf_allow6.lookup(&k))
        return 1;
    __builtin_memcpy(k.addr, p->dst_ip, 16);
    return enf_allow6.lookup(&k) != 0;
}

/* -> rule slot, 0 for none, XDPML_ENF_SLOT_ALLOWLISTED. */
static __always_inline __u32 enf_decide(struct pkt_info *p, struct enf_config *cfg, __u64 now)
{
    __u32 *s;
    __u32 slot = 0;
    count(C_ENF_DECIDED);
    if (cfg->exact) {
        struct enf_exact_key k = {};
        __builtin_memcpy(k.src_ip, p->src_ip, 16);
        __builtin_memcpy(k.dst_ip, p->dst_ip, 16);
        k.src_port = p->src_port;
        k.dst_port = p->dst_port;
        k.proto = p->proto;
        struct enf_exact_val *e = enf_exact.lookup(&k);
        if (e && enf_rule_fits(&e->slot, p, now))
            slot = e->slot;
    }
    if (!slot && p->ip_version == 4) {
        struct enf_lpm4_key k = {.prefixlen = 32};
        if (cfg->src4) {
            __builtin_memcpy(k.addr, p->src_ip + 12, 4);
            s = enf_src4.lookup(&k);
            if (enf_rule_fits(s, p, now))
                slot = *s;
        }
        if (!slot && cfg->dst4) {
            __builtin_memcpy(k.addr, p->dst_ip + 12, 4);
            s = enf_dst4.lookup(&k);
            if (enf_rule_fits(s, p, now))
                slot = *s;
        }
    } else if (!slot && p->ip_version == 6) {
        struct enf_lpm6_key k = {.prefixlen = 128};
        if (cfg->src6) {
            __builtin_memcpy(k.addr, p->src_ip, 16);
            s = enf_src6.lookup(&k);
            if (enf_rule_fits(s, p, now))
                slot = *s;
        }
        if (!slot && cfg->dst6) {
            __builtin_memcpy(k.addr, p->dst_ip, 16);
            s = enf_dst6.lookup(&k);
            if (enf_rule_fits(s, p, now))
                slot = *s;
        }
    }
    if (slot && enf_allowlisted(p))
        slot = XDPML_ENF_SLOT_ALLOWLISTED;
    return slot;
}

/* Which of the flow entry's two cache slots this packet's direction uses: any rule
 * that gives the two directions of a flow different answers will do; ports decide
 * most packets with one compare. */
static __always_inline int enf_dir(struct pkt_info *p)
{
    if (p->src_port != p->dst_port)
        return p->src_port > p->dst_port;
    return endpoint_lo_first(p) ? 0 : 1;
}

/* Apply the rule; 1: drop the packet. */
static __always_inline int enf_act(struct enf_rule *r, struct enf_config *cfg, __u64 now,
                                   __u32 bytes, __u32 segs)
{
    int drop = r->action == XDPML_ACT_DROP;
    if (r->action == XDPML_ACT_RATE_LIMIT) {
        /* GCRA: a packet conforms when, after paying its cost, the theoretical arrival
         * time is at most one burst ahead of now */
        __u64 cost_p = r->ns_per_pkt * segs;
        __u64 cost_b = (__u64)bytes * r->ps_per_byte / 1000;
        bpf_spin_lock(&r->lock);
        __u64 tp = r->tat_pkt_ns > now ? r->tat_pkt_ns : now;
        __u64 tb = r->tat_byte_ns > now ? r->tat_byte_ns : now;
        if ((cost_p && tp + cost_p > now + r->burst_pkt_ns) ||
            (cost_b && tb + cost_b > now + r->burst_byte_ns)) {
            drop = 1;
        } else {
            r->tat_pkt_ns = tp + cost_p;
            r->tat_byte_ns = tb + cost_b;
        }
        bpf_spin_unlock(&r->lock);
    }
    __sync_fetch_and_add(&r->hit_packets, segs);
    __sync_fetch_and_add(&r->hit_bytes, bytes);
    if (r->first_hit_ns == 0)
        r->first_hit_ns = now;
    r->last_hit_ns = now;
    if (!drop) {
        if (r->action == XDPML_ACT_PASS)
            count_n(C_ENF_PASSED, segs);
        return 0;
    }
    __sync_fetch_and_add(&r->drop_packets, segs);
    if (cfg->mode == XDPML_ENF_ENFORCE && !(r->flags & XDPML_RULE_DRY_RUN)) {
        count_n(C_ENF_DROPPED, segs);
        count_n(C_ENF_DROPPED_BYTES, bytes);
        return 1;
    }
    count_n(C_ENF_WOULD_DROP, segs);
    count_n(C_ENF_WOULD_DROP_BYTES, bytes);
    return 0;
}

/* The hook's one call. fv: the packet's flow entry, NULL when the table had no room
 * (then the decision is taken for every packet). bytes: frame bytes (all segments of a
 * GSO super-packet). Returns 1 when the packet must be dropped. */
static __always_inline int enforce_packet(struct pkt_info *p, struct flow_value *fv, __u64 now,
                                          __u32 bytes, __u32 segs)
{
#if !XDPML_ENFORCE
    return 0;
#endif
    __u32 z = 0;
    struct enf_config *cfg = enf_config.lookup(&z);
    if (!cfg || cfg->rules == 0 || cfg->mode == XDPML_ENF_OFF)
        return 0;
    __u32 gen = cfg->gen;
    __u32 slot;
    __u32 *cgen = 0, *cslot = 0;
    if (fv) {
        int d = enf_dir(p);
        cgen = d ? &fv->enf_gen[1] : &fv->enf_gen[0];
        cslot = d ? &fv->enf_slot[1] : &fv->enf_slot[0];
    }
#ifdef XDPML_ENF_BENCH_NO_CACHE
    cgen = 0;
#endif
    if (cgen && *cgen == gen) {
        slot = *cslot;
    } else {
        slot = enf_decide(p, cfg, now);
        if (cgen) {
            *cslot = slot;
            *cgen = gen;
        }
    }
    if (slot == 0)
        return 0;
    if (slot == XDPML_ENF_SLOT_ALLOWLISTED) {
        count_n(C_ENF_ALLOWLISTED, segs);
        return 0;
    }
    /* a rule matched: the kill switch is only looked at now (established flows that
     * no rule matches never pay for it) */
    __u32 *kill = enf_kill.lookup(&z);
    if (kill && *kill) {
        count_n(C_ENF_KILL_PASSED, segs);
        return 0;
    }
    struct enf_rule *r = enf_rules.lookup(&slot);
    if (!r)
        return 0;
    if (r->expires_ns <= now || r->gen > gen) {
        /* expired, deleted, or the slot was reused after the decision: decide again
         * (enf_rule_fits counts the expired rule it passes over) */
        slot = enf_decide(p, cfg, now);
        if (cgen) {
            *cslot = slot;
            *cgen = gen;
        }
        if (slot == 0)
            return 0;
        if (slot == XDPML_ENF_SLOT_ALLOWLISTED) {
            count_n(C_ENF_ALLOWLISTED, segs);
            return 0;
        }
        r = enf_rules.lookup(&slot);
        if (!r)
            return 0;
    }
    return enf_act(r, cfg, now, bytes, segs);
}

#endif /* XDPML_RULES_H */
