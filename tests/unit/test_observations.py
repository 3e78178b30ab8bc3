"""Observation points: records of one conversation on several interfaces, merged at
harvest (xdpml.agent.observations), on hand-built kernel records and a fake table."""

import numpy as np
from xdpml.agent.features import EXPIRATION
from xdpml.agent.harvest import Harvester
from xdpml.agent.observations import due_with_siblings, merge

from xdpml.config import HarvestSettings
from xdpml.datapath.abi import SEEN_EGRESS, SEEN_INGRESS, TUNNEL_TYPES, flow_types
from xdpml.wire.columns import ip_from_str

T = flow_types(2)
IN, OUT = SEEN_INGRESS, SEEN_EGRESS
S = 1_000_000_000


def records(rows):
    """rows: (ifindex, src, dst, fwd packets, rev packets, fwd seen_at, rev seen_at,
    first_ns, last_ns); src is the initiator. UDP; pod A's port is 1000, every other 80."""
    k = np.zeros(len(rows), T.key_dtype)
    v = np.zeros(len(rows), T.value_dtype)
    for i, (ifx, src, dst, fp, rp, fs, rs, first, last) in enumerate(rows):
        a = (ip_from_str(src), 1000 if src == A else 80)
        b = (ip_from_str(dst), 1000 if dst == A else 80)
        lo, hi = sorted([a, b])
        k[i]["lo_ip"] = np.frombuffer(lo[0], np.uint8)
        k[i]["hi_ip"] = np.frombuffer(hi[0], np.uint8)
        k[i]["lo_port"], k[i]["hi_port"] = lo[1], hi[1]
        k[i]["proto"], k[i]["ip_version"], k[i]["ifindex"] = 17, 4, ifx
        v[i]["init_lo_to_hi"] = 1 if lo == a else 0
        v[i]["first_ns"], v[i]["last_ns"] = first, last
        for d, (p, seen) in enumerate(((fp, fs), (rp, rs))):
            v[i]["dir"][d]["packets"] = p
            v[i]["dir"][d]["bytes"] = 100 * p + ifx  # tells the records apart
            v[i]["dir"][d]["seen_at"] = seen if p else 0
            v[i]["dir"][d]["first_ns"] = first if p else 0
            v[i]["dir"][d]["last_ns"] = last if p else 0
    return k, v


def unpack(m):
    return m.reported, m.seen_on, m.points


NAMES = {2: "eth0", 5: "vxlan0", 7: "veth-a", 9: "veth-b"}
KINDS = {2: "physical", 5: "virtual", 7: "veth", 9: "veth"}
A, B = "10.1.0.5", "10.2.0.7"


def test_pod_to_pod_through_the_host_is_one_row_reported_on_the_initiators_veth():
    # pod A's request enters the host on veth-a and leaves on veth-b; the answer the reverse
    k, v = records(
        [
            (9, A, B, 3, 3, OUT, IN, 11, 40),
            (7, A, B, 3, 3, IN, OUT, 10, 41),
        ]
    )
    pick, seen, points = unpack(merge(k, v, ifnames=NAMES, kinds=KINDS))
    assert list(pick) == [1]  # veth-a: both veths, and A's packets were received there
    assert list(seen) == ["veth-a:ingress veth-b:egress"]  # path order: first packet at veth-a
    assert list(points) == [2]


def test_preference_pod_veth_then_overlay_then_physical():
    k, v = records(
        [
            (2, A, B, 4, 4, OUT, IN, 12, 40),
            (5, A, B, 4, 4, OUT, IN, 11, 40),
            (9, A, B, 4, 4, OUT, IN, 13, 40),  # the server pod's veth, on the far end of the path
        ]
    )
    pick, seen, _ = unpack(merge(k, v, ifnames=NAMES, kinds=KINDS))
    assert list(pick) == [2]
    assert list(seen) == ["vxlan0:egress eth0:egress veth-b:egress"]
    # without the veth, the overlay device wins over the physical NIC
    pick, _, _ = unpack(merge(k[:2], v[:2], ifnames=NAMES, kinds=KINDS))
    assert list(pick) == [1]
    # an encapsulated observation comes after every plain one, whatever the interface
    v["tunnel_type"][2] = TUNNEL_TYPES.index("vxlan")
    m = merge(k, v, ifnames=NAMES, kinds=KINDS)
    assert list(m.reported) == [1] and list(m.tunnel) == [2]  # the row names the tunnel it crossed
    # an encrypted tunnel is an outer flow, not a decapsulated copy: no reason to rank it last
    v["tunnel_type"][2] = TUNNEL_TYPES.index("wireguard")
    assert list(merge(k, v, ifnames=NAMES, kinds=KINDS).reported) == [2]


