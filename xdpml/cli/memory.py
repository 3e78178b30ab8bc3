"""Keep multi-megabyte message buffers in the heap instead of fresh mmaps.

Every batch passes through several buffers of a few MiB (column bytes, the protobuf
message, its serialization, gRPC's copy). glibc serves allocations that large with a
new mmap and returns them with munmap, so each byte is page-faulted and zeroed by the
kernel again for every message; on a VM that costs more than the copies themselves
(measured: about 30% of end-to-end throughput, docs/benchmarks.md). Raising the mmap
threshold and the trim threshold lets freed buffers be reused. The heap then keeps
its high-water mark (bounded by the exporter's queue and in-flight limits).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(*, mmap_threshold: int = 64 * 1024 * 1024, trim_threshold: int = 256 * 1024 * 1024) -> bool:
    """Apply once per process; a no-op off glibc or when XDPML_NO_MALLOC_TUNING is set."""
    global _done
    if _done or os.environ.get("XDPML_NO_MALLOC_TUNING"):
        return False
    _done = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        log.debug("mallopt refused the thresholds")
    return ok
