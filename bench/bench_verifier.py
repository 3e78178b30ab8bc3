"""Verifier budget: instructions the kernel's verifier processed for each program.

    python -m bench.bench_verifier                        # every feature, then the defaults
    python -m bench.bench_verifier --window|--no-window   # one build: rules, window records on/off
    python -m bench.bench_verifier --model [--no-window]  # ... and the model slots

Run as root. Compiles the datapath through the loader, as the agent does, and reads
`verified_insns` from each loaded program (bpf_prog_info); the kernel refuses a program
past 1,000,000, and the budget is shared by every feature compiled in.

Without options: "every feature" is tunnels on, window records, a 1-in-100 sample stream,
rules and a model table walk with tests/models/test_kernel.py's limits (-DXDPML_MODEL=1);
then the defaults. With --model, --window or --no-window: one build with the rules,
window records (10 packets) unless --no-window, and with --model the model slots at
their default limits (xdpml.models.layout.DEFAULT_LIMITS).
"""

from __future__ import annotations

import argparse
import ctypes as C

BPF_OBJ_GET_INFO_BY_FD = 15
VERIFIED_INSNS_OFFSET = 216  # struct bpf_prog_info.verified_insns (Linux >= 5.16)


class _InfoAttr(C.Structure):
    _fields_ = [("fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]


def verified_insns(fd: int) -> int:
    from xdpml.datapath import syscalls

    buf = (C.c_uint8 * 512)()
    rc = syscalls.bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd=fd, info_len=512, info=C.addressof(buf)))
    if rc < 0:
        raise OSError(-rc, "BPF_OBJ_GET_INFO_BY_FD")
    return int.from_bytes(bytes(buf[VERIFIED_INSNS_OFFSET : VERIFIED_INSNS_OFFSET + 4]), "little")


def measure(*, every_feature: bool = False, model: bool = False, window: bool | None = None) -> dict[str, int]:
    """Program name -> verified instructions of one build. every_feature: the build the
    budget test checks (see the module text); otherwise the defaults, with window records
    (10 packets) when window is true and the model slots at default limits when model is."""
    from xdpml.config import AgentSettings
    from xdpml.datapath.loader import Datapath
    from xdpml.models import layout

    s = AgentSettings()
    s.enforce.pin_dir = ""
    limits = None
    if every_feature:
        s.window.packets = 100
        s.datapath.sample_rate = 100
        limits = layout.Limits(trees=32, depth=12, nodes=4096, leaf_values=8192)
    else:
        if window:
            s.window.packets = 10
        if model:
            limits = layout.DEFAULT_LIMITS
    with Datapath(s, model_limits=limits) as d:
        return {name: verified_insns(prog.fd) for name, prog in d.progs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="store_true", help="one build with the model slots (-DXDPML_MODEL=1)")
    ap.add_argument(
        "--window", action=argparse.BooleanOptionalAction, default=None, help="one build, window features on / off"
    )
    a = ap.parse_args(argv)
    if a.model or a.window is not None:
        window = a.window is not False
        label = f"window {'on' if window else 'off'}, rules{', model (default limits)' if a.model else ''}"
        builds = [(label, {"model": a.model, "window": window})]
    else:
        builds = [
            ("every feature (tunnels, window, sample, rules, model)", {"every_feature": True}),
            ("defaults", {}),
        ]
    for label, kw in builds:
        for name, n in measure(**kw).items():
            print(f"{label:55} {name:18} {n:>9,} verified instructions ({n / 1e6:.0%} of 1M)")


if __name__ == "__main__":
    main()
