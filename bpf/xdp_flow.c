/* xdp_flow.c - XDP ingress entry.
 *
 * Parse (parse.h), account the packet to its bidirectional flow (flow.h), and
 * optionally stream a window record / a 1-in-N sample (ring buffers). Every
 * packet gets XDP_PASS except those an explicit, expiring rule drops in enforce
 * mode (rules.h); a parse failure always passes. */
#include <uapi/linux/bpf.h>
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

int xdpml_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    count(C_PKT_XDP);
    /* taken before parsing: afterwards no packet pointer is live, so the verifier's
     * states of different parse paths (each with its own proven range) can merge */
    __u32 len = (__u32)(end - data);
    struct pkt_slot *s = pkt_slot_get(XDPML_HOOK_XDP);
    if (!s)
        return XDP_PASS;
    struct pkt_info *p = &s->pk[0];
    int rc = parse_packet(data, end, s, &p);
    if (rc) {
        count(rc);
        return XDP_PASS;
    }
    __u64 now = bpf_ktime_get_ns();
    struct seg_info g = {.size = len, .last_size = len, .segs = 1};
    /* read once: clang may otherwise keep &ctx->ingress_ifindex, which the
     * verifier refuses to dereference */
    __u32 ifindex = ctx->ingress_ifindex;
    struct flow_value *fv = flow_account(p, ifindex, now, &g, XDPML_SEEN_INGRESS);
    emit_events(p, ifindex, now, &g, len, XDPML_HOOK_XDP);
    if (enforce_packet(p, fv, now, len, 1)) /* rules.h */
        return XDP_DROP;
#if XDPML_MODEL /* -DXDPML_MODEL=1: a model in the kernel (model.h) */
    if (model_run(p, len, ifindex, fv)) /* class into the flow entry; a drop class: */
        model_drop_xdp.call(ctx, 0); /* decided there (no return when it runs) */
#endif
    return XDP_PASS;
}

#if XDPML_MODEL
int xdpml_xdp_model_drop(struct xdp_md *ctx)
{
    return model_after() ? XDP_DROP : XDP_PASS;
}
#endif
