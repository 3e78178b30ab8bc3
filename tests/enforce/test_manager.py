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


def test_a_million_verdicts_within_one_second(make, table):
    """A million verdicts inside one instant of the manager's clock (any real rate is
    slower): 50 distinct exported flows, each named 20,000 times. Exactly the burst is
    installed; every other verdict is refused, and counted under its reason."""
    flows = [(ATTACKER, VICTIM, 20000 + i, 80, 17) for i in range(50)]
    s = EnforceSettings(pin_dir="", burst_installs=25, max_installs_per_s=10)
    m, _ = make(settings=s, exported=flows)
    vs = [verdict(*f[:4]) for f in flows]
    rounds = 20_000
    for _ in range(rounds):
        for v in vs:
            m.consider(v, mode="dry-run")
    assert m.stats.installed == 25 and table.count() == 25
    # first round: 25 installed, 25 out of tokens; every later round: 25 duplicates, 25 out of tokens
    assert refused(m) == {"install_rate": 25 * rounds, "duplicate": 25 * (rounds - 1)}
    assert sum(m.stats.refused.values()) + m.stats.installed == 50 * rounds == 1_000_000


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


def test_metrics_by_scraping(table, enf_dp):
    """Rules active by action, packets and bytes dropped and would-drop, refusals by
    reason and install latency, as a Prometheus scrape shows them; the packets are run
    through the real XDP program and counted here as they are sent."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from xdpml.obs.telemetry import Telemetry, TelemetrySettings

    def scrape(port):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    tel = Telemetry.from_settings(TelemetrySettings(prometheus_port=0, prometheus_host="127.0.0.1"))
    m = None
    try:
        flows = [(ATTACKER, VICTIM, 5001, 80, 17), (ATTACKER, VICTIM, 5002, 80, 17)]
        m = RuleManager(
            EnforceSettings(),
            channel=Channel(authenticated=True),
            allowlist=build_allowlist(node=[NODE]),
            recent=RecentFlows(capacity=10, ttl_s=60),
            telemetry=tel,
        )
        m.recent.write(flows_batch(flows + [(ATTACKER, NODE, 5003, 80, 17)]))
        m.attach(table, mode="dry-run", counters=enf_dp.counters)
        before = enf_dp.counters()
        assert m.consider(verdict(ATTACKER, VICTIM, 5001, 80)) > 0
        assert m.consider(verdict(ATTACKER, VICTIM, 5002, 80, action=cpb.ACTION_RATE_LIMIT)) > 0
        assert m.consider(verdict(ATTACKER, NODE, 5003, 80)) == 0  # allowlisted
        prog = enf_dp.progs[XDP_PROG].fd

        def frame(size):
            return bytes(Ether() / IP(src=ATTACKER, dst=VICTIM) / UDP(sport=5001, dport=80) / (b"x" * size))

        sent_would = [frame(n) for n in (10, 20, 30)]  # dry-run: would drop, pass
        for f in sent_would:
            assert prog_test_run(prog, f)[0] == XDP_PASS
        table.set_mode("enforce")
        sent_drop = [frame(n) for n in (40, 50)]
        for f in sent_drop:
            assert prog_test_run(prog, f)[0] == XDP_DROP
        got = scrape(tel.prometheus_port)
        after = enf_dp.counters()

        def kernel_total(name):
            return got[(name, (("result", "dropped"),))], got[(name, (("result", "would_drop"),))]

        # the scrape equals the kernel counters read around it; their change equals what was sent
        assert kernel_total("xdpml_agent_enforce_packets_total") == (after["enf_dropped"], after["enf_would_drop"])
        assert after["enf_dropped"] - before["enf_dropped"] == len(sent_drop)
        assert after["enf_would_drop"] - before["enf_would_drop"] == len(sent_would)
        assert kernel_total("xdpml_agent_enforce_bytes_total") == (
            after["enf_dropped_bytes"],
            after["enf_would_drop_bytes"],
        )
        assert after["enf_dropped_bytes"] - before["enf_dropped_bytes"] == sum(len(f) for f in sent_drop)
        assert after["enf_would_drop_bytes"] - before["enf_would_drop_bytes"] == sum(len(f) for f in sent_would)
        assert got[("xdpml_agent_enforce_rules_active", (("action", "drop"),))] == 1
        assert got[("xdpml_agent_enforce_rules_active", (("action", "rate-limit"),))] == 1
        assert got[("xdpml_agent_enforce_rules_active", (("action", "pass"),))] == 0
        assert got[("xdpml_agent_enforce_verdicts_refused_total", (("reason", "allowlisted"),))] == 1
        assert got[("xdpml_agent_enforce_rules_installed_total", (("action", "drop"),))] == 1
        assert got[("xdpml_agent_enforce_rules_installed_total", (("action", "rate-limit"),))] == 1
        assert got[("xdpml_agent_enforce_install_latency_seconds_count", ())] == 2
    finally:
        if m is not None:
            m.close()
        tel.shutdown()
