"""System-call numbers, per architecture, and the one place the bpf(2) call is made.

Python has no bpf() wrapper, so we call libc's syscall(2) with the number for this
machine. The numbers differ by architecture (arch/*/include/uapi/asm/unistd*.h, or the
generic table for arm64); no other module may write one.
"""

from __future__ import annotations

import ctypes as C
import os

from xdpml.errors import EnvironmentNotReady

# machine (os.uname().machine) -> system call name -> number
NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"bpf": 321},
    "aarch64": {"bpf": 280},
}

_libc = C.CDLL(None, use_errno=True)
_libc.syscall.restype = C.c_long


class ElemAttr(C.Structure):
    """union bpf_attr for the BPF_MAP_*_ELEM commands."""

    _fields_ = [
        ("map_fd", C.c_uint32),
        ("_pad", C.c_uint32),
        ("key", C.c_uint64),
        ("value", C.c_uint64),
        ("flags", C.c_uint64),
    ]


def number(name: str, machine: str | None = None) -> int:
    """The number of system call ``name`` on ``machine`` (default: this one)."""
    machine = machine or os.uname().machine
    try:
        return NUMBERS[machine][name]
    except KeyError:
        raise EnvironmentNotReady(
            f"no {name}() system call number known for architecture {machine!r} (known: {', '.join(sorted(NUMBERS))})"
        ) from None


def bpf(cmd: int, attr: C.Structure) -> int:
    """bpf(cmd, &attr, sizeof attr): the result, or minus errno on failure."""
    rc = _libc.syscall(number("bpf"), cmd, C.byref(attr), C.sizeof(attr))
    if rc < 0:
        return -C.get_errno()
    return int(rc)
