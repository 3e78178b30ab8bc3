/* maps.h - every map of the datapath, with key, value and sizing.
 * Tunables are -D flags set by the loader (agent/bpf/loader.py), never text edits. */
#ifndef XDPML_MAPS_H
#define XDPML_MAPS_H

#include "abi.h"

#ifndef XDPML_FLOW_TABLE_SIZE
#define XDPML_FLOW_TABLE_SIZE 65536 /* flows; ~ (44 + 480) bytes each at FIRST_N 10 */
#endif
#ifndef XDPML_RINGBUF_PAGES
#define XDPML_RINGBUF_PAGES 1024    /* 4 MiB at 4 KiB pages; power of two */
#endif
#ifndef XDPML_SAMPLE_RATE
#define XDPML_SAMPLE_RATE 0         /* 1 in N packets to pkt_events; 0 = off (compiled out) */
#endif
#ifndef XDPML_FLOW_LOCK
#define XDPML_FLOW_LOCK 1           /* 1: per-flow spin lock around updates (exact under concurrency) */
#endif
#ifndef XDPML_EARLY_PACKETS
#define XDPML_EARLY_PACKETS 0       /* early export after this many packets; 0 = off */
#endif
#ifndef XDPML_EARLY_MS
#define XDPML_EARLY_MS 0            /* ... or on a packet this many ms after the first; 0 = off */
#endif
#ifndef XDPML_EARLY_PAGES
#define XDPML_EARLY_PAGES 64        /* early_events ring buffer: 256 KiB, ~5400 notices */
#endif
#define XDPML_EARLY (XDPML_EARLY_PACKETS > 0 || XDPML_EARLY_MS > 0)
#ifndef XDPML_WINDOW
#define XDPML_WINDOW 0              /* 1: every packet to win_events for window features */
#endif

/* flows: flow_key -> flow_value. A plain (preallocated) hash, not LRU: when it is
 * full new flows are counted in C_FLOW_FULL instead of silently evicting others;
 * the harvester exports idle and finished flows to make room. */
BPF_TABLE("hash", struct flow_key, struct flow_value, flows, XDPML_FLOW_TABLE_SIZE);

/* flow_zero: one all-zero value used to create entries (too big for the stack).
 * Typed as raw bytes: the verifier refuses to hand a map value that contains a
 * bpf_spin_lock to a helper, and the kernel skips the lock when it copies. */
struct flow_value_bytes {
    __u8 raw[sizeof(struct flow_value)];
};
BPF_TABLE("percpu_array", __u32, struct flow_value_bytes, flow_zero, 1);

/* counters: enum xdpml_counter -> count, per CPU. */
BPF_TABLE("percpu_array", __u32, __u64, counters, C_COUNTERS_MAX);

#if XDPML_WINDOW
/* win_events: struct win_event per packet, for window features. */
BPF_RINGBUF_OUTPUT(win_events, XDPML_RINGBUF_PAGES);
#endif
#if XDPML_SAMPLE_RATE > 0
/* pkt_events: struct pkt_event for 1 in XDPML_SAMPLE_RATE packets. */
BPF_RINGBUF_OUTPUT(pkt_events, XDPML_RINGBUF_PAGES);
#endif

#if XDPML_EARLY
/* early_events: struct early_event, once per flow entry (bpf/flow.h, agent/pipeline.py). */
BPF_RINGBUF_OUTPUT(early_events, XDPML_EARLY_PAGES);
#endif

#endif /* XDPML_MAPS_H */