def test_direction_is_the_reported_initiators_even_where_the_other_side_spoke_first():
    # on veth-b the record began with B's packet (say the agent attached late there)
    k, v = records(
        [
            (7, A, B, 2, 2, IN, OUT, 10, 40),
            (9, B, A, 2, 2, IN, OUT, 15, 40),
        ]
    )
    _, seen, _ = unpack(merge(k, v, ifnames=NAMES, kinds=KINDS))
    # A's packets left through veth-b (they are veth-b's dst2src, seen at egress)
    assert list(seen) == ["veth-a:ingress veth-b:egress"]


def test_an_interface_that_saw_only_the_answers_is_named_by_them():
    k, v = records(
        [
            (7, A, B, 2, 1, IN, OUT, 10, 40),
            (2, B, A, 1, 0, IN, 0, 20, 40),  # only B's answer, received on eth0
        ]
    )
    # eth0's record has B as its initiator; relative to A, B's packets came in: A's went out
    _, seen, points = unpack(merge(k, v, ifnames=NAMES, kinds=KINDS))
    assert list(seen) == ["veth-a:ingress eth0:egress"] and list(points) == [2]


def test_distinct_conversations_and_vlans_stay_apart():
    k, v = records(
        [
            (7, A, B, 1, 1, IN, OUT, 10, 20),
            (9, A, B, 1, 1, OUT, IN, 11, 20),
            (7, A, "10.2.0.8", 1, 0, IN, 0, 12, 20),
            (9, A, B, 1, 1, OUT, IN, 11, 20),
        ]
    )
    k[3]["vlan_id"] = 100
    pick, seen, points = unpack(merge(k, v, ifnames=NAMES, kinds=KINDS))
    assert sorted(pick) == [0, 2, 3]
    assert list(points) == [2, 1, 1]
    assert list(seen) == ["veth-a:ingress veth-b:egress", "veth-a:ingress", "veth-b:egress"]


def test_a_conversation_expires_whole_with_the_strongest_reason():
    k, v = records(
        [
            (7, A, B, 1, 1, IN, OUT, 10, 20),
            (9, A, B, 1, 1, OUT, IN, 11, 20),
            (2, A, B, 1, 1, OUT, IN, 12, 20),
            (7, A, "10.2.0.9", 1, 1, IN, OUT, 12, 20),
        ]
    )
    keep = -2
    reason = np.array([EXPIRATION["idle"], keep, EXPIRATION["tcp_end"], keep], dtype=np.int8)
    out, conv = due_with_siblings(k, reason)
    assert conv[0] == conv[1] == conv[2] != conv[3]
    assert list(out) == [EXPIRATION["tcp_end"]] * 3 + [keep]
    # nothing due: nothing changes; agent stop outranks the others
    assert list(due_with_siblings(k, np.full(4, keep, np.int8))[0]) == [keep] * 4
    reason = np.array([EXPIRATION["agent_stop"], keep, EXPIRATION["idle"], keep], dtype=np.int8)
    assert list(due_with_siblings(k, reason)[0]) == [EXPIRATION["agent_stop"]] * 3 + [keep]


class FakeTable:
    def __init__(self, keys, values):
        self.keys, self.values = keys.copy(), values.copy()

    def read_all(self):
        return self.keys.copy(), self.values.copy()

    def take(self, keys):
        want = {k.tobytes() for k in keys}
        m = np.array([k.tobytes() in want for k in self.keys], dtype=bool)
        got = self.keys[m], self.values[m]
        self.keys, self.values = self.keys[~m], self.values[~m]
        return got

    def drain(self):
        got = self.keys, self.values
        self.keys, self.values = self.keys[:0], self.values[:0]
        return got


def harvester(table, record_per):
    return Harvester(
        table,
        settings=HarvestSettings(idle_timeout_s=10, record_per=record_per),
        first_n=2,
        mono_to_unix_ns=0,
        ifnames=NAMES,
        ifkinds=KINDS,
    )


