"""bpf/rules.h through BPF_PROG_TEST_RUN on the real compiled XDP and TC programs.

Each test builds its packets with scapy, runs them a counted number of times, and
compares the program's return codes, the per-CPU counters and the rule's hit
counters with those counts."""

import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from xdpml.datapath.loader import TC_INGRESS_PROG, XDP_PROG
from xdpml.datapath.rules import Rule
from xdpml.datapath.testrun import test_run as prog_test_run

pytestmark = pytest.mark.root
XDP_PASS, XDP_DROP = 2, 1
TC_UNSPEC, TC_SHOT = 0xFFFFFFFF, 2
ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def tcp(src="10.9.0.1", dst="10.9.0.2", sport=1000, dport=80, payload=b""):
    return bytes(Ether(**ETH) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="A") / payload)


def udp6(src="fd00:9::1", dst="fd00:9::2", sport=1000, dport=53):
    return bytes(Ether(**ETH) / IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport))


@pytest.fixture()
def run(enf_dp):
    def go(pkt: bytes, times: int = 1, prog: str = XDP_PROG) -> tuple[list[int], dict]:
        before = enf_dp.counters()
        rcs = [prog_test_run(enf_dp.progs[prog].fd, pkt)[0] for _ in range(times)]
        after = enf_dp.counters()
        return rcs, {k: after[k] - before[k] for k in after if k.startswith("enf_") and after[k] != before[k]}

    return go


def exact(action="drop", ttl=60.0, **kw):
    base = dict(
        kind="exact", action=action, ttl_s=ttl, src="10.9.0.1", dst="10.9.0.2", src_port=1000, dst_port=80, proto=6
    )
    base.update(kw)
    return Rule(**base)


def only_rule(table):
    (row,) = table.rows()
    return row


def test_no_rules_nothing_counted(table, run):
    rcs, delta = run(tcp(), 5)
    assert rcs == [XDP_PASS] * 5 and delta == {}


def test_dry_run_is_the_default_and_counts_would_drop(table, run):
    assert table.mode() == "dry-run"
    table.add(exact())
    rcs, delta = run(tcp(), 7)
    assert rcs == [XDP_PASS] * 7
    assert delta == {"enf_decided": 1, "enf_would_drop": 7, "enf_would_drop_bytes": 7 * len(tcp())}
    row = only_rule(table)
    assert (row.hits, row.dropped, row.bytes) == (7, 7, 7 * len(tcp()))
    assert 0 < row.first_hit_ns <= row.last_hit_ns


@pytest.mark.parametrize("prog,dropped", [(XDP_PROG, XDP_DROP), (TC_INGRESS_PROG, TC_SHOT)])
def test_enforce_drops_both_directions(table, run, prog, dropped):
    table.add(exact())
    table.set_mode("enforce")
    rcs, delta = run(tcp(), 4, prog)
    assert rcs == [dropped] * 4
    rcs, _ = run(tcp(src="10.9.0.2", dst="10.9.0.1", sport=80, dport=1000), 3, prog)  # the reply
    assert rcs == [dropped] * 3
    rcs, _ = run(tcp(sport=1001), 2, prog)  # another flow
    pass_rc = XDP_PASS if prog == XDP_PROG else TC_UNSPEC
    assert rcs == [pass_rc] * 2
    assert (only_rule(table).hits, only_rule(table).dropped) == (7, 7)


def test_one_way_rule_leaves_the_reverse(table, run):
    table.add(exact(both_ways=False))
    table.set_mode("enforce")
    assert run(tcp(), 2)[0] == [XDP_DROP] * 2
    assert run(tcp(src="10.9.0.2", dst="10.9.0.1", sport=80, dport=1000), 2)[0] == [XDP_PASS] * 2


def test_prefix_rules_with_protocol_and_port(table, run):
    table.add(Rule(kind="src", action="drop", ttl_s=60, src="10.9.0.0/24", proto=6, dst_port=22))
    table.add(Rule(kind="dst", action="drop", ttl_s=60, dst="fd00:9::/64"))
    table.set_mode("enforce")
    assert run(tcp(dport=22), 3)[0] == [XDP_DROP] * 3
    assert run(tcp(dport=23), 1)[0] == [XDP_PASS]  # other port
    assert run(tcp(src="10.9.1.1", dport=22), 1)[0] == [XDP_PASS]  # outside the prefix
    assert run(udp6(), 2)[0] == [XDP_DROP] * 2
    assert run(udp6(dst="fd00:8::2"), 1)[0] == [XDP_PASS]
    hits = {r.src if r.kind == "src" else r.dst: r.hits for r in table.rows()}
    assert hits == {"10.9.0.0/24": 3, "fd00:9::/64": 2}


