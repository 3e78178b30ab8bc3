/* xdp_flow.c - XDP ingress entry.
 *
 * Parse (parse.h), account the packet to its bidirectional flow (flow.h), and
 * optionally stream a window record / a 1-in-N sample (ring buffers). Every
 * packet gets XDP_PASS: nothing here may cut a node off its network. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "flow.h"
#if XDPML_MODEL
#include "model.h"
#endif

int xdpml_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    count(C_PKT_XDP);
    struct pkt_info p = {};
    int rc = parse_packet(data, end, &p);
    if (rc) {
        count(rc);
        return XDP_PASS;
    }
    __u64 now = bpf_ktime_get_ns();
    __u32 len = (__u32)(end - data);
    struct seg_info g = {.size = len, .last_size = len, .segs = 1};
    flow_account(&p, ctx->ingress_ifindex, now, &g);
    emit_events(&p, ctx->ingress_ifindex, now, &g, len, XDPML_HOOK_XDP);
#if XDPML_MODEL /* -DXDPML_MODEL=1: a model in the kernel (model.h) */
    model_classify(&p, len);
#endif
    return XDP_PASS;
}