def test_harvest_takes_the_late_record_with_the_early_one_and_loses_nothing():
    # veth-b's last packet came 1 s after veth-a's: at t = 10.5 s only veth-a's is idle
    k, v = records(
        [
            (7, A, B, 3, 2, IN, OUT, 0, 0),
            (9, A, B, 3, 2, OUT, IN, 0, 1 * S),
        ]
    )
    table = FakeTable(k, v)
    h = harvester(table, "conversation")
    b = h.scan(now_ns=10 * S + S // 2)
    assert len(table.keys) == 0  # both taken in one scan
    assert len(b) == 1 and list(b["seen_on"]) == ["veth-a:ingress veth-b:egress"]
    assert list(b["interface"]) == ["veth-a"] and list(b["bidirectional_bytes"]) == [500 + 2 * 7]
    assert list(b["expiration_id"]) == [EXPIRATION["idle"]]
    assert (h.stats.exported, h.stats.records_merged) == (1, 1)


def test_harvest_per_interface_keeps_both_records_and_their_own_timers():
    k, v = records(
        [
            (7, A, B, 3, 2, IN, OUT, 0, 0),
            (9, A, B, 3, 2, OUT, IN, 0, 1 * S),
        ]
    )
    table = FakeTable(k, v)
    h = harvester(table, "interface")
    b = h.scan(now_ns=10 * S + S // 2)
    assert list(b["interface"]) == ["veth-a"] and list(b["seen_on"]) == ["veth-a:ingress"]
    assert list(b["observation_points"]) == [1]
    b = h.scan(now_ns=11 * S + S // 2)
    assert list(b["interface"]) == ["veth-b"] and list(b["seen_on"]) == ["veth-b:egress"]
    assert h.stats.records_merged == 0


def test_drain_merges_everything_left():
    k, v = records(
        [
            (7, A, B, 3, 2, IN, OUT, 0, 5),
            (2, A, B, 3, 2, OUT, IN, 1, 5),
            (9, A, B, 3, 2, OUT, IN, 2, 5),
        ]
    )
    # eth0 saw the conversation inside VXLAN VNI 42, between the two nodes' addresses
    k[1]["vni"] = 42
    v[1]["tunnel_type"], v[1]["tunnel_id"] = TUNNEL_TYPES.index("vxlan"), 42
    v[1]["outer_src_ip"] = np.frombuffer(ip_from_str("192.0.2.1"), np.uint8)
    v[1]["outer_dst_ip"] = np.frombuffer(ip_from_str("192.0.2.2"), np.uint8)
    b = harvester(FakeTable(k, v), "conversation").drain()
    assert len(b) == 1 and list(b["observation_points"]) == [3]
    assert list(b["seen_on"]) == ["veth-a:ingress eth0:egress veth-b:egress"]
    assert list(b["expiration_id"]) == [EXPIRATION["agent_stop"]]
    # veth-a's counts, the tunnel eth0 saw
    assert list(b["interface"]) == ["veth-a"] and list(b["bidirectional_bytes"]) == [500 + 2 * 7]
    r = next(b.rows())
    assert (r["tunnel_type"], r["tunnel_id"], r["outer_src_ip"], r["outer_dst_ip"]) == (
        "vxlan",
        42,
        "192.0.2.1",
        "192.0.2.2",
    )


def with_vni(keys, vnis):
    """The keys with their VXLAN/Geneve VNI set (0: seen unencapsulated)."""
    out = keys.copy()
    out["vni"] = vnis
    return out


def test_unencapsulated_records_join_the_one_vni_of_their_conversation():
    from xdpml.agent.observations import conversation_ids

    k, _ = records(
        [
            (7, A, B, 1, 1, IN, OUT, 10, 20),  # pod veth, plain
            (5, A, B, 1, 1, OUT, IN, 11, 20),  # overlay device, plain
            (2, A, B, 1, 1, OUT, IN, 12, 20),  # NIC, VNI 42
        ]
    )
    assert len(set(conversation_ids(with_vni(k, [0, 0, 42])))) == 1


def test_several_vnis_stay_apart_and_plain_records_stay_alone():
    from xdpml.agent.observations import conversation_ids

    k, _ = records(
        [
            (7, A, B, 1, 1, IN, OUT, 10, 20),
            (2, A, B, 1, 1, OUT, IN, 12, 20),
            (5, A, B, 1, 1, OUT, IN, 12, 20),
            (9, A, B, 1, 1, OUT, IN, 12, 20),
        ]
    )
    ids = conversation_ids(with_vni(k, [0, 42, 43, 42]))
    assert ids[1] == ids[3] and len({ids[0], ids[1], ids[2]}) == 3


def test_one_interface_never_holds_two_records_of_one_conversation():
    from xdpml.agent.observations import conversation_ids

    # eth0 saw the 5-tuple plain and inside VNI 42: two different packet streams
    k, _ = records([(2, A, B, 1, 1, IN, OUT, 10, 20), (7, A, B, 1, 1, IN, OUT, 10, 20)])
    k = np.concatenate([k, k[:1]])
    kv = with_vni(k, [0, 0, 42])
    ids = conversation_ids(kv)
    assert ids[0] != ids[2] and ids[0] == ids[1]
