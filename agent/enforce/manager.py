"""Verdicts from the collector -> expiring kernel rules, behind every check.

A verdict becomes a rule only if all of these hold, in this order (the first that
fails is the refusal's reason, counted and logged with backoff):

  action        DROP or RATE_LIMIT (ALLOW/ALERT make no rule: counted as "no_action");
                any other value is "unknown_action"
  mode          enforcement is not off                                   "mode_off"
  well formed   16-byte addresses, ports <= 65535, a protocol            "malformed"
  seen          the flow is one this agent exported recently             "unknown_flow"
  allowlist     neither address is allowlisted (node addresses, default
                gateway, Kubernetes API endpoints, cluster DNS, the
                collector, link-local, operator CIDRs)                   "allowlisted"
  namespace     the action is allowed for both endpoints' namespaces
                (kube-system: none by default)                           "namespace_policy"
  new           no live rule for this flow yet                           "duplicate"
  room          fewer than max_rules rules                               "max_rules"
  rate          installs per second within the limit                     "install_rate"
TTLs above max_ttl_s are clamped (counted as "ttl_clamped", not refused). Verdicts
that arrive over a channel without mutual TLS only ever make dry-run rules, and
enforce mode cannot be switched on for such a channel.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from xdpml.config import EnforceSettings
from xdpml.datapath.rules import Rule, RuleTable, ip_from16
from xdpml.errors import ConfigError

log = logging.getLogger("xdpml.enforce")

REFUSALS = (
    "unknown_action",
    "mode_off",
    "malformed",
    "unknown_flow",
    "allowlisted",
    "namespace_policy",
    "duplicate",
    "max_rules",
    "install_rate",
    "not_ready",
    "install_failed",
)
# proto Action values (xdpml/wire/v1/collector.proto)
ACTION_UNSPECIFIED, ACTION_ALLOW, ACTION_ALERT, ACTION_RATE_LIMIT, ACTION_DROP = 0, 1, 2, 3, 4
VERDICT_ACTIONS = {ACTION_DROP: "drop", ACTION_RATE_LIMIT: "rate-limit"}
# namespace -> actions allowed on its pods' traffic; "*" for every other namespace
DEFAULT_NAMESPACE_POLICY = {"kube-system": frozenset(), "*": frozenset({"drop", "rate-limit"})}
LINK_LOCAL = ("169.254.0.0/16", "fe80::/10")

FlowTuple = tuple[bytes, bytes, int, int, int]
V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _canonical(src: bytes, dst: bytes, sport: int, dport: int, proto: int) -> FlowTuple:
    """Both directions of a conversation as one key."""
    a, b = (src, sport), (dst, dport)
    if b < a:
        a, b = b, a
    return a[0], b[0], a[1], b[1], proto


def _range16(net) -> tuple[int, int]:
    """[first, last] of a network as integers of the 16-byte datapath form."""
    if net.version == 4:
        base = 0xFFFF << 32
        return base + int(net.network_address), base + int(net.broadcast_address)
    return int(net.network_address), int(net.broadcast_address)


class RecentFlows:
    """Keys of the flows this agent exported lately: a bounded table (oldest out first),
    entries valid for ttl_s. ``wrap(sink)`` records every flow batch that sink accepts."""

    def __init__(self, *, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.capacity, self.ttl_s, self.clock = capacity, ttl_s, clock
        self._keys: collections.OrderedDict[FlowTuple, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def write(self, batch) -> None:
        if batch.kind != "flow" or not len(batch):
            return
        c = batch.columns
        t = self.clock()
        rows = zip(
            c["src_ip"].tolist(),
            c["dst_ip"].tolist(),
            c["src_port"].tolist(),
            c["dst_port"].tolist(),
            c["protocol"].tolist(),
        )
        with self._lock:
            for src, dst, sp, dp, proto in rows:
                k = _canonical(bytes(src).ljust(16, b"\0"), bytes(dst).ljust(16, b"\0"), sp, dp, proto)
                self._keys[k] = t
                self._keys.move_to_end(k)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)
                self.evicted += 1

    def add(self, src: bytes, dst: bytes, sport: int, dport: int, proto: int) -> None:
        with self._lock:
            self._keys[_canonical(src, dst, sport, dport, proto)] = self.clock()

    def __contains__(self, key: FlowTuple) -> bool:
        with self._lock:
            t = self._keys.get(_canonical(*key))
        return t is not None and self.clock() - t <= self.ttl_s

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        pass

    def wrap(self, sink) -> RecordingSink:
        return RecordingSink(sink, self)


class RecordingSink:
    """A sink that remembers the flows it exported (for the verdicts about them) and is
    otherwise the sink it wraps."""

    def __init__(self, inner, recent: RecentFlows):
        self.inner, self.recent = inner, recent

    def write(self, batch):
        accepted = self.inner.write(batch)
        if accepted is not False:
            self.recent.write(batch)
        return accepted

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class NamespaceOf(Protocol):
    """16-byte address -> Kubernetes namespace of the pod that has it, or None."""

    def __call__(self, ip16: bytes) -> str | None: ...


def node_addresses() -> list[str]:
    """Every address configured on this host (root network namespace)."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if addr:
                out.append(addr)
    return out


