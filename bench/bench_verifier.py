"""Verifier budget: instructions the kernel's verifier processed for each program.

    python -m bench.bench_verifier

Run as root. Compiles the datapath through the loader, as the agent does, with every
feature compiled in (tunnels on, window records, a 1-in-100 sample stream, rules, and a
model table walk with tests/models/test_kernel.py's limits, -DXDPML_MODEL=1), then with
the defaults, and reads `verified_insns` from each loaded program (bpf_prog_info). The
kernel refuses a program past 1,000,000.
"""

from __future__ import annotations

import ctypes as C

BPF_OBJ_GET_INFO_BY_FD = 15
VERIFIED_INSNS_OFFSET = 216  # struct bpf_prog_info.verified_insns (Linux >= 5.16)


def verified_insns(fd: int) -> int:
    from xdpml.datapath import syscalls

    class InfoAttr(C.Structure):
        _fields_ = [("fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]

    buf = (C.c_uint8 * 256)()
    attr = InfoAttr(fd=fd, info_len=256, info=C.addressof(buf))
    rc = syscalls.bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    if rc < 0:
        raise OSError(-rc, "BPF_OBJ_GET_INFO_BY_FD")
    return int.from_bytes(bytes(buf[VERIFIED_INSNS_OFFSET : VERIFIED_INSNS_OFFSET + 4]), "little")


def measure(*, every_feature: bool) -> dict[str, int]:
    from xdpml.config import AgentSettings
    from xdpml.datapath.loader import Datapath

    s = AgentSettings()
    s.enforce.pin_dir = ""
    limits = None
    if every_feature:
        from xdpml.models import layout

        s.window.packets = 100
        s.datapath.sample_rate = 100
        limits = layout.Limits(trees=32, depth=12, nodes=4096, leaf_values=8192)
    with Datapath(s, model_limits=limits) as d:
        return {name: verified_insns(prog.fd) for name, prog in d.progs.items()}


def main() -> None:
    for label, every in (("every feature (tunnels, window, sample, rules, model)", True), ("defaults", False)):
        for name, n in measure(every_feature=every).items():
            print(f"{label:55} {name:18} {n:>9,} verified instructions ({n / 1e6:.0%} of 1M)")


if __name__ == "__main__":
    main()
