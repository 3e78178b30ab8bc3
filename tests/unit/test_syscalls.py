"""System-call numbers live in one module, per architecture; nothing else writes one."""

import re
from pathlib import Path

import pytest

from xdpml.datapath import syscalls
from xdpml.errors import EnvironmentNotReady

ROOT = Path(__file__).resolve().parents[2]


def test_bpf_numbers_per_architecture():
    # arch/x86/entry/syscalls/syscall_64.tbl: 321 bpf; include/uapi/asm-generic/unistd.h: 280 bpf
    assert syscalls.number("bpf", "x86_64") == 321
    assert syscalls.number("bpf", "aarch64") == 280


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(EnvironmentNotReady, match="riscv64"):
        syscalls.number("bpf", "riscv64")


def test_the_bpf_call_works_here():
    # BPF_PROG_GET_FD_BY_ID (13) of id 0 never exists: ENOENT (2) or, unprivileged, EPERM (1)
    import ctypes as C

    class Attr(C.Structure):
        _fields_ = [("id", C.c_uint32), ("next_id", C.c_uint32), ("open_flags", C.c_uint32)]

    assert syscalls.bpf(13, Attr(id=0)) in (-2, -1)


def test_no_other_file_writes_a_syscall_number():
    offenders = []
    pattern = re.compile(r"syscall\(\s*\d|SYS_BPF\s*=|\b(321|280)\b.*#.*bpf|\{\s*\"x86_64\"\s*:\s*\d")
    for folder in ("xdpml", "agent", "collector", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("syscalls.py", "test_syscalls.py") or "_pb2" in path.name:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
