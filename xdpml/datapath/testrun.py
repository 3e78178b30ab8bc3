"""BPF_PROG_TEST_RUN: run a loaded program on a packet in the kernel, no NIC.

Used by the parser tests (tests/bpf) and the per-packet cost benchmark (bench/).
"""

from __future__ import annotations

import ctypes as C
import os

from xdpml.datapath import syscalls

BPF_PROG_TEST_RUN = 10


class _TestRunAttr(C.Structure):
    _fields_ = [
        ("prog_fd", C.c_uint32),
        ("retval", C.c_uint32),
        ("data_size_in", C.c_uint32),
        ("data_size_out", C.c_uint32),
        ("data_in", C.c_uint64),
        ("data_out", C.c_uint64),
        ("repeat", C.c_uint32),
        ("duration", C.c_uint32),
        ("ctx_size_in", C.c_uint32),
        ("ctx_size_out", C.c_uint32),
        ("ctx_in", C.c_uint64),
        ("ctx_out", C.c_uint64),
        ("flags", C.c_uint32),
        ("cpu", C.c_uint32),
        ("batch_size", C.c_uint32),
        ("_pad", C.c_uint32),
    ]


def test_run(prog_fd: int, packet: bytes, *, repeat: int = 1) -> tuple[int, int]:
    """Run the program `repeat` times on `packet`; returns (return value, mean ns per run)."""
    buf = C.create_string_buffer(bytes(packet), len(packet))
    out = C.create_string_buffer(len(packet) + 256)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_in=C.addressof(buf),
        data_size_out=len(out),
        data_out=C.addressof(out),
        repeat=repeat,
    )
    rc = syscalls.bpf(BPF_PROG_TEST_RUN, attr)
    if rc < 0:
        raise OSError(-rc, f"BPF_PROG_TEST_RUN: {os.strerror(-rc)}")
    return attr.retval, attr.duration
