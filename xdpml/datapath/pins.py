"""The pinned rule maps: where they live, and opening them without BCC.

The datapath creates and pins the maps (BPF_TABLE_PINNED in bpf/rules.h) the first
time; later agents and the CLI reuse them, so rules outlive an agent restart until
they expire. Maps pinned by another xdpml version or with other sizes are refused
with what to do, never silently reused.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from xdpml.datapath import abi
from xdpml.datapath.bpfsys import Map, map_info, obj_get
from xdpml.errors import AttachError, EnvironmentNotReady

BPFFS_MAGIC = 0xCAFE4A11

# name -> (key type, value type, sizing: "rules" | "exact" | "allow" | 1)
MAPS = {
    "enf_config": (C.c_uint32, abi.EnfConfig, 1),
    "enf_kill": (C.c_uint32, C.c_uint32, 1),
    "enf_rules": (C.c_uint32, abi.EnfRule, "rules"),
    "enf_exact": (abi.EnfExactKey, abi.EnfExactVal, "exact"),
    "enf_src4": (abi.EnfLpm4Key, C.c_uint32, "rules"),
    "enf_dst4": (abi.EnfLpm4Key, C.c_uint32, "rules"),
    "enf_src6": (abi.EnfLpm6Key, C.c_uint32, "rules"),
    "enf_dst6": (abi.EnfLpm6Key, C.c_uint32, "rules"),
    "enf_allow4": (abi.EnfLpm4Key, C.c_uint32, "allow"),
    "enf_allow6": (abi.EnfLpm6Key, C.c_uint32, "allow"),
}


def _is_bpffs(path: str) -> bool:
    class StatFs(C.Structure):
        _fields_ = [("f_type", C.c_long), ("rest", C.c_long * 15)]

    libc = C.CDLL(None, use_errno=True)
    st = StatFs()
    if libc.statfs(path.encode(), C.byref(st)) != 0:
        return False
    return (st.f_type & 0xFFFFFFFF) == BPFFS_MAGIC


def _mount_bpffs(path: str) -> None:
    libc = C.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = C.get_errno()
        raise EnvironmentNotReady(
            f"no BPF filesystem at {path} and mounting one failed "
            f"({os.strerror(err)}); mount it (`mount -t bpf bpf {path}`) or "
            "give an empty pin directory (rules then die with the agent)"
        )


def prepare_pin_dir(pin_dir: str, *, map_rules: int, map_allow: int) -> None:
    """Make pin_dir usable: on a bpffs (mounting /sys/fs/bpf the way other BPF agents do when
    the host has not), existing pins of the right shape."""
    d = Path(pin_dir)
    if not d.is_absolute():
        raise AttachError(f"pin directory {pin_dir!r} must be an absolute path")
    parent = d.parent
    if not _is_bpffs(str(parent)) and not _is_bpffs(str(d)):
        if str(parent) == "/sys/fs/bpf":
            _mount_bpffs(str(parent))
        else:
            raise AttachError(f"{parent} is not a BPF filesystem: mount one (`mount -t bpf bpf {parent}`)")
    try:
        d.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise EnvironmentNotReady(f"cannot create the pin directory {pin_dir}: {exc.strerror}") from None
    check_pins(pin_dir, map_rules=map_rules, map_allow=map_allow)


def expected_shape(name: str, *, map_rules: int, map_allow: int) -> tuple[int, int, int]:
    key, value, size = MAPS[name]
    entries = {1: 1, "rules": map_rules, "exact": 2 * map_rules, "allow": map_allow}[size]
    return C.sizeof(key), C.sizeof(value), entries


def check_pins(pin_dir: str, *, map_rules: int, map_allow: int) -> None:
    for name in MAPS:
        path = os.path.join(pin_dir, name)
        try:
            fd = obj_get(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise AttachError(f"cannot open pinned map {path}: {exc.strerror}") from exc
        try:
            info = map_info(fd)
        finally:
            os.close(fd)
        want = expected_shape(name, map_rules=map_rules, map_allow=map_allow)
        got = (info.key_size, info.value_size, info.max_entries)
        if got != want:
            raise AttachError(
                f"pinned map {path} has key/value/entries {got}, this agent needs {want} (another xdpml "
                f"version or enforce map sizes); `xdpml rules unpin --pin-dir {pin_dir}` removes the "
                "old rules, or keep the old sizes"
            )


@dataclass
class RuleMaps:
    maps: dict[str, Map]
    map_rules: int

    def __getitem__(self, name: str) -> Map:
        return self.maps[name]

    def close(self) -> None:
        for m in self.maps.values():
            m.close()


def open_pinned(pin_dir: str) -> RuleMaps:
    """The rule maps pinned in pin_dir; a clear error when no agent has pinned them."""
    maps: dict[str, Map] = {}
    try:
        for name, (key, value, _) in MAPS.items():
            path = os.path.join(pin_dir, name)
            try:
                fd = obj_get(path)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise EnvironmentNotReady(
                        f"no xdpml rule maps pinned at {pin_dir} (missing {name}): start an agent first "
                        "(it pins them), or give the agent's --pin-dir"
                    ) from None
                raise EnvironmentNotReady(f"cannot open {path}: {exc.strerror} (run as root)") from None
            maps[name] = Map(fd, key, value, owned=True, name=name)
    except BaseException:
        for m in maps.values():
            m.close()
        raise
    return RuleMaps(maps, map_info(maps["enf_rules"].fd).max_entries)


def from_bcc(bpf, map_rules: int) -> RuleMaps:
    """The same maps through a loaded BCC module (unpinned datapath)."""
    maps = {name: Map(bpf[name.encode()].map_fd, key, value, name=name) for name, (key, value, _) in MAPS.items()}
    return RuleMaps(maps, map_rules)


# pinned beside the rule maps by a datapath with the model slots (bpf/model.h): the newest
# pushed model version, so that a restarted agent refuses older ones (agent/model.py)
OTHER_PINS = ("model_push",)


def unpin(pin_dir: str) -> list[str]:
    """Remove the pins (maps die with their last user). Returns what was removed."""
    done = []
    for name in (*MAPS, *OTHER_PINS):
        path = os.path.join(pin_dir, name)
        try:
            os.unlink(path)
            done.append(path)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(pin_dir)
    except OSError:
        pass
    return done