def test_exact_rule_wins_over_prefix(table, run):
    table.add(Rule(kind="src", action="drop", ttl_s=60, src="10.9.0.0/16"))
    table.add(exact(action="pass"))
    table.set_mode("enforce")
    rcs, delta = run(tcp(), 3)
    assert rcs == [XDP_PASS] * 3 and delta["enf_passed"] == 3
    assert run(tcp(sport=5), 1)[0] == [XDP_DROP]


def test_allowlist_beats_every_rule_and_is_counted(table, run):
    table.add(Rule(kind="src", action="drop", ttl_s=60, src="10.9.0.0/16"))
    table.set_allowlist(["10.9.0.2/32"])
    table.set_mode("enforce")
    rcs, delta = run(tcp(), 6)  # to the allowlisted address
    assert rcs == [XDP_PASS] * 6
    assert delta == {"enf_decided": 1, "enf_allowlisted": 6}
    assert only_rule(table).hits == 0
    assert run(tcp(dst="10.9.0.3"), 1)[0] == [XDP_DROP]


def test_kill_switch_passes_the_next_packet(table, run):
    table.add(exact())
    table.set_mode("enforce")
    assert run(tcp(), 1)[0] == [XDP_DROP]
    table.set_kill(True)
    rcs, delta = run(tcp(), 5)
    assert rcs == [XDP_PASS] * 5 and delta == {"enf_kill_passed": 5}
    table.set_kill(False)
    assert run(tcp(), 1)[0] == [XDP_DROP]
    assert only_rule(table).hits == 2


def test_mode_off_looks_at_nothing(table, run):
    table.add(exact())
    table.set_mode("off")
    rcs, delta = run(tcp(), 3)
    assert rcs == [XDP_PASS] * 3 and delta == {}
    assert only_rule(table).hits == 0


def test_expired_rule_never_acts(table, run):
    table.add(exact(ttl=1.0))
    table.set_mode("enforce")
    expires = time.monotonic() + 1.0
    assert run(tcp(), 1)[0] == [XDP_DROP]
    while time.monotonic() < expires + 0.01:  # wait for the clock, not for a result
        time.sleep(0.05)
    rcs, delta = run(tcp(), 4)
    assert rcs == [XDP_PASS] * 4
    assert delta == {"enf_decided": 1, "enf_expired": 1}  # retaken once, then cached as "no rule"
    assert only_rule(table).hits == 1
    assert table.expire() and table.rows() == []


def test_decision_is_cached_per_flow_and_retaken_on_change(table, run):
    table.add(exact())
    _, delta = run(tcp(), 10)
    assert delta["enf_decided"] == 1
    table.add(exact(src_port=2000))  # any change bumps the generation
    _, delta = run(tcp(), 10)
    assert delta["enf_decided"] == 1
    slot = [r.slot for r in table.rows() if r.src_port == 1000][0]
    table.delete(slot)
    table.set_mode("enforce")
    rcs, _ = run(tcp(), 2)
    assert rcs == [XDP_PASS] * 2  # the deleted rule's cached decision is not used


@pytest.mark.parametrize("limit", ["pps", "bps"])
def test_rate_limit_passes_exactly_the_burst(table, run, limit):
    pkt = tcp(payload=bytes(346))
    assert len(pkt) == 400
    if limit == "pps":  # one packet per 1000 s: only the burst of 5 passes
        table.add(exact(action="rate-limit", pps=0.001, burst_packets=5))
    else:  # 1 byte/s with a burst of 5 frames' bytes
        table.add(exact(action="rate-limit", bps=1, burst_bytes=5 * len(pkt)))
    table.set_mode("enforce")
    burst = 5
    rcs, delta = run(pkt, 20)
    assert rcs == [XDP_PASS] * burst + [XDP_DROP] * (20 - burst)
    assert delta["enf_dropped"] == 20 - burst
    row = only_rule(table)
    assert (row.hits, row.dropped) == (20, 20 - burst)


def test_rule_marked_dry_run_never_drops(table, run):
    table.add(exact(dry_run=True))
    table.set_mode("enforce")
    rcs, delta = run(tcp(), 3)
    assert rcs == [XDP_PASS] * 3 and delta["enf_would_drop"] == 3
