"""dir_stats.seen_at: each direction of a flow records which side of the interface its
packets were seen at (XDP and TC ingress: received; TC egress: sent), through
BPF_PROG_TEST_RUN on the real compiled programs. User space builds the seen_on column
from it (docs/features.md)."""

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from xdpml.config import AgentSettings
from xdpml.datapath.abi import SEEN_EGRESS, SEEN_INGRESS
from xdpml.datapath.loader import TC_EGRESS_PROG, TC_INGRESS_PROG, XDP_PROG, Datapath
from xdpml.datapath.maps import FlowMap
from xdpml.datapath.testrun import test_run as prog_test_run

pytestmark = pytest.mark.root
ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
FWD = Ether(**ETH) / IP(src="10.9.0.1", dst="10.9.0.2") / UDP(sport=1111, dport=2222) / (b"x" * 10)
REV = Ether(**ETH) / IP(src="10.9.0.2", dst="10.9.0.1") / UDP(sport=2222, dport=1111) / (b"y" * 10)


@pytest.fixture(scope="module")
def dp():
    with Datapath(AgentSettings()) as d:
        yield d


@pytest.fixture()
def table(dp):
    t = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    t.drain()
    return t


def run(dp, prog: str, pkt) -> None:
    prog_test_run(dp.progs[prog].fd, bytes(pkt))


@pytest.mark.parametrize(
    "prog,bit",
    [(XDP_PROG, SEEN_INGRESS), (TC_INGRESS_PROG, SEEN_INGRESS), (TC_EGRESS_PROG, SEEN_EGRESS)],
)
def test_one_hook_sets_its_bit_on_the_direction_it_saw(dp, table, prog, bit):
    run(dp, prog, FWD)
    run(dp, prog, FWD)
    ((_, v),) = zip(*table.drain())
    assert [int(v["dir"][0]["seen_at"]), int(v["dir"][1]["seen_at"])] == [bit, 0]
    assert int(v["dir"][0]["packets"]) == 2


def test_request_in_reply_out_keeps_the_sides_apart(dp, table):
    # what a host-side veth sees of a pod's request (received) and its answer (sent)
    run(dp, TC_INGRESS_PROG, FWD)
    run(dp, TC_EGRESS_PROG, REV)
    run(dp, TC_INGRESS_PROG, FWD)
    ((_, v),) = zip(*table.drain())
    assert [int(v["dir"][0]["seen_at"]), int(v["dir"][1]["seen_at"])] == [SEEN_INGRESS, SEEN_EGRESS]
    assert [int(v["dir"][0]["packets"]), int(v["dir"][1]["packets"])] == [2, 1]


def test_both_sides_in_one_direction(dp, table):
    # a packet routed back out of the interface it came in on (hairpin)
    run(dp, TC_INGRESS_PROG, FWD)
    run(dp, TC_EGRESS_PROG, FWD)
    ((_, v),) = zip(*table.drain())
    assert [int(v["dir"][0]["seen_at"]), int(v["dir"][1]["seen_at"])] == [SEEN_INGRESS | SEEN_EGRESS, 0]
