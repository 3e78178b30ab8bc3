"""bpf/model.h's MF_* ids and xdpml/models/features.py are one table; names are columns."""

import re
from pathlib import Path

from xdpml.agent.features import PACKET_SPECS

from xdpml.models.features import FEATURES

MODEL_H = Path(__file__).resolve().parents[2] / "bpf" / "model.h"


def test_kernel_ids_follow_the_python_table():
    ids = {
        m.group(1).lower(): int(m.group(2))
        for m in re.finditer(r"^#define MF_([A-Z0-9_]+) (\d+)$", MODEL_H.read_text(), re.M)
    }
    assert ids == {f.name: f.id for f in FEATURES}
    # every id has its case in model_feature()
    cases = re.findall(r"case MF_([A-Z0-9_]+):", MODEL_H.read_text())
    assert sorted(c.lower() for c in cases) == sorted(f.name for f in FEATURES)


def test_names_are_exported_packet_columns():
    model_only = {f.name for f in FEATURES} - set(PACKET_SPECS)
    assert model_only == {"ip_ecn"}  # the one documented addition (tos & 3)
