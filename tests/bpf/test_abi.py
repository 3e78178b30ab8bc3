"""The ctypes mirror (xdpml/datapath/abi.py) has the C layout of bpf/abi.h.

The host C compiler compiles bpf/abi.h and prints sizeof/offsetof for every
field; the numbers come from the compiler, not from the code under test."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from xdpml.datapath import abi

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


def c_layout(tmp_path, first_n: int, structs: dict[str, list[str]]) -> dict[str, int]:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        "#include <linux/bpf.h>",
        f"#define XDPML_FIRST_N {first_n}",
        '#include "abi.h"',
        "int main(void) {",
    ]
    for st, fields in structs.items():
        lines.append(f'printf("{st} %zu\\n", sizeof(struct {st}));')
        for f in fields:
            lines.append(f'printf("{st}.{f} %zu\\n", offsetof(struct {st}, {f}));')
    lines += ["return 0; }"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-I", str(BPF_DIR), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def py_layout(name: str, struct) -> dict[str, int]:
    out = {name: ctypes.sizeof(struct)}
    for f, _ in struct._fields_:
        out[f"{name}.{f}"] = getattr(struct, f).offset
    return out


@pytest.mark.parametrize("first_n", [0, 1, 10, 32])
def test_ctypes_mirror_matches_c(tmp_path, first_n):
    assert shutil.which("cc"), "a C compiler is needed (scripts/install.sh --test installs gcc)"
    ftypes = abi.flow_types(first_n)
    mirrors = {
        "flow_key": abi.FlowKey,
        "dir_stats": abi.DirStats,
        "iat_stats": abi.IatStats,
        "seq_entry": abi.SeqEntry,
        "flow_value": ftypes.value,
        "win_event": abi.WinEvent,
        "pkt_event": abi.PktEvent,
        "enf_config": abi.EnfConfig,
        "enf_exact_key": abi.EnfExactKey,
        "enf_exact_val": abi.EnfExactVal,
        "enf_lpm4_key": abi.EnfLpm4Key,
        "enf_lpm6_key": abi.EnfLpm6Key,
        "enf_rule": abi.EnfRule,
    }
    structs = {
        name: [f for f, _ in st._fields_ if not (name in ("flow_value", "enf_rule") and f == "lock")]
        for name, st in mirrors.items()
    }
    got_c = c_layout(tmp_path, first_n, structs)
    want = {}
    for name, st in mirrors.items():
        want.update(py_layout(name, st))
    want.pop("flow_value.lock")
    want.pop("enf_rule.lock")
    assert got_c == want
    assert ftypes.value_dtype.itemsize == got_c["flow_value"]
    assert ftypes.key_dtype.itemsize == got_c["flow_key"]


def test_counter_names_match_enum():
    text = (BPF_DIR / "abi.h").read_text()
    enum = text[text.index("enum xdpml_counter") : text.index("C_COUNTERS_MAX")]
    names = [
        line.split("=")[0].split(",")[0].strip()[2:].lower()
        for line in enum.splitlines()[1:]
        if line.strip().startswith("C_")
    ]
    assert tuple(names) == abi.COUNTERS


def test_seen_bits_match_defines():
    text = (BPF_DIR / "abi.h").read_text()
    defines = {
        line.split()[1]: int(line.split()[2]) for line in text.splitlines() if line.startswith("#define XDPML_SEEN_")
    }
    assert defines == {"XDPML_SEEN_INGRESS": abi.SEEN_INGRESS, "XDPML_SEEN_EGRESS": abi.SEEN_EGRESS}


def test_tunnel_type_names_match_enum():
    text = (BPF_DIR / "abi.h").read_text()
    enum = text[text.index("enum xdpml_tunnel {") : text.index("XDPML_TUNNEL_ESP,")]
    names = [
        line.split("=")[0].split(",")[0].strip()[len("XDPML_TUNNEL_") :].lower()
        for line in enum.splitlines()[1:]
        if line.strip().startswith("XDPML_TUNNEL_")
    ]
    assert tuple([*names, "esp"]) == abi.TUNNEL_TYPES
