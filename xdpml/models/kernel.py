"""Models in a loaded datapath: write a slot, flip the active index, read per-class counts.

Works on map file descriptors (BCC's tables or pinned maps alike) through the bpf
syscall, so a whole model is one BPF_MAP_UPDATE_ELEM of one slot value.

Swap protocol (bpf/model.h): the kernel reads ``model_ctl.active`` once per packet
and finishes the packet on that slot. :meth:`ModelSlots.swap` writes the idle slot,
then flips the index; before it rewrites a slot that was active, it lets
``GRACE_S`` pass since that slot stopped being active, far longer than any packet's
program run (microseconds), so no packet is ever scored by a half-written model.
"""

from __future__ import annotations

import ctypes as C
import os
import time

import numpy as np

from xdpml.datapath import syscalls
from xdpml.errors import ModelError
from xdpml.models import layout as L

MAP_LOOKUP, MAP_UPDATE = 1, 2
GRACE_S = 0.002


_ElemAttr = syscalls.ElemAttr


def _bpf_elem(cmd: int, fd: int, key: int, buf) -> None:
    k = C.c_uint32(key)
    attr = _ElemAttr(map_fd=fd, key=C.addressof(k), value=C.addressof(buf), flags=0)
    rc = syscalls.bpf(cmd, attr)
    if rc < 0:
        err = -rc
        raise ModelError(
            f"bpf map {'update' if cmd == MAP_UPDATE else 'lookup'} (fd {fd}, key {key}): {os.strerror(err)}"
        )


def ncpus() -> int:
    """Possible CPUs, the length of a per-CPU map value."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n += int(b or a) - int(a) + 1
    return n


class ModelSlots:
    """The two model slots of one loaded datapath."""

    def __init__(self, *, slots_fd: int, ctl_fd: int, stats_fd: int, limits: L.Limits):
        self.slots_fd, self.ctl_fd, self.stats_fd = slots_fd, ctl_fd, stats_fd
        self.limits = limits
        self.slot_size = L.slot_dtype(limits).itemsize
        self._ncpu = ncpus()
        self._stats_buf = (C.c_uint64 * self._ncpu)()
        self._left_active = [0.0, 0.0]  # monotonic time each slot stopped being active

    @classmethod
    def of(cls, bpf, limits: L.Limits) -> ModelSlots:
        """From a BCC BPF object compiled with -DXDPML_MODEL=1 (map fds straight from
        libbcc: BCC's table wrapper cannot decode the slot's signed-char weights)."""
        from bcc import libbcc

        fds = {}
        for name in ("model_slots", "model_ctl", "model_stats"):
            fd = libbcc.lib.bpf_table_fd(bpf.module, name.encode())
            if fd < 0:
                raise ModelError("this datapath was compiled without a model (-DXDPML_MODEL=1)")
            fds[name] = fd
        return cls(slots_fd=fds["model_slots"], ctl_fd=fds["model_ctl"], stats_fd=fds["model_stats"], limits=limits)

    # -- raw slot access ---------------------------------------------------
    def active(self) -> int:
        buf = (C.c_uint32 * 2)()
        _bpf_elem(MAP_LOOKUP, self.ctl_fd, 0, buf)
        return int(buf[0]) & 1

    def read_slot(self, index: int) -> np.ndarray:
        buf = C.create_string_buffer(self.slot_size)
        _bpf_elem(MAP_LOOKUP, self.slots_fd, index, buf)
        return np.frombuffer(buf.raw, dtype=L.slot_dtype(self.limits))[0]

    def write_slot(self, index: int, value: np.ndarray | bytes) -> None:
        """Write one slot whole. Writing the active slot is refused: packets are reading it."""
        if index == self.active():
            raise ModelError(f"slot {index} is active: write the idle slot, then flip")
        wait = self._left_active[index] + GRACE_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # packets that started on this slot before the flip are long done
        data = value.tobytes() if isinstance(value, np.ndarray) else bytes(value)
        if len(data) != self.slot_size:
            raise ModelError(
                f"slot value is {len(data)} bytes, the datapath's is {self.slot_size} "
                "(compiled with other model limits)"
            )
        buf = C.create_string_buffer(data, len(data))
        _bpf_elem(MAP_UPDATE, self.slots_fd, index, buf)

    def flip(self, index: int) -> None:
        prev = self.active()
        buf = (C.c_uint32 * 2)(index & 1, 0)
        _bpf_elem(MAP_UPDATE, self.ctl_fd, 0, buf)
        if prev != index:
            self._left_active[prev] = time.monotonic()

    # -- the protocol --------------------------------------------------------
    def swap(self, value: np.ndarray | bytes) -> int:
        """Load a packed model into the idle slot and make it active; returns the slot."""
        idle = self.active() ^ 1
        self.write_slot(idle, value)
        self.flip(idle)
        return idle

    def unload(self) -> int:
        """Make an empty slot active (packets are no longer classified)."""
        return self.swap(L.empty_slot(self.limits))

    def class_counts(self, slot: int | None = None) -> np.ndarray:
        """Packets classified per class (summed over CPUs) for one slot or both; the last
        entry counts packets seen while the slot was empty."""
        per = self.limits.outputs + 1
        slots = (0, 1) if slot is None else (slot,)
        out = np.zeros(per, np.int64)
        for s in slots:
            for k in range(per):
                _bpf_elem(MAP_LOOKUP, self.stats_fd, s * per + k, self._stats_buf)
                out[k] += sum(self._stats_buf)
        return out
