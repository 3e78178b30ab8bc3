"""Verifier-processed instructions of the datapath's programs (bpf_prog_info.verified_insns).

The budget is 1,000,000 per program and shared by every feature compiled in; this
prints the figure for the full build (window features on, rules, and with
``--model`` the model slots at their default limits). Needs root.

    python -m bench.verifier_insns [--model] [--no-window]
"""

from __future__ import annotations

import argparse
import ctypes as C

from xdpml.config import AgentSettings, EnforceSettings, WindowSettings
from xdpml.datapath import syscalls
from xdpml.datapath.loader import Datapath

BPF_OBJ_GET_INFO_BY_FD = 15
VERIFIED_INSNS_OFFSET = 216  # struct bpf_prog_info.verified_insns (Linux 5.16+)


class _InfoAttr(C.Structure):
    _fields_ = [("fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]


def verified_insns(prog_fd: int) -> int:
    buf = (C.c_uint8 * 512)()
    rc = syscalls.bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd=prog_fd, info_len=512, info=C.addressof(buf)))
    if rc < 0:
        raise OSError(-rc, "BPF_OBJ_GET_INFO_BY_FD")
    return int.from_bytes(bytes(buf[VERIFIED_INSNS_OFFSET : VERIFIED_INSNS_OFFSET + 4]), "little")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="store_true", help="compile the model slots in (-DXDPML_MODEL=1)")
    ap.add_argument("--no-window", action="store_true", help="window features off")
    a = ap.parse_args()
    limits = None
    if a.model:
        from xdpml.models.layout import DEFAULT_LIMITS as limits
    s = AgentSettings(window=WindowSettings(packets=0 if a.no_window else 10), enforce=EnforceSettings(pin_dir=""))
    with Datapath(s, model_limits=limits) as dp:
        for name, prog in dp.progs.items():
            print(f"{name:18s} {verified_insns(prog.fd):>9,d} processed instructions")


if __name__ == "__main__":
    main()
