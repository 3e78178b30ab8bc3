/* tc_flow.c - TC (clsact, direct action) ingress and egress entries.
 *
 * Same parser and flow table as xdp_flow.c. TC sees socket buffers: an outer
 * VLAN tag may sit in skb metadata instead of the frame, and a GSO super-packet
 * stands for gso_segs wire segments (flow.h explains the accounting). Returns
 * TC_ACT_UNSPEC so any other classifier on the hook still runs, or TC_ACT_SHOT for
 * a packet an explicit, expiring rule drops in enforce mode (rules.h). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "flow.h"
#include "rules.h"
#if XDPML_MODEL
#include "model.h"
#endif

#define PULL_LEN 256 /* headers of a tunnel packet, inner ones included */

static __always_inline int tc_handle(struct __sk_buff *skb, __u8 hook)
{
    count(hook == XDPML_HOOK_TC_INGRESS ? C_PKT_TC_INGRESS : C_PKT_TC_EGRESS);
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (end - data < PULL_LEN && skb->len > (__u32)(end - data)) {
        /* headers in a paged fragment: make them linear, then re-read pointers */
        bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
        data = (void *)(long)skb->data;
        end = (void *)(long)skb->data_end;
    }
    struct pkt_slot *s = pkt_slot_get(hook);
    if (!s)
        return TC_ACT_UNSPEC;
    struct pkt_info *p = &s->pk[0];
    __u32 vlan_extra = 0;
    if (skb->vlan_present) {
        p->vlan_id = skb->vlan_tci & 0x0fff;
        p->has_vlan = 1;
        vlan_extra = 4; /* the tag is on the wire even if not in the buffer */
    }
    int rc = parse_packet(data, end, s, &p);
    if (rc) {
        count(rc);
        return TC_ACT_UNSPEC;
    }
    if (hook == XDPML_HOOK_TC_EGRESS && skb->ingress_ifindex == skb->ifindex && flow_hairpin(p, skb->ifindex))
        return TC_ACT_UNSPEC; /* counted, sampled and ruled on at this interface's ingress */
    __u64 now = bpf_ktime_get_ns();
    __u32 len = skb->len + vlan_extra;
    struct seg_info g = {.size = len, .last_size = len, .segs = 1};
    __u32 segs = skb->gso_segs;
    __u32 gso_size = skb->gso_size;
    if (segs > 1 && gso_size > 0 && skb->len > p->hdr_len + (segs - 1) * gso_size) {
        g.segs = segs;
        g.size = p->hdr_len + gso_size + vlan_extra;
        g.last_size = skb->len - (segs - 1) * gso_size + vlan_extra;
        count_n(C_GSO_SEGS, segs - 1);
    }
    struct flow_value *fv = flow_account(p, skb->ifindex, now, &g,
                                         hook == XDPML_HOOK_TC_INGRESS ? XDPML_SEEN_INGRESS : XDPML_SEEN_EGRESS);
    emit_events(p, skb->ifindex, now, &g, len, hook);
    if (enforce_packet(p, fv, now, len, g.segs)) /* rules.h */
        return TC_ACT_SHOT;
#if XDPML_MODEL /* -DXDPML_MODEL=1: a model in the kernel (model.h) */
    if (model_run(p, len, skb->ifindex, fv)) /* class into the flow entry; a drop class: */
        model_drop_tc.call(skb, 0); /* decided there (no return when it runs) */
#endif
    return TC_ACT_UNSPEC;
}

#if XDPML_MODEL
int xdpml_tc_model_drop(struct __sk_buff *skb)
{
    return model_after() ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
#endif

int xdpml_tc_ingress(struct __sk_buff *skb)
{
    return tc_handle(skb, XDPML_HOOK_TC_INGRESS);
}

int xdpml_tc_egress(struct __sk_buff *skb)
{
    return tc_handle(skb, XDPML_HOOK_TC_EGRESS);
}
