"""The few bpf(2) commands the rule tables need, on map fds or pinned paths.

The CLI (`xdpml rules ...`) works on the pinned maps of a running (or dead) agent
without compiling anything, so this goes through the syscall, not BCC.
"""

from __future__ import annotations

import ctypes as C
import errno
import os

from xdpml.datapath import syscalls

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ANY = 0
BPF_F_LOCK = 4
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_LPM_TRIE = 1, 2, 11


_ElemAttr = syscalls.ElemAttr


class _ObjAttr(C.Structure):
    _fields_ = [("pathname", C.c_uint64), ("bpf_fd", C.c_uint32), ("file_flags", C.c_uint32)]


class _InfoAttr(C.Structure):
    _fields_ = [("bpf_fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]


class MapInfo(C.Structure):
    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("key_size", C.c_uint32),
        ("value_size", C.c_uint32),
        ("max_entries", C.c_uint32),
        ("map_flags", C.c_uint32),
        ("name", C.c_char * 16),
    ]


_bpf = syscalls.bpf


def obj_pin(fd: int, path: str) -> None:
    """Pin the object behind fd at path (a bpffs file); raises OSError (EEXIST when taken)."""
    raw = C.create_string_buffer(path.encode())
    rc = _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=C.addressof(raw), bpf_fd=fd))
    if rc < 0:
        raise OSError(-rc, f"{path}: {os.strerror(-rc)}")


def obj_get(path: str) -> int:
    """fd of the object pinned at path; raises OSError (ENOENT when nothing is pinned)."""
    raw = C.create_string_buffer(path.encode())
    rc = _bpf(BPF_OBJ_GET, _ObjAttr(pathname=C.addressof(raw)))
    if rc < 0:
        raise OSError(-rc, f"{path}: {os.strerror(-rc)}")
    return rc


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    rc = _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=C.sizeof(info), info=C.addressof(info)))
    if rc < 0:
        raise OSError(-rc, f"map info: {os.strerror(-rc)}")
    return info


class Map:
    """One BPF map: typed lookups and updates with ctypes keys and values."""

    def __init__(self, fd: int, key_type, value_type, *, owned: bool = False, name: str = ""):
        self.fd, self.key_type, self.value_type, self.owned, self.name = fd, key_type, value_type, owned, name

    def lookup(self, key):
        value = self.value_type()
        rc = _bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=self.fd, key=C.addressof(key), value=C.addressof(value)))
        if rc == -errno.ENOENT:
            return None
        if rc < 0:
            raise OSError(-rc, f"lookup in {self.name}: {os.strerror(-rc)}")
        return value

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        rc = _bpf(
            BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=self.fd, key=C.addressof(key), value=C.addressof(value), flags=flags)
        )
        if rc < 0:
            raise OSError(-rc, f"update of {self.name}: {os.strerror(-rc)}")

    def delete(self, key) -> bool:
        rc = _bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=self.fd, key=C.addressof(key)))
        if rc == -errno.ENOENT:
            return False
        if rc < 0:
            raise OSError(-rc, f"delete from {self.name}: {os.strerror(-rc)}")
        return True

    def keys(self) -> list:
        out: list = []
        nxt = self.key_type()
        attr = _ElemAttr(map_fd=self.fd, key=0, value=C.addressof(nxt))
        while True:
            rc = _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            if rc == -errno.ENOENT:
                return out
            if rc < 0:
                raise OSError(-rc, f"iterating {self.name}: {os.strerror(-rc)}")
            cur = self.key_type.from_buffer_copy(nxt)
            out.append(cur)
            attr.key = C.addressof(cur)

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
