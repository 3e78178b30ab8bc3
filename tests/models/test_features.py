"""bpf/model.h's MF_* ids and xdpml/models/features.py are one table; names are columns."""

import re
from pathlib import Path

from xdpml.agent.features import FLOW_SPECS, PACKET_SPECS

from xdpml.models import layout as L
from xdpml.models.features import FEATURES

MODEL_H = Path(__file__).resolve().parents[2] / "bpf" / "model.h"
FLAG_COUNT = re.compile(r"(src2dst|dst2src)_(fin|syn|rst|psh|ack|urg|ece|cwr)_packets")


def test_kernel_ids_follow_the_python_table():
    ids = {
        m.group(1).lower(): int(m.group(2))
        for m in re.finditer(r"^#define MF_([A-Z0-9_]+) (\d+)$", MODEL_H.read_text(), re.M)
    }
    assert ids == {f.name: f.id for f in FEATURES}
    # every id is stored by model_packet_features() / model_flow_features(), but the flag
    # counts, stored by index from FIN of src2dst on (so their ids must be 16 in a row, FIN..CWR),
    # into an array of MODEL_PF_N values indexed by id
    cases = re.findall(r"v\[MF_([A-Z0-9_]+)\] =", MODEL_H.read_text())
    pf_n = int(re.search(r"^#define MODEL_PF_N (\d+)", MODEL_H.read_text(), re.M).group(1))
    assert max(ids.values()) < pf_n and f"pf[{pf_n}]" in MODEL_H.read_text()
    assert pf_n == L.PF_N  # the Python walk (reference.py) lays out the same array
    indexed = [f for f in FEATURES if FLAG_COUNT.fullmatch(f.name)]
    assert sorted(c.lower() for c in cases) == sorted(f.name for f in FEATURES if f not in indexed)
    assert [f.id for f in indexed] == list(range(indexed[0].id, indexed[0].id + 16))
    assert [f.name for f in indexed[:2]] == ["src2dst_fin_packets", "src2dst_syn_packets"]
    assert indexed[8].name == "dst2src_fin_packets"


def test_names_are_exported_columns():
    packet = {f.name for f in FEATURES if not f.flow}
    assert packet - set(PACKET_SPECS) == {"ip_ecn"}  # the one documented addition (tos & 3)
    flow = {f.name for f in FEATURES if f.flow}
    assert flow <= set(FLOW_SPECS), flow - set(FLOW_SPECS)
    assert all(f.scale & (f.scale - 1) == 0 for f in FEATURES)  # powers of two: exact thresholds


def test_feature_groups_are_the_kernels():
    """features.GROUPS (what the compiler marks as not read, model_slot.fskip) are the
    blocks model_packet_features() skips: the same bits, the same features in each."""
    from xdpml.models.features import GROUPS

    text = MODEL_H.read_text()
    bits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define MODEL_FG_([A-Z]+) (\d+)", text, re.M)}
    blocks = {}
    for m in re.finditer(r"if \(!\(skip & MODEL_FG_([A-Z]+)\)\)(?: \{(.*?)\n    \}|\n(.*?;))", text, re.S):
        body = m.group(2) or m.group(3)
        blocks[bits[m.group(1)]] = sorted(n.lower() for n in re.findall(r"v\[MF_([A-Z0-9_]+)\] =", body))
    assert blocks == {bit: sorted(names) for bit, names in GROUPS.items()}
    assert sorted(bits.values()) == [1 << i for i in range(len(bits))]
