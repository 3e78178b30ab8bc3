"""The rule manager against a hostile collector's verdicts, on the real kernel maps.

Every verdict a malicious or broken collector could send is refused or clamped, and
each refusal is counted under its reason; what the manager installs is checked in
the kernel maps, and allowlisted traffic is run through the real XDP program."""

import ipaddress

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from xdpml.agent.enforce.manager import Channel, RecentFlows, RuleManager, build_allowlist

from xdpml.config import EnforceSettings
from xdpml.datapath.loader import XDP_PROG
from xdpml.datapath.rules import Rule
from xdpml.datapath.testrun import test_run as prog_test_run
from xdpml.errors import ConfigError
from xdpml.wire.columns import ColumnBatch
from xdpml.wire.v1 import collector_pb2 as cpb

pytestmark = pytest.mark.root
XDP_PASS, XDP_DROP = 2, 1
NODE, GATEWAY, API, DNS, COLLECTOR = "10.9.1.1", "10.9.1.254", "10.9.2.1", "10.9.3.10", "10.9.4.5"
OPERATOR = "10.9.128.0/17"
ATTACKER, VICTIM = "10.9.5.66", "10.9.6.7"


def ip16(a: str) -> bytes:
    ip = ipaddress.ip_address(a)
    return b"\0" * 10 + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed


class FrozenClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def flows_batch(tuples):
    cols = {
        "src_ip": np.array([ip16(s) for s, *_ in tuples], dtype="S16"),
        "dst_ip": np.array([ip16(d) for _, d, *_ in tuples], dtype="S16"),
        "src_port": np.array([t[2] for t in tuples], dtype=np.uint16),
        "dst_port": np.array([t[3] for t in tuples], dtype=np.uint16),
        "protocol": np.array([t[4] for t in tuples], dtype=np.uint8),
    }
    return ColumnBatch("flow", cols)


def verdict(src, dst, sport, dport, proto=17, action=cpb.ACTION_DROP, ttl=0):
    return cpb.Verdict(
        key=cpb.FlowKey(src_ip=ip16(src), dst_ip=ip16(dst), src_port=sport, dst_port=dport, protocol=proto),
        action=action,
        ttl_seconds=ttl,
        label="anomaly",
    )


@pytest.fixture()
def make(table):
    made = []

    def go(*, authenticated=True, settings=None, namespace_of=None, exported=()):
        clock = FrozenClock()
        s = settings or EnforceSettings(pin_dir="")
        allow = build_allowlist(
            node=[NODE], gateways=[GATEWAY], api_servers=[API], dns=[DNS], collector=[COLLECTOR], operator=[OPERATOR]
        )
        recent = RecentFlows(capacity=s.recent_flows, ttl_s=s.recent_ttl_s, clock=clock)
        recent.write(flows_batch(exported))
        m = RuleManager(
            s,
            channel=Channel(authenticated=authenticated, description="test"),
            allowlist=allow,
            recent=recent,
            namespace_of=namespace_of,
            clock=clock,
        )
        m.attach(table)
        made.append(m)
        return m, clock

    yield go
    for m in made:
        m.close()


def refused(m):
    return {k: v for k, v in m.stats.refused.items() if v}


def test_hostile_verdicts_are_refused_and_counted(make, table, enf_dp):
    hostile = [
        (ATTACKER, NODE, 4444, 22),
        (GATEWAY, VICTIM, 1, 2),
        (VICTIM, API, 5000, 6443),
        (VICTIM, DNS, 5001, 53),
        (VICTIM, COLLECTOR, 5002, 50051),
        ("169.254.169.254", VICTIM, 80, 5003),
        ("10.9.200.1", VICTIM, 7, 8),
    ]
    m, _ = make(exported=[h + (17,) for h in hostile])
    for s, d, sp, dp in hostile:
        assert m.consider(verdict(s, d, sp, dp)) == 0
    assert m.consider(verdict(ATTACKER, VICTIM, 1234, 80)) == 0  # never exported
    assert m.consider(verdict(ATTACKER, VICTIM, 1234, 80, action=99)) == 0
    assert m.consider(verdict(ATTACKER, VICTIM, 1234, 80, action=cpb.ACTION_ALERT)) == 0
    bad = cpb.Verdict(key=cpb.FlowKey(src_ip=b"\x01" * 4, dst_ip=ip16(VICTIM), protocol=17), action=cpb.ACTION_DROP)
    assert m.consider(bad) == 0
    assert refused(m) == {"allowlisted": len(hostile), "unknown_flow": 1, "unknown_action": 1, "malformed": 1}
    assert m.stats.no_action == 1 and table.rows() == []

    # the allowlist is in the kernel too: a rule put there by hand cannot drop it
    table.add(Rule(kind="src", action="drop", ttl_s=60, src="10.9.0.0/16"))
    table.set_mode("enforce")
    for s, d, sp, dp in hostile:
        pkt = bytes(Ether() / IP(src=s, dst=d) / UDP(sport=sp, dport=dp))
        assert prog_test_run(enf_dp.progs[XDP_PROG].fd, pkt)[0] == XDP_PASS, (s, d)
    pkt = bytes(Ether() / IP(src=ATTACKER, dst=VICTIM) / UDP(sport=1, dport=2))
    assert prog_test_run(enf_dp.progs[XDP_PROG].fd, pkt)[0] == XDP_DROP


