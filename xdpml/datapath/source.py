"""Assemble the BPF C sources into the one text BCC compiles.

BCC rewrites map calls (``flows.lookup(...)``) only in its main file, never in
``#include``d headers, so our local ``#include "x.h"`` lines are expanded in
place here (each header once). System includes (``<...>``) stay for clang.
Tunables are passed as ``-D`` flags, never edited into the text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
ENTRY_FILES = ("xdp_flow.c", "tc_flow.c")


def bpf_dir() -> Path:
    """Where the C sources live: $XDPML_BPF_DIR; else xdpml/bpf inside an installed wheel
    (package data); else bpf/ at the top of a source checkout."""
    env = os.environ.get("XDPML_BPF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "bpf", here.parents[2] / "bpf"):
        if (candidate / ENTRY_FILES[0]).is_file():
            return candidate
    return here.parents[2] / "bpf"


def expand(path: Path, seen: set[Path] | None = None) -> str:
    seen = set() if seen is None else seen
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = LOCAL_INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        inc = (path.parent / m.group(1)).resolve()
        if inc in seen:
            continue
        if not inc.is_file():
            raise FileNotFoundError(f"{path}:{lineno}: include {m.group(1)!r} not found")
        seen.add(inc)
        out.append(f"/* ---- {inc.name} ---- */")
        out.append(expand(inc, seen))
    return "\n".join(out)


def program_text(directory: Path | None = None) -> str:
    d = directory or bpf_dir()
    seen: set[Path] = set()
    return "\n".join(expand(d / name, seen) for name in ENTRY_FILES)
