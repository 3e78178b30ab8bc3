"""Rules in the kernel maps: add, delete, list, expire, mode, kill switch, allowlist.

One writer at a time: every change happens under an flock on the pin directory (the
agent and `xdpml rules` may both write), reads the state once, and ends by writing
enf_config with a new generation, so the datapath retakes every cached decision.
Order of writes: rule value, then match keys, then the generation (add); match keys,
then the empty value, then the generation (delete). The kill switch is its own map
value and needs no lock.
"""

from __future__ import annotations

import collections
import ctypes as C
import fcntl
import ipaddress
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from xdpml.datapath import abi
from xdpml.datapath.pins import RuleMaps
from xdpml.errors import ConfigError

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
PROTO_NAMES = {v: k for k, v in PROTOS.items()}
ACTION_NAMES = {v: k for k, v in abi.ACTIONS.items()}
MODE_NAMES = {v: k for k, v in abi.ENF_MODES.items()}


def now_ns() -> int:
    """The kernel's clock for expiry (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
    return time.monotonic_ns()


def _ip16(addr) -> bytes:
    """16-byte form of the datapath: IPv4 as IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(addr)
    return b"\0" * 10 + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed


def ip_from16(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(bytes(raw))
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


@dataclass
class Rule:
    """What a rule matches and does. kind: exact (5-tuple), src or dst (a CIDR)."""

    kind: str
    action: str
    ttl_s: float
    src: str = ""  # exact: source address; src rules: the CIDR
    dst: str = ""  # exact: destination address; dst rules: the CIDR
    src_port: int = 0  # exact only
    dst_port: int = 0  # exact; for src/dst rules 0 = any
    proto: int = 0  # exact: required; src/dst rules: 0 = any
    both_ways: bool = True  # exact: also match the reverse direction
    pps: float = 0.0  # rate-limit: packets per second (0 = no packet limit)
    bps: float = 0.0  # rate-limit: bytes per second (0 = no byte limit)
    burst_packets: int = 0
    burst_bytes: int = 0
    dry_run: bool = False  # this rule only counts, whatever the mode
    no_export: bool = False  # pass rules: the flows they match are not exported

    def validate(self) -> Rule:
        if self.kind not in ("exact", "src", "dst"):
            raise ConfigError(f"rule kind must be exact, src or dst, not {self.kind!r}")
        if self.action not in abi.ACTIONS:
            raise ConfigError(f"action must be one of {', '.join(abi.ACTIONS)}, not {self.action!r}")
        if not self.ttl_s > 0:
            raise ConfigError("a rule needs a TTL > 0 seconds (every rule expires)")
        for port in (self.src_port, self.dst_port):
            if not 0 <= port <= 65535:
                raise ConfigError(f"port {port} out of range 0..65535")
        if not 0 <= self.proto <= 255:
            raise ConfigError(f"protocol {self.proto} out of range 0..255")
        try:
            if self.kind == "exact":
                a, b = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
                if a.version != b.version:
                    raise ConfigError("an exact rule needs two addresses of one IP version")
                if not self.proto:
                    raise ConfigError("an exact rule needs a protocol (tcp, udp, icmp or a number)")
            else:
                ipaddress.ip_network(self.cidr, strict=False)
        except ValueError as exc:
            raise ConfigError(f"bad address: {exc}") from None
        if self.no_export and self.action != "pass":
            raise ConfigError("only a pass rule can keep its flows out of the export (--no-export)")
        if self.action == "rate-limit":
            if self.pps <= 0 and self.bps <= 0:
                raise ConfigError("a rate-limit rule needs --pps or --bps > 0")
            if self.pps < 0 or self.bps < 0 or (0 < self.bps < 1):
                raise ConfigError("rates must be > 0 (bytes per second >= 1)")
        return self

    @property
    def cidr(self) -> str:
        return self.src if self.kind == "src" else self.dst

    def network(self) -> ipaddress._BaseNetwork:
        return ipaddress.ip_network(self.cidr, strict=False)


@dataclass
class RuleRow:
    slot: int
    kind: str
    src: str
    dst: str
    src_port: int
    dst_port: int
    proto: int
    action: str
    hits: int
    bytes: int
    dropped: int
    expires_in_s: float
    first_hit_ns: int
    last_hit_ns: int
    dry_run: bool
    both_ways: bool
    no_export: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _State:
    cfg: abi.EnfConfig
    rules: dict[int, abi.EnfRule] = field(default_factory=dict)  # live slots
    keys: dict[int, list[tuple[str, object]]] = field(default_factory=dict)  # slot -> (map, key)
    hint: int = 1  # where the search for a free slot starts
    counts: collections.Counter = field(default_factory=collections.Counter)  # match map -> entries


class RuleTable:
    def __init__(self, maps: RuleMaps, *, lock_path: str = ""):
        self.maps = maps
        self.lock_path = lock_path
        self._tlock = threading.Lock()
        self._state: _State | None = None

    # -- locking and state -------------------------------------------------------
    @contextmanager
    def _locked(self):
        with self._tlock:
            fd = -1
            if self.lock_path:
                fd = os.open(self.lock_path, os.O_RDONLY | os.O_DIRECTORY)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield self._load()
            finally:
                if fd >= 0:
                    os.close(fd)  # releases the flock

    def _cfg(self) -> abi.EnfConfig:
        return self.maps["enf_config"].lookup(C.c_uint32(0)) or abi.EnfConfig()

    def _load(self) -> _State:
        cfg = self._cfg()
        if self._state is not None and self._state.cfg.gen == cfg.gen:
            self._state.cfg = cfg
            return self._state
        st = _State(cfg)
        rules = self.maps["enf_rules"]
        for slot in range(1, self.maps.map_rules):
            r = rules.lookup(C.c_uint32(slot))
            if r is not None and r.expires_ns:
                st.rules[slot] = r
        for name in ("enf_exact", "enf_src4", "enf_dst4", "enf_src6", "enf_dst6"):
            m = self.maps[name]
            for k in m.keys():
                v = m.lookup(k)
                if v is None:
                    continue
                st.counts[name] += 1
                if name == "enf_exact":  # the forward entry first
                    entries = st.keys.setdefault(v.slot, [])
                    entries.insert(len(entries) if v.reverse else 0, (name, k))
                else:
                    st.keys.setdefault(v.value, []).append((name, k))
        self._state = st
        return st

    def _commit(self, st: _State, *, mode: int | None = None) -> None:
        cfg = abi.EnfConfig.from_buffer_copy(st.cfg)
        counts = st.counts
        cfg.exact, cfg.src4, cfg.dst4 = counts["enf_exact"], counts["enf_src4"], counts["enf_dst4"]
        cfg.src6, cfg.dst6 = counts["enf_src6"], counts["enf_dst6"]
        cfg.rules = len(st.rules)
        if mode is not None:
            cfg.mode = mode
        cfg.gen = st.cfg.gen + 1
        self.maps["enf_config"].update(C.c_uint32(0), cfg)
        st.cfg = cfg

    # -- rules ---------------------------------------------------------------------
    def _match_keys(self, rule: Rule) -> list[tuple[str, object]]:
        if rule.kind == "exact":
            out: list[tuple[str, object]] = []
            ends = [(rule.src, rule.dst, rule.src_port, rule.dst_port)]
            if rule.both_ways:
                ends.append((rule.dst, rule.src, rule.dst_port, rule.src_port))
            for s, d, sp, dp in ends:
                k = abi.EnfExactKey()
                C.memmove(k.src_ip, _ip16(s), 16)
                C.memmove(k.dst_ip, _ip16(d), 16)
                k.src_port, k.dst_port, k.proto = sp, dp, rule.proto
                out.append(("enf_exact", k))
            return out
        net = rule.network()
        key: abi.EnfLpm4Key | abi.EnfLpm6Key
        if net.version == 4:
            key = abi.EnfLpm4Key(prefixlen=net.prefixlen)
            C.memmove(key.addr, net.network_address.packed, 4)
        else:
            key = abi.EnfLpm6Key(prefixlen=net.prefixlen)
            C.memmove(key.addr, net.network_address.packed, 16)
        return [(f"enf_{rule.kind}{net.version}", key)]

    def add(self, rule: Rule) -> int:
        """Install; returns the slot. Refuses a match already taken by another live rule."""
        rule.validate()
        with self._locked() as st:
            keys = self._match_keys(rule)
            for name, k in keys:
                v = self.maps[name].lookup(k)
                taken = v is not None and (v.slot if name == "enf_exact" else v.value)
                if taken in st.rules:
                    raise ConfigError(f"a rule with this match exists (slot {taken}); delete it first")
            slot = self._free_slot(st)
            if not slot:
                raise ConfigError(f"the rule table is full ({self.maps.map_rules - 1} slots)")
            r = abi.EnfRule(
                gen=st.cfg.gen + 1,
                expires_ns=now_ns() + int(rule.ttl_s * 1e9),
                action=abi.ACTIONS[rule.action],
                flags=(abi.RULE_DRY_RUN if rule.dry_run else 0) | (abi.RULE_NO_EXPORT if rule.no_export else 0),
            )
            if rule.kind != "exact":
                r.proto, r.dst_port = rule.proto, rule.dst_port
            if rule.action == "rate-limit":
                if rule.pps > 0:
                    r.ns_per_pkt = max(1, int(1e9 / rule.pps))
                    r.burst_pkt_ns = r.ns_per_pkt * max(1, rule.burst_packets)
                if rule.bps > 0:
                    r.ps_per_byte = max(1, int(1e12 / rule.bps))
                    r.burst_byte_ns = r.ps_per_byte * max(1500, rule.burst_bytes) // 1000
            self.maps["enf_rules"].update(C.c_uint32(slot), r)
            for i, (name, k) in enumerate(keys):
                value = abi.EnfExactVal(slot=slot, reverse=i) if name == "enf_exact" else C.c_uint32(slot)
                self.maps[name].update(k, value)
                st.counts[name] += 1
            st.rules[slot] = r
            st.keys[slot] = keys
            self._commit(st)
            return slot

    def _free_slot(self, st: _State) -> int:
        n = self.maps.map_rules
        if len(st.rules) >= n - 1:
            return 0
        slot = st.hint if 1 <= st.hint < n else 1
        while slot in st.rules:
            slot = slot + 1 if slot + 1 < n else 1
        st.hint = slot + 1
        return slot

    def _remove(self, st: _State, slot: int) -> None:
        for name, k in st.keys.pop(slot, []):
            v = self.maps[name].lookup(k)
            if v is not None and (v.slot if name == "enf_exact" else v.value) == slot:
                self.maps[name].delete(k)
                st.counts[name] -= 1
        self.maps["enf_rules"].update(C.c_uint32(slot), abi.EnfRule())
        st.rules.pop(slot, None)

    def delete(self, slot: int) -> bool:
        with self._locked() as st:
            if slot not in st.rules:
                return False
            self._remove(st, slot)
            self._commit(st)
            return True

    def flush(self) -> int:
        with self._locked() as st:
            slots = list(st.rules)
            for slot in slots:
                self._remove(st, slot)
            self._commit(st)
            return len(slots)

    def expire(self) -> list[int]:
        """Delete rules whose expiry has passed (the kernel already ignores them)."""
        t = now_ns()
        with self._locked() as st:
            gone = [s for s, r in st.rules.items() if r.expires_ns <= t]
            for slot in gone:
                self._remove(st, slot)
            if gone:
                self._commit(st)
            return gone

    def rows(self) -> list[RuleRow]:
        with self._locked() as st:
            # read under the lock: a rule installed (under the same lock) after an earlier
            # reading would show more time left than its TTL
            t = now_ns()
            out = []
            for slot in sorted(st.rules):
                r = self.maps["enf_rules"].lookup(C.c_uint32(slot))  # fresh hit counters
                if r is None or not r.expires_ns:
                    continue
                keys = st.keys.get(slot, [])
                src = dst = ""
                sport = dport = proto = 0
                kind = "exact"
                if keys and keys[0][0] == "enf_exact":
                    k = keys[0][1]
                    src, dst, sport, dport, proto = (
                        ip_from16(k.src_ip),
                        ip_from16(k.dst_ip),
                        k.src_port,
                        k.dst_port,
                        k.proto,
                    )
                elif keys:
                    name, k = keys[0]
                    kind = name[4:7]
                    n = 4 if name.endswith("4") else 16
                    raw = bytes(k.addr)[:n]
                    cidr = f"{ipaddress.ip_address(raw)}/{k.prefixlen}"
                    src, dst = (cidr, "*") if kind == "src" else ("*", cidr)
                    dport, proto = r.dst_port, r.proto
                out.append(
                    RuleRow(
                        slot=slot,
                        kind=kind,
                        src=src,
                        dst=dst,
                        src_port=sport,
                        dst_port=dport,
                        proto=proto,
                        action=ACTION_NAMES.get(r.action, str(r.action)),
                        hits=r.hit_packets,
                        bytes=r.hit_bytes,
                        dropped=r.drop_packets,
                        expires_in_s=(r.expires_ns - t) / 1e9,
                        first_hit_ns=r.first_hit_ns,
                        last_hit_ns=r.last_hit_ns,
                        dry_run=bool(r.flags & abi.RULE_DRY_RUN),
                        no_export=bool(r.flags & abi.RULE_NO_EXPORT),
                        both_ways=len(keys) > 1,
                    )
                )
            return out

    def no_export_slots(self) -> dict[int, int]:
        """Slot -> rule generation of every installed pass rule whose flows are not to be
        exported (re-read only when the rule-set generation changed)."""
        st = self._load()
        return {s: r.gen for s, r in st.rules.items() if r.action == abi.ACT_PASS and r.flags & abi.RULE_NO_EXPORT}

    def live_slots(self) -> set[int]:
        with self._locked() as st:
            return set(st.rules)

    def count(self) -> int:
        with self._locked() as st:
            return len(st.rules)

    # -- mode, kill switch, allowlist ------------------------------------------------
    def mode(self) -> str:
        return MODE_NAMES.get(self._cfg().mode, "dry-run")

    def set_mode(self, mode: str) -> None:
        if mode not in abi.ENF_MODES:
            raise ConfigError(f"mode must be one of {', '.join(abi.ENF_MODES)}, not {mode!r}")
        with self._locked() as st:
            self._commit(st, mode=abi.ENF_MODES[mode])

    def killed(self) -> bool:
        v = self.maps["enf_kill"].lookup(C.c_uint32(0))
        return bool(v and v.value)

    def set_kill(self, on: bool) -> None:
        self.maps["enf_kill"].update(C.c_uint32(0), C.c_uint32(1 if on else 0))

    def allowlist(self) -> list[str]:
        out = []
        for name, n in (("enf_allow4", 4), ("enf_allow6", 16)):
            for k in self.maps[name].keys():
                out.append(f"{ipaddress.ip_address(bytes(k.addr)[:n])}/{k.prefixlen}")
        return sorted(out)

    def set_allowlist(self, networks) -> None:
        """Replace the kernel allowlist with these networks (new ones first, then the
        stale removed, so no instant is left without the allowlist)."""
        want: dict = {}
        for net in networks:
            net = ipaddress.ip_network(net, strict=False)
            k: abi.EnfLpm4Key | abi.EnfLpm6Key
            if net.version == 4:
                k = abi.EnfLpm4Key(prefixlen=net.prefixlen)
                C.memmove(k.addr, net.network_address.packed, 4)
                want[("enf_allow4", bytes(k))] = k
            else:
                k = abi.EnfLpm6Key(prefixlen=net.prefixlen)
                C.memmove(k.addr, net.network_address.packed, 16)
                want[("enf_allow6", bytes(k))] = k
        with self._locked() as st:
            for (name, _), k in want.items():
                self.maps[name].update(k, C.c_uint32(1))
            for name in ("enf_allow4", "enf_allow6"):
                for k in self.maps[name].keys():
                    if (name, bytes(k)) not in want:
                        self.maps[name].delete(k)
            self._commit(st)
