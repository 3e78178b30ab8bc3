"""Models in a loaded datapath: write a slot, flip the active index, read per-class counts.

Works on map file descriptors (BCC's tables or pinned maps alike) through the bpf
syscall, so a whole model is one BPF_MAP_UPDATE_ELEM of one slot value.

Swap protocol (bpf/model.h): the kernel reads ``model_ctl.active`` once per packet
and finishes the packet on that slot. :meth:`ModelSlots.swap` writes the idle slot,
then flips the index; before it rewrites a slot that was active, it lets
``GRACE_S`` pass since that slot stopped being active, far longer than any packet's
program run (microseconds), so no packet is ever scored by a half-written model.
The flip time lives in the kernel's ``model_ctl`` value (``flipped_ns``), so this holds
across processes: the agent and `xdpml model` CLI calls alike.

A running agent pins the three maps under ``<pin dir>/model/`` (:func:`pin`); the CLI
opens them there (:meth:`ModelSlots.pinned`), reading the limits the program was
compiled with from ``model_ctl``. Writers take an flock on that directory.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import errno
import fcntl
import os
import time
from dataclasses import fields

import numpy as np

from xdpml.datapath import syscalls
from xdpml.errors import ModelError
from xdpml.models import layout as L

MAP_LOOKUP, MAP_UPDATE = 1, 2
GRACE_S = 0.002
MAP_NAMES = ("model_slots", "model_ctl", "model_stats", "model_act", "model_rl")
BUCKET_SIZE = 16  # struct model_bucket: spin lock, pad, tat_ns
PIN_SUBDIR = "model"
LIMIT_ORDER = tuple(f.name for f in fields(L.Limits))


class Ctl(C.Structure):
    """struct model_ctl (bpf/model.h)."""

    _fields_ = [
        ("active", C.c_uint32),
        ("seq", C.c_uint32),
        ("flipped_ns", C.c_uint64),
        ("limits", C.c_uint32 * 8),
        ("sample_every", C.c_uint32),
        ("_pad2", C.c_uint32),
    ]


def event_type(lim: L.Limits) -> type:
    """ctypes mirror of struct model_event (bpf/model.h) for these limits."""
    from xdpml.datapath.abi import FlowKey

    class ModelEvent(C.Structure):
        _fields_ = [
            ("ts_ns", C.c_uint64),
            ("key", FlowKey),
            ("model_id", C.c_uint32),
            ("cls", C.c_int32),
            ("action", C.c_uint8),
            ("dropped", C.c_uint8),
            ("slot", C.c_uint8),
            ("n_features", C.c_uint8),
            ("x", C.c_int64 * lim.features),
        ]

    return ModelEvent


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

    def __init__(
        self,
        *,
        slots_fd: int,
        ctl_fd: int,
        stats_fd: int,
        limits: L.Limits,
        act_fd: int = -1,
        rl_fd: int = -1,
        owned: bool = False,
        lock_dir: str = "",
    ):
        self.slots_fd, self.ctl_fd, self.stats_fd, self.act_fd = slots_fd, ctl_fd, stats_fd, act_fd
        self.rl_fd = rl_fd
        self.limits = limits
        self.slot_size = L.slot_dtype(limits).itemsize
        self._ncpu = ncpus()
        self._stats_buf = (C.c_uint64 * self._ncpu)()
        self._owned = owned  # fds opened from pins: closed by close()
        self.lock_dir = lock_dir

    @classmethod
    def of(cls, bpf, limits: L.Limits) -> ModelSlots:
        """From a BCC BPF object compiled with -DXDPML_MODEL=1 (map fds straight from
        libbcc: BCC's table wrapper cannot decode the slot's signed-char weights)."""
        from bcc import libbcc

        fds = {}
        for name in MAP_NAMES:
            fd = libbcc.lib.bpf_table_fd(bpf.module, name.encode())
            if fd < 0:
                raise ModelError("this datapath was compiled without a model (-DXDPML_MODEL=1)")
            fds[name] = fd
        m = cls(
            slots_fd=fds["model_slots"],
            ctl_fd=fds["model_ctl"],
            stats_fd=fds["model_stats"],
            act_fd=fds["model_act"],
            rl_fd=fds["model_rl"],
            limits=limits,
        )
        ctl = m.ctl()
        if tuple(ctl.limits) == (0,) * 8:  # a fresh program: state its limits for the CLI
            ctl.limits[:] = [getattr(limits, k) for k in LIMIT_ORDER]
            _bpf_elem(MAP_UPDATE, m.ctl_fd, 0, ctl)
        return m

    @classmethod
    def pinned(cls, pin_dir: str) -> ModelSlots:
        """The slots a running agent pinned under ``pin_dir/model`` (its --pin-dir)."""
        from xdpml.datapath.bpfsys import map_info, obj_get
        from xdpml.errors import EnvironmentNotReady

        d = os.path.join(pin_dir, PIN_SUBDIR)
        fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                try:
                    fds[name] = obj_get(os.path.join(d, name))
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        raise EnvironmentNotReady(
                            f"no model slots pinned at {d}: start the agent with --model-slots (or --model FILE) "
                            "and this --pin-dir"
                        ) from None
                    raise EnvironmentNotReady(f"cannot open {d}/{name}: {exc.strerror} (run as root)") from None
            ctl = Ctl()
            _bpf_elem(MAP_LOOKUP, fds["model_ctl"], 0, ctl)
            try:
                limits = L.Limits(**dict(zip(LIMIT_ORDER, (int(v) for v in ctl.limits))))
            except Exception:
                raise ModelError(f"the model slots at {d} state no limits (another xdpml version?)") from None
            got = map_info(fds["model_slots"]).value_size
            if got != L.slot_dtype(limits).itemsize:
                raise ModelError(
                    f"the model slots at {d} hold {got}-byte values, not the {L.slot_dtype(limits).itemsize} "
                    "of their stated limits (another xdpml version?)"
                )
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(
            slots_fd=fds["model_slots"],
            ctl_fd=fds["model_ctl"],
            stats_fd=fds["model_stats"],
            act_fd=fds["model_act"],
            rl_fd=fds["model_rl"],
            limits=limits,
            owned=True,
            lock_dir=d,
        )

    def close(self) -> None:
        if self._owned:
            for fd in (self.slots_fd, self.ctl_fd, self.stats_fd, self.act_fd, self.rl_fd):
                os.close(fd)
            self._owned = False

    @contextlib.contextmanager
    def locked(self):
        """One writer at a time across processes (an flock on the pin directory)."""
        if not self.lock_dir:
            yield
            return
        fd = os.open(self.lock_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- raw slot access ---------------------------------------------------
    def ctl(self) -> Ctl:
        c = Ctl()
        _bpf_elem(MAP_LOOKUP, self.ctl_fd, 0, c)
        return c

    def active(self) -> int:
        return int(self.ctl().active) & 1

    def read_slot(self, index: int) -> np.ndarray:
        buf = C.create_string_buffer(self.slot_size)
        _bpf_elem(MAP_LOOKUP, self.slots_fd, index, buf)
        return np.frombuffer(buf.raw, dtype=L.slot_dtype(self.limits))[0]

    def write_slot(self, index: int, value: np.ndarray | bytes) -> None:
        """Write one slot whole. Writing the active slot is refused: packets are reading it."""
        ctl = self.ctl()
        if index == ctl.active & 1:
            raise ModelError(f"slot {index} is active: write the idle slot, then flip")
        wait = ctl.flipped_ns / 1e9 + GRACE_S - time.monotonic()
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
        if self.rl_fd >= 0:  # the slot's rate-limit buckets start full (the kernel skips the lock)
            zero = C.create_string_buffer(BUCKET_SIZE)
            for c in range(self.limits.outputs):
                _bpf_elem(MAP_UPDATE, self.rl_fd, (index & 1) * self.limits.outputs + c, zero)

    def flip(self, index: int, *, loaded: bool = False) -> None:
        """Make slot ``index`` active: one update of model_ctl (``loaded``: a new model
        went into it, so the load count goes up)."""
        ctl = self.ctl()
        prev = ctl.active & 1
        ctl.active = index & 1
        if loaded:
            ctl.seq += 1
        if prev != index & 1:
            ctl.flipped_ns = time.monotonic_ns()
        _bpf_elem(MAP_UPDATE, self.ctl_fd, 0, ctl)

    # -- the protocol --------------------------------------------------------
    def swap(self, value: np.ndarray | bytes) -> int:
        """Load a packed model into the idle slot and make it active; returns the slot.
        A model packed without a model_id gets the load count (see `xdpml model show`)."""
        with self.locked():
            arr = np.frombuffer(value.tobytes() if isinstance(value, np.ndarray) else bytes(value), np.uint8).copy()
            if len(arr) == self.slot_size:
                v = arr.view(L.slot_dtype(self.limits))[0]
                if v["kind"] and not v["model_id"]:  # unnamed: the load count names it
                    v["model_id"] = self.ctl().seq + 1
            idle = self.active() ^ 1
            self.write_slot(idle, arr.tobytes())
            self.flip(idle, loaded=True)
            return idle

    def set_sampling(self, every: int) -> None:
        """1 in ``every`` classified packets' decisions to model_events (0: off)."""
        with self.locked():
            ctl = self.ctl()
            ctl.sample_every = max(0, int(every))
            _bpf_elem(MAP_UPDATE, self.ctl_fd, 0, ctl)

    def back(self) -> int:
        """Make the other slot active again (the model loaded before the last one)."""
        with self.locked():
            other = self.active() ^ 1
            if not self.read_slot(other)["kind"]:
                raise ModelError(f"slot {other} is empty: nothing to swap back to")
            self.flip(other)
            return other

    def unload(self) -> int:
        """Make an empty slot active (packets are no longer classified)."""
        return self.swap(L.empty_slot(self.limits))

    def clear_stats(self) -> None:
        zero = (C.c_uint64 * self._ncpu)()
        for k in range(2 * (self.limits.outputs + 1)):
            _bpf_elem(MAP_UPDATE, self.stats_fd, k, zero)
        for k in range(2 * len(L.ACT_COUNTERS)):
            _bpf_elem(MAP_UPDATE, self.act_fd, k, zero)

    def action_counts(self, slot: int | None = None) -> dict[str, int]:
        """What the classes' actions did (summed over CPUs): alert, would_drop (dry-run),
        dropped, allowlisted, kill_passed, mode_off; one slot or both."""
        n = len(L.ACT_COUNTERS)
        out = dict.fromkeys(L.ACT_COUNTERS, 0)
        for s in (0, 1) if slot is None else (slot,):
            for i, name in enumerate(L.ACT_COUNTERS):
                _bpf_elem(MAP_LOOKUP, self.act_fd, s * n + i, self._stats_buf)
                out[name] += sum(self._stats_buf)
        return out

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


def pin(slots: ModelSlots, pin_dir: str) -> str:
    """Pin the slots' maps under ``pin_dir/model`` for `xdpml model`; pins left by an
    agent that is gone are replaced. Returns the directory."""
    from xdpml.datapath.bpfsys import obj_pin

    d = os.path.join(pin_dir, PIN_SUBDIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    for name, fd in zip(MAP_NAMES, (slots.slots_fd, slots.ctl_fd, slots.stats_fd, slots.act_fd, slots.rl_fd)):
        path = os.path.join(d, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        obj_pin(fd, path)
    return d


def unpin(slots: ModelSlots, pin_dir: str) -> None:
    """Remove the pins under ``pin_dir/model`` if they are still these maps."""
    from xdpml.datapath.bpfsys import map_info, obj_get

    d = os.path.join(pin_dir, PIN_SUBDIR)
    mine = map_info(slots.slots_fd).id
    try:
        fd = obj_get(os.path.join(d, "model_slots"))
    except OSError:
        return
    try:
        if map_info(fd).id != mine:
            return  # another agent pinned its own since
    finally:
        os.close(fd)
    for name in MAP_NAMES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, name))
    with contextlib.suppress(OSError):
        os.rmdir(d)
