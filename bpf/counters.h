/* counters.h - the kernel counts its own failures; user space exports them. */
#ifndef XDPML_COUNTERS_H
#define XDPML_COUNTERS_H

#include "maps.h"

static __always_inline void count_n(__u32 idx, __u64 n)
{
    __u64 *c = counters.lookup(&idx);
    if (c)
        *c += n; /* per-CPU slot: no atomic needed */
}

static __always_inline void count(__u32 idx)
{
    count_n(idx, 1);
}

#endif /* XDPML_COUNTERS_H */
