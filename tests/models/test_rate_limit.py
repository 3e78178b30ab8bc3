"""The rate-limit action of a model class (bpf/model.h model_over_rate): a per-slot,
per-class GCRA bucket behind the enforcement mode, allowlist and kill switch.

Exact counts by controlling time: one BPF_PROG_TEST_RUN with repeat=N runs the XDP
flow program N times within microseconds, so with 1 packet/s and a burst of B exactly
B of N packets conform (a further one would need a second to pass). The veth test
(tests/models/test_live.py) bounds what passes over real time."""

import ipaddress

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether, raw
from sklearn.tree import DecisionTreeClassifier

from xdpml.config import AgentSettings, EnforceSettings, parse_model_action
from xdpml.errors import ConfigError, ModelError
from xdpml.models import layout as L
from xdpml.models.compiler import compile_model

LIM = L.Limits(trees=4, depth=4, nodes=64, leaf_values=64)
XDP_DROP, XDP_PASS = 1, 2
LOW, HIGH = 1500, 2500
SRC, DST = "10.77.0.1", "10.77.0.2"


def test_parse_model_action():
    assert parse_model_action("pass") == ("pass", 0, 0)
    assert parse_model_action("drop") == ("drop", 0, 0)
    assert parse_model_action("rate-limit:100") == ("rate-limit", 100, 100)
    assert parse_model_action("rate-limit:100:7") == ("rate-limit", 100, 7)
    for bad in ("rate-limit", "rate-limit:", "rate-limit:0", "rate-limit:10:0", "rate-limit:1.5", "drop:3", "kill"):
        with pytest.raises(ConfigError):
            parse_model_action(bad)


def _model():
    xs = np.array([[p] for p in range(1000, 4000, 25)])
    est = DecisionTreeClassifier(random_state=0).fit(xs, (xs[:, 0] >= 2000).astype(int))
    return compile_model(est, ["dst_port"], limits=LIM)


def test_pack_states_rate_and_burst_and_refuses_bad_actions():
    m = _model()
    s = m.pack(LIM, actions={"0": "alert", "1": "rate-limit:4:3"})
    assert list(s["action"][:2]) == [L.ACTIONS["alert"], L.ACTIONS["rate-limit"]]
    assert (int(s["rl_ns"][1]), int(s["rl_burst_ns"][1])) == (250_000_000, 750_000_000)
    assert int(s["rl_ns"][0]) == 0
    with pytest.raises(ModelError, match="rate-limit:PPS"):
        m.pack(LIM, actions={"1": "rate-limit:fast"})


def _frame(dport):
    return raw(Ether() / IP(src=SRC, dst=DST) / UDP(sport=4000, dport=dport) / b"x")


@pytest.fixture(scope="module")
def dp():
    from xdpml.datapath.loader import Datapath

    with Datapath(AgentSettings(enforce=EnforceSettings(pin_dir="")), model_limits=LIM) as d:
        yield d


@pytest.mark.root
def test_burst_in_one_instant_passes_exactly_burst(dp):
    from xdpml.datapath.loader import XDP_PROG
    from xdpml.datapath.testrun import test_run
    from xdpml.models.kernel import ModelSlots

    slots = ModelSlots.of(dp.bpf, LIM)
    table = dp.rule_table()
    fd = dp.progs[XDP_PROG].fd
    m = _model()
    packed = m.pack(LIM, actions={"1": "rate-limit:1:5"})

    def burst(n, dport=HIGH):
        slots.clear_stats()
        rc, _ = test_run(fd, _frame(dport), repeat=n)
        return rc, slots.action_counts(), slots.class_counts()

    try:
        table.set_allowlist([])
        table.set_kill(False)
        table.set_mode("enforce")
        slots.swap(packed)  # fresh buckets
        rc, ac, cc = burst(12)
        assert rc == XDP_DROP and (ac["rate_passed"], ac["dropped"], ac["would_drop"]) == (5, 7, 0), ac
        assert cc[1] == 12 and cc[0] == 0
        rc, ac, _ = burst(1)  # the bucket is empty: the next packet within the second is dropped
        assert rc == XDP_DROP and (ac["rate_passed"], ac["dropped"]) == (0, 1), ac
        rc, ac, cc = burst(20, LOW)  # the other class passes, no bucket
        assert rc == XDP_PASS and cc[0] == 20 and sum(ac.values()) == 0, ac

        slots.swap(packed)  # a load starts its slot's buckets full again
        rc, ac, _ = burst(5)
        assert rc == XDP_PASS and (ac["rate_passed"], ac["dropped"]) == (5, 0), ac

        table.set_mode("dry-run")  # the bucket decides, nothing is dropped
        slots.swap(packed)
        rc, ac, _ = burst(12)
        assert rc == XDP_PASS and (ac["rate_passed"], ac["would_drop"], ac["dropped"]) == (5, 7, 0), ac

        table.set_mode("enforce")
        table.set_kill(True)
        rc, ac, _ = burst(12)
        assert rc == XDP_PASS and (ac["kill_passed"], ac["rate_passed"], ac["dropped"]) == (12, 0, 0), ac
        table.set_kill(False)
        table.set_allowlist([ipaddress.ip_network(f"{SRC}/32")])
        rc, ac, _ = burst(12)
        assert rc == XDP_PASS and (ac["allowlisted"], ac["rate_passed"], ac["dropped"]) == (12, 0, 0), ac
        table.set_allowlist([])
        table.set_mode("off")
        rc, ac, _ = burst(12)
        assert rc == XDP_PASS and (ac["mode_off"], ac["dropped"]) == (12, 0), ac
    finally:
        table.set_allowlist([])
        table.set_kill(False)
        table.set_mode("dry-run")
        slots.unload()