def test_exported_flow_becomes_a_rule_in_either_direction(make, table):
    m, _ = make(exported=[(VICTIM, ATTACKER, 80, 1234, 6)])
    slot = m.consider(verdict(ATTACKER, VICTIM, 1234, 80, proto=6, ttl=30))
    assert slot
    (row,) = table.rows()
    assert (row.slot, row.action, row.src, row.dst, row.src_port, row.dst_port, row.proto, row.both_ways) == (
        slot,
        "drop",
        ATTACKER,
        VICTIM,
        1234,
        80,
        6,
        True,
    )
    assert 0 < row.expires_in_s <= 30 and not row.dry_run
    assert m.consider(verdict(VICTIM, ATTACKER, 80, 1234, proto=6)) == 0  # the same flow again
    assert refused(m) == {"duplicate": 1}


def test_ttl_of_a_year_is_clamped(make, table):
    m, _ = make(exported=[(ATTACKER, VICTIM, 1, 2, 17)])
    assert m.consider(verdict(ATTACKER, VICTIM, 1, 2, ttl=365 * 86400))
    (row,) = table.rows()
    assert row.expires_in_s <= EnforceSettings().max_ttl_s and m.stats.ttl_clamped == 1


def test_a_flood_of_verdicts_installs_at_most_the_burst(make, table):
    n = 20_000
    flows = [(ATTACKER, VICTIM, 10000 + i % 50000, 80 + i // 50000, 17) for i in range(n)]
    s = EnforceSettings(pin_dir="", burst_installs=25, max_installs_per_s=10)
    m, clock = make(settings=s, exported=flows)
    batch = cpb.VerdictBatch(verdicts=[verdict(*f[:4]) for f in flows])
    m.on_verdicts(batch)
    assert m.stats.installed == 25 and refused(m) == {"install_rate": n - 25}
    assert table.count() == 25
    clock.t += 1.0  # one second later: 10 more tokens
    m.on_verdicts(batch)
    assert m.stats.installed == 35 and refused(m) == {"install_rate": 2 * n - 35 - 25, "duplicate": 25}


def test_max_rules(make, table):
    flows = [(ATTACKER, VICTIM, 1000 + i, 80, 17) for i in range(10)]
    m, _ = make(settings=EnforceSettings(pin_dir="", max_rules=4), exported=flows)
    for f in flows:
        m.consider(verdict(*f[:4]))
    assert m.stats.installed == 4 and refused(m) == {"max_rules": 6}


def test_kube_system_is_never_dropped_by_default(make, table):
    ns = {ip16(VICTIM): "kube-system", ip16("10.9.6.8"): "shop"}
    m, _ = make(namespace_of=ns.get, exported=[(ATTACKER, VICTIM, 1, 53, 17), (ATTACKER, "10.9.6.8", 1, 80, 17)])
    assert m.consider(verdict(ATTACKER, VICTIM, 1, 53)) == 0
    assert m.consider(verdict(ATTACKER, "10.9.6.8", 1, 80))
    assert refused(m) == {"namespace_policy": 1}


def test_unauthenticated_channel_makes_dry_run_rules_and_cannot_enforce(make, table, enf_dp):
    m, _ = make(authenticated=False, exported=[(ATTACKER, VICTIM, 1, 2, 17)])
    with pytest.raises(ConfigError, match="mutual TLS"):
        m.set_mode("enforce")
    assert m.consider(verdict(ATTACKER, VICTIM, 1, 2))
    (row,) = table.rows()
    assert row.dry_run
    table.set_mode("enforce")  # even if an operator forces the mode, this rule only counts
    pkt = bytes(Ether() / IP(src=ATTACKER, dst=VICTIM) / UDP(sport=1, dport=2))
    assert prog_test_run(enf_dp.progs[XDP_PROG].fd, pkt)[0] == XDP_PASS
    assert table.rows()[0].dropped == 1  # counted as would-drop


def test_mode_off_refuses(make, table):
    m, _ = make(exported=[(ATTACKER, VICTIM, 1, 2, 17)])
    m.set_mode("off")
    assert m.consider(verdict(ATTACKER, VICTIM, 1, 2)) == 0 and refused(m) == {"mode_off": 1}


def test_recent_flows_forget_old_and_overflowing_keys():
    clock = FrozenClock()
    r = RecentFlows(capacity=3, ttl_s=10, clock=clock)
    r.write(flows_batch([(ATTACKER, VICTIM, i, 80, 6) for i in range(5)]))
    assert len(r) == 3 and r.evicted == 2
    assert (ip16(ATTACKER), ip16(VICTIM), 0, 80, 6) not in r
    assert (ip16(VICTIM), ip16(ATTACKER), 80, 4, 6) in r  # either direction
    clock.t += 10.5
    assert (ip16(ATTACKER), ip16(VICTIM), 4, 80, 6) not in r


def test_bad_allowlist_entry_is_a_config_error():
    with pytest.raises(ConfigError, match="operator CIDR 'nonsense'"):
        build_allowlist(operator=["nonsense"])