def default_gateways() -> list[str]:
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_default_routes(family=family):
                gw = route.get_attr("RTA_GATEWAY")
                if gw:
                    out.append(gw)
    return out


def resolve_host(hostport: str) -> list[str]:
    """Addresses of a host:port or [v6]:port target (the collector); [] if unresolvable."""
    host = hostport.rsplit(":", 1)[0].strip("[]") if ":" in hostport else hostport
    if host.startswith("unix:"):
        return []
    try:
        return sorted({ai[4][0] for ai in socket.getaddrinfo(host, None)})
    except OSError:
        return []


def build_allowlist(
    *,
    node: Iterable[str] = (),
    gateways: Iterable[str] = (),
    api_servers: Iterable[str] = (),
    dns: Iterable[str] = (),
    collector: Iterable[str] = (),
    operator: Iterable[str] = (),
    link_local: bool = True,
) -> list[ipaddress._BaseNetwork]:
    """Single addresses become /32 or /128; operator entries may be CIDRs. Bad entries
    raise ConfigError naming them."""
    nets = []
    for what, items in (
        ("node address", node),
        ("gateway", gateways),
        ("API server", api_servers),
        ("DNS server", dns),
        ("collector", collector),
        ("operator CIDR", operator),
        ("link-local", LINK_LOCAL if link_local else ()),
    ):
        for item in items:
            try:
                nets.append(ipaddress.ip_network(str(item).split("%", 1)[0], strict=False))
            except ValueError:
                raise ConfigError(f"allowlist {what} {item!r} is not an IP address or CIDR") from None
    return sorted(set(nets), key=lambda n: (n.version, n.network_address.packed, n.prefixlen))


class _Backoff:
    """Log the first event at once, then at most one summary per interval (doubling to a cap)."""

    def __init__(self, what: str, *, initial_s: float = 1.0, max_s: float = 60.0):
        self.what, self.interval, self.max_s = what, initial_s, max_s
        self.next_at = 0.0
        self.pending = 0

    def event(self, detail) -> None:
        now = time.monotonic()
        self.pending += 1
        if now >= self.next_at:
            log.warning(
                "%s: %s (%d since the last message)", self.what, detail() if callable(detail) else detail, self.pending
            )
            self.pending = 0
            self.next_at = now + self.interval
            self.interval = min(self.interval * 2, self.max_s)


@dataclass
class Channel:
    """What the manager knows about where verdicts come from."""

    authenticated: bool = False  # mutual TLS: the collector proved who it is, and so did we
    description: str = "plaintext"


@dataclass
class ManagerStats:
    installed: int = 0
    expired: int = 0
    ttl_clamped: int = 0
    no_action: int = 0
    refused: collections.Counter = field(default_factory=lambda: collections.Counter({r: 0 for r in REFUSALS}))
    install_latency_s: list = field(default_factory=list)  # last few, for metrics


