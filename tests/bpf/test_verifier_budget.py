"""The programs with every feature compiled in stay well below the verifier's budget.

The kernel counts the instructions its verifier processed (bpf_prog_info.verified_insns)
and refuses a program past 1,000,000; bench/bench_verifier.py prints the figures."""

import pytest

from bench.bench_verifier import measure

pytestmark = pytest.mark.root
BUDGET = 800_000  # headroom under the kernel's 1,000,000 for features still to come


def test_every_feature_compiled_in_stays_under_budget():
    got = measure(every_feature=True)
    assert set(got) == {"xdpml_xdp", "xdpml_tc_ingress", "xdpml_tc_egress"}
    assert all(0 < n < BUDGET for n in got.values()), got
