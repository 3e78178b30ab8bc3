"""The model slot, as bpf/model.h lays it out: limits, ctypes mirror and packing.

A whole model lives in one array-map value (``struct model_slot``), so the kernel
does one lookup per packet and then plain indexed loads (DESIGN.md: one lookup per
model, not per node). The limits are -D flags; :class:`Limits` holds their values
and builds the flags, and :func:`slot_type` the matching ctypes structure. The kernel refuses a slot value
of another size (ModelSlots.write_slot), and tests/models/test_kernel.py checks every
field through the kernel's own classification of crafted packets.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

LEAF_THR = 2**62  # model_node.thr of a leaf (points to itself: x <= thr always)
KIND_NONE, KIND_TREES, KIND_LINEAR, KIND_MLP = 0, 1, 2, 3
# model_slot.action, per class (bpf/model.h MODEL_ACT_*); rate-limit takes :PPS[:BURST]
ACTIONS = {"pass": 0, "alert": 1, "drop": 2, "rate-limit": 3}
ACT_COUNTERS = ("alert", "would_drop", "dropped", "allowlisted", "kill_passed", "mode_off", "rate_passed")  # model_act
DEC_LEAF, DEC_ARGMAX, DEC_BINARY, DEC_ARGMAX_LAST0 = 0, 1, 2, 3  # bpf/model.h MODEL_DEC_*
MLP_REQ_SHIFT = 24  # requantisation: (acc * mult + 2^23) >> 24
ACT_MAX = 32767  # int16 activations
PF_N = 128  # bpf/model.h MODEL_PF_N: the per-packet feature array, indexed by MF_* id


@dataclass(frozen=True)
class Limits:
    """Compile-time limits of the kernel's model slots (-DXDPML_MODEL_MAX_*)."""

    features: int = 16  # model inputs (power of two, >= 4)
    depth: int = 16  # tree depth (levels walked; a multiple of 4)
    trees: int = 128  # trees per model
    nodes: int = 8192  # nodes of all trees together (power of two, at most 32768)
    leaf_values: int = 8192  # leaf values of all trees (leaves x outputs; power of two, <= 32768)
    outputs: int = 8  # classes (argmax) or 1 (binary)
    layers: int = 3  # MLP weight layers
    width: int = 16  # MLP layer width (inputs included)

    def __post_init__(self):
        from xdpml.errors import ConfigError

        for k, v in asdict(self).items():
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"model limit {k}={v!r}: must be a positive integer")
        if self.nodes > 0x8000 or self.leaf_values > 0x8000:
            raise ConfigError("model limits nodes and leaf_values are at most 32768 (16-bit indices)")
        for k in ("nodes", "leaf_values", "features"):
            v = getattr(self, k)
            if v & (v - 1):
                raise ConfigError(f"model limit {k}={v}: must be a power of two (indices are masked)")
        if self.depth % 4:
            raise ConfigError(f"model limit depth={self.depth}: must be a multiple of 4 (walked 4 levels at a time)")
        if self.trees % 4:
            raise ConfigError(f"model limit trees={self.trees}: must be a multiple of 4")
        if self.features < 4:
            raise ConfigError(
                f"model limit features={self.features}: must be at least 4 (linear models read 4 inputs at a time)"
            )
        if self.features > self.width:
            raise ConfigError(
                f"model limit features={self.features} exceeds width={self.width} "
                "(the MLP's first layer reads every feature)"
            )

    @property
    def flow_ptr(self) -> bool:
        """bpf/model.h XDPML_MODEL_FLOW_PTR: the class is stored through the flow entry's
        pointer instead of a second lookup (about 30 ns less per classified packet). The
        verifier then checks the walk in more states, so only for limits up to
        FLOW_PTR_MAX_TREE_LEVELS tree levels (trees x depth; docs/benchmarks.md)."""
        return self.trees * self.depth <= FLOW_PTR_MAX_TREE_LEVELS

    def cflags(self) -> list[str]:
        flags = [f"-DXDPML_MODEL_MAX_{k.upper()}={v}" for k, v in asdict(self).items()]
        return flags + [f"-DXDPML_MODEL_FLOW_PTR={int(self.flow_ptr)}"]


# trees x depth up to which Limits.flow_ptr holds: 32 x 16 verified in 750k instructions
# with every feature compiled in (the default 128 x 16 would pass the kernel's 1M)
FLOW_PTR_MAX_TREE_LEVELS = 512


DEFAULT_LIMITS = Limits()

s8, u16, u32, s64 = C.c_int8, C.c_uint16, C.c_uint32, C.c_int64


NODE_SIZE = 16  # bytes of a ModelNode: left_off is 16 x the left child's index
PF_SIZE = 8  # bytes of a feature value: feat_off is 8 x the feature's MF id


class ModelNode(C.Structure):
    _fields_ = [("thr", s64), ("left_off", u32), ("feat_off", u16), ("leaf", u16)]


@cache
def slot_type(lim: Limits) -> type:
    """ctypes mirror of struct model_slot for these limits."""

    class Trees(C.Structure):
        # leaf: lim.outputs more than the limit (bpf/model.h reads a leaf's values unmasked past its offset)
        _fields_ = [
            ("root", u16 * lim.trees),
            ("node", ModelNode * lim.nodes),
            ("leaf", s64 * (lim.leaf_values + lim.outputs)),
        ]

    class Linear(C.Structure):
        _fields_ = [("w", (s64 * lim.features) * lim.outputs)]

    class Mlp(C.Structure):
        _fields_ = [
            ("in_mul", s64 * lim.features),
            ("in_add", s64 * lim.features),
            ("in_shift", s64 * lim.features),
            ("mult", s64 * lim.layers),
            ("bias", (s64 * lim.width) * lim.layers),
            ("width", u32 * lim.layers),
            ("w", ((s8 * lim.width) * lim.width) * lim.layers),
        ]

    class Slot(C.Structure):
        _fields_ = [
            ("kind", u32),
            ("decision", u32),
            ("n_features", u32),
            ("n_outputs", u32),
            ("n_trees", u32),
            ("n_layers", u32),
            ("model_id", u32),
            ("depth", u32),
            ("flow", u32),
            ("fskip", u32),
            ("heap", u32),
            ("action", C.c_uint8 * lim.outputs),
            ("feat_id", u16 * lim.features),
            ("bias", s64 * lim.outputs),
            ("rl_ns", C.c_uint64 * lim.outputs),
            ("rl_burst_ns", C.c_uint64 * lim.outputs),
            ("trees", Trees),
            ("lin", Linear),
            ("mlp", Mlp),
        ]

    return Slot


def slot_dtype(lim: Limits) -> np.dtype:
    return np.dtype(slot_type(lim))


def empty_slot(lim: Limits) -> np.ndarray:
    """A zeroed slot as a 0-d structured array (kind 0: no model)."""
    return np.zeros((), dtype=slot_dtype(lim))