class RuleManager:
    """Turns verdict batches into rules. ``on_verdicts`` is the exporter callback; the rule
    table arrives once the datapath is loaded (``attach``)."""

    def __init__(
        self,
        settings: EnforceSettings,
        *,
        channel: Channel,
        allowlist: Iterable = (),
        recent: RecentFlows | None = None,
        namespace_of: NamespaceOf | None = None,
        namespace_policy: dict[str, frozenset] | None = None,
        telemetry=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.channel = channel
        self.allowlist = [ipaddress.ip_network(n, strict=False) for n in allowlist]
        self._allow_ranges = [_range16(n) for n in self.allowlist]
        self.recent = recent or RecentFlows(capacity=settings.recent_flows, ttl_s=settings.recent_ttl_s)
        self.namespace_of = namespace_of
        self.policy = dict(DEFAULT_NAMESPACE_POLICY if namespace_policy is None else namespace_policy)
        self.telemetry = telemetry
        self.clock = clock
        self.stats = ManagerStats()
        self.table: RuleTable | None = None
        self._tokens = float(settings.burst_installs)
        self._tokens_at = clock()
        self._installed: dict[FlowTuple, int] = {}  # canonical flow -> slot
        self._lock = threading.Lock()
        self._logs = {r: _Backoff(f"verdict refused ({r})") for r in REFUSALS}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kernel_counters: Callable[[], dict] | None = None
        if telemetry is not None:
            self.register_observables(telemetry)

    # -- lifecycle -----------------------------------------------------------------
    def register_observables(self, telemetry) -> None:
        """Metrics read at each collection: live rules by action, and the kernel's packets
        and bytes dropped / would-drop (of the datapath attached last)."""

        def active() -> dict[str, int]:
            out = {"pass": 0, "drop": 0, "rate-limit": 0}
            t = self.table
            for r in t.rows() if t is not None else []:
                if r.expires_in_s > 0:
                    out[r.action] = out.get(r.action, 0) + 1
            return out

        def kernel(suffix: str):
            def read() -> dict[str, int]:
                c = self.kernel_counters() if self.kernel_counters is not None else {}
                if not c:
                    return {}
                return {"dropped": c[f"enf_dropped{suffix}"], "would_drop": c[f"enf_would_drop{suffix}"]}

            return read

        telemetry.observe_gauge("xdpml.agent.enforce.rules_active", active)
        telemetry.observe_counter("xdpml.agent.enforce.packets", kernel(""))
        telemetry.observe_counter("xdpml.agent.enforce.bytes", kernel("_bytes"))

    def attach(self, table: RuleTable, *, mode: str = "", counters: Callable[[], dict] | None = None) -> None:
        """Start acting: write the allowlist to the kernel, set the mode if given ("" keeps
        the pinned maps' mode), begin the expiry sweep. ``counters``: the datapath's
        kernel counters (Datapath.counters), for the metrics."""
        table.set_allowlist(self.allowlist)
        self.table = table
        if counters is not None:
            self.kernel_counters = counters
        self.adopt_live_rules()
        if mode:
            self.set_mode(mode)
        self._thread = threading.Thread(target=self._sweep_loop, name="xdpml-enforce", daemon=True)
        self._thread.start()
        log.info(
            "enforcement ready: mode %s, %d allowlist prefixes, verdicts over %s%s",
            table.mode(),
            len(self.allowlist),
            self.channel.description,
            "" if self.channel.authenticated else " (unauthenticated: dry-run rules only)",
        )

    def adopt_live_rules(self) -> int:
        """Count the live exact rules already in the table (pinned by an earlier agent, or
        by `xdpml score --apply`) as installed, so a verdict for the same flow is a
        duplicate and they count against max_rules. Returns how many."""
        if self.table is None:
            return 0
        from xdpml.datapath.rules import _ip16

        n = 0
        with self._lock:
            for r in self.table.rows():
                if r.kind != "exact" or r.expires_in_s <= 0:
                    continue
                try:
                    key = _canonical(_ip16(r.src), _ip16(r.dst), r.src_port, r.dst_port, r.proto)
                except ValueError:
                    continue
                self._installed[key] = r.slot
                n += 1
        return n

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def detach(self) -> None:
        """Stop acting on this table (the datapath restarts); attach() starts again."""
        self.close()
        self._thread = None
        self._stop = threading.Event()
        self.table = None

    # -- live changes (AgentConfig) -----------------------------------------------------
    def set_allowlist(self, networks: Iterable) -> None:
        """A new allowlist: used for the next verdict, and written to the kernel."""
        nets = [ipaddress.ip_network(n, strict=False) for n in networks]
        with self._lock:
            self.allowlist = nets
            self._allow_ranges = [_range16(n) for n in nets]
        if self.table is not None:
            self.table.set_allowlist(nets)

    def set_limits(self, settings: EnforceSettings) -> None:
        """New limits (max rules, installs per second, TTLs) for the next verdicts."""
        with self._lock:
            self.settings = settings
            self._tokens = min(self._tokens, float(settings.burst_installs))

    def set_namespace_policy(self, policy: dict[str, frozenset] | None) -> None:
        self.policy = dict(DEFAULT_NAMESPACE_POLICY if policy is None else policy)

    def set_mode(self, mode: str) -> None:
        if mode == "enforce" and not self.channel.authenticated:
            raise ConfigError(
                "enforce mode needs verdicts over mutual TLS (--tls-ca, --tls-cert, --tls-key); "
                f"the collector channel is {self.channel.description}"
            )
        if self.table is None:
            raise ConfigError("the datapath is not loaded yet")
        self.table.set_mode(mode)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.sweep()

    def sweep(self) -> list[int]:
        """Delete expired rules (the kernel ignores them already)."""
        if self.table is None:
            return []
        try:
            gone = self.table.expire()
            live = self.table.live_slots()  # `xdpml rules del/flush` may have removed some
        except OSError as exc:
            log.warning("rule expiry sweep failed: %s", exc)
            return []
        with self._lock:
            self._installed = {k: s for k, s in self._installed.items() if s in live}
            self.stats.expired += len(gone)
            self._count("xdpml.agent.enforce.rules_expired", len(gone), {})
        return gone

    # -- verdicts ------------------------------------------------------------------
    def on_verdicts(self, vb) -> None:
        """Exporter callback (agent/export/grpc_client.py on_verdicts)."""
        mode = self.table.mode() if self.table is not None else ""
        for v in vb.verdicts:
            self.consider(v, mode=mode)

    def _refuse(self, reason: str, detail) -> None:
        """detail: text, or a callable making it (only called when the line is logged)."""
        self.stats.refused[reason] += 1
        self._count("xdpml.agent.enforce.verdicts_refused", 1, {"reason": reason})
        self._logs[reason].event(detail)

    def _count(self, name: str, n: int, attrs: dict) -> None:
        if self.telemetry is not None:
            self.telemetry.counter(name).add(n, attrs)

    def _allowlisted(self, *ips: bytes) -> bool:
        for raw in ips:
            v = int.from_bytes(raw, "big")
            for lo, hi in self._allow_ranges:
                if lo <= v <= hi:
                    return True
        return False

    def _namespace_allows(self, action: str, *ips: bytes) -> bool:
        if self.namespace_of is None:
            return action in self.policy.get("*", frozenset())
        for raw in ips:
            ns = self.namespace_of(raw)
            allowed = (
                self.policy.get(ns, self.policy.get("*", frozenset())) if ns else self.policy.get("*", frozenset())
            )
            if action not in allowed:
                return False
        return True

    def _take_install_token(self) -> bool:
        now = self.clock()
        self._tokens = min(
            float(self.settings.burst_installs),
            self._tokens + (now - self._tokens_at) * self.settings.max_installs_per_s,
        )
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def consider(self, v, *, mode: str = "") -> int:
        """One verdict; returns the slot of the rule made, 0 if none. mode: the table's
        mode if the caller read it already (once per batch)."""
        t0 = time.monotonic()
        action = VERDICT_ACTIONS.get(int(v.action))
        if action is None:
            if int(v.action) in (ACTION_UNSPECIFIED, ACTION_ALLOW, ACTION_ALERT):
                self.stats.no_action += 1
            else:
                self._refuse("unknown_action", f"action value {int(v.action)}")
            return 0
        if self.table is None:
            self._refuse("not_ready", "datapath not loaded yet")
            return 0
        if (mode or self.table.mode()) == "off":
            self._refuse("mode_off", "enforcement is off")
            return 0
        k = v.key
        if (
            len(k.src_ip) != 16
            or len(k.dst_ip) != 16
            or k.src_port > 65535
            or k.dst_port > 65535
            or not 0 < k.protocol <= 255
        ):
            self._refuse("malformed", f"flow key {k.src_ip!r} {k.dst_ip!r} {k.src_port} {k.dst_port} {k.protocol}")
            return 0
        src, dst = bytes(k.src_ip), bytes(k.dst_ip)
        if (src[:12] == V4_MAPPED) != (dst[:12] == V4_MAPPED):
            self._refuse("malformed", "addresses of two IP versions")
            return 0
        flow = (src, dst, k.src_port, k.dst_port, k.protocol)

        def text() -> str:
            return f"{ip_from16(src)}:{k.src_port} -> {ip_from16(dst)}:{k.dst_port} proto {k.protocol}"

        if flow not in self.recent:
            self._refuse("unknown_flow", lambda: f"{text()} was not exported by this agent recently")
            return 0
        if self._allowlisted(src, dst):
            self._refuse("allowlisted", text)
            return 0
        if not self._namespace_allows(action, src, dst):
            self._refuse("namespace_policy", lambda: f"{action} not allowed for {text()}")
            return 0
        ttl = float(v.ttl_seconds) if getattr(v, "ttl_seconds", 0) else self.settings.default_ttl_s
        if ttl > self.settings.max_ttl_s:
            ttl = self.settings.max_ttl_s
            self.stats.ttl_clamped += 1
        with self._lock:
            ck = _canonical(*flow)
            if ck in self._installed:
                self._refuse("duplicate", text)
                return 0
            if len(self._installed) >= self.settings.max_rules:
                self._refuse("max_rules", f"{len(self._installed)} rules installed")
                return 0
            if not self._take_install_token():
                self._refuse("install_rate", f"more than {self.settings.max_installs_per_s:g}/s")
                return 0
            rule = Rule(
                kind="exact",
                action=action,
                ttl_s=ttl,
                src=ip_from16(src),
                dst=ip_from16(dst),
                src_port=k.src_port,
                dst_port=k.dst_port,
                proto=k.protocol,
                both_ways=True,
                pps=self.settings.rate_limit_pps if action == "rate-limit" else 0.0,
                burst_packets=self.settings.rate_limit_burst,
                dry_run=not self.channel.authenticated,
            )
            try:
                slot = self.table.add(rule)
            except (ConfigError, OSError) as exc:
                self._refuse("install_failed", f"{text()}: {exc}")
                return 0
            self._installed[ck] = slot
            self.stats.installed += 1
            lat = time.monotonic() - t0
            self.stats.install_latency_s = (self.stats.install_latency_s + [lat])[-100:]
        self._count("xdpml.agent.enforce.rules_installed", 1, {"action": action})
        if self.telemetry is not None:
            self.telemetry.histogram("xdpml.agent.enforce.install_latency").record(lat)
        log.info(
            "rule %d: %s %s for %.0fs%s",
            slot,
            action,
            text(),
            ttl,
            "" if self.channel.authenticated else " (dry-run: unauthenticated channel)",
        )
        return slot

    def summary(self) -> dict:
        refused = {k: v for k, v in self.stats.refused.items() if v}
        return {
            "installed": self.stats.installed,
            "expired": self.stats.expired,
            "ttl_clamped": self.stats.ttl_clamped,
            "no_action": self.stats.no_action,
            "refused": refused,
            "active": len(self._installed),
        }
