"""Agent settings: one place, each field with its unit and default.

The CLI, the AgentConfig custom resource and the tests all build these dataclasses;
nothing else in the agent reads flags or environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdpml.errors import ConfigError

HOOKS = ("auto", "xdp", "tc", "xdp+tc")
XDP_MODES = ("auto", "native", "generic")
RECORD_PER = ("conversation", "interface")


@dataclass
class InterfaceSettings:
    """Which interfaces to attach to and how."""

    # Interface names or shell globs ("eth*"); the special words "physical" (every
    # interface backed by a device driver) and "pod-veths" (host side of pod veths).
    names: list[str] = field(default_factory=list)
    # auto: XDP ingress + TC egress; on veth, TC for both directions, because generic
    # XDP on veth sees GRO-merged super-packets (wrong packet counts, DESIGN.md).
    hooks: str = "auto"
    # XDP attach mode: auto = native (driver) on physical NICs, generic elsewhere.
    xdp_mode: str = "auto"

    def validate(self) -> None:
        if self.hooks not in HOOKS:
            raise ConfigError(f"hooks must be one of {', '.join(HOOKS)}, not {self.hooks!r}")
        if self.xdp_mode not in XDP_MODES:
            raise ConfigError(f"xdp_mode must be one of {', '.join(XDP_MODES)}, not {self.xdp_mode!r}")


@dataclass
class DatapathSettings:
    """Kernel-side sizing; becomes -D flags at compile time."""

    flow_table_size: int = 65536  # flows (entries) in the kernel flow table
    first_n: int = 10  # packets recorded per flow for sequence features (0..32)
    sample_rate: int = 0  # 1 in N packets to the per-packet stream; 0 = off
    ringbuf_kib: int = 4096  # per-packet/window ring buffer size, KiB (power of 2)
    # Per-flow spin lock: exact counts when two CPUs update one flow at once. Off saves
    # about a third of the per-packet cost, at the risk of rare lost updates.
    flow_lock: bool = True

    def validate(self) -> None:
        if not 1024 <= self.flow_table_size <= 16_777_216:
            raise ConfigError("flow_table_size must be 1024..16777216 flows")
        if not 0 <= self.first_n <= 32:
            raise ConfigError("first_n must be 0..32 packets")
        if self.sample_rate < 0:
            raise ConfigError("sample_rate must be >= 0 (0 = per-packet stream off)")
        kib = self.ringbuf_kib
        if kib < 64 or kib & (kib - 1):
            raise ConfigError("ringbuf_kib must be a power of two >= 64")


TUNNEL_KINDS = ("vxlan", "geneve", "ipip", "gre", "gtpu", "wireguard", "esp")


@dataclass
class TunnelSettings:
    """Decapsulation in the datapath (bpf/tunnel.h); becomes -D flags at compile time.
    Each kind on by default; off compiles it out (its packets stay outer flows)."""

    vxlan: bool = True  # UDP to vxlan_ports, Ethernet inside
    geneve: bool = True  # UDP to geneve_port
    ipip: bool = True  # IP protocols 4 and 41: ipip, sit (6in4), 4in6, ip6tnl (6in6)
    gre: bool = True  # IP protocol 47: gre, gretap (and their IPv6 forms)
    gtpu: bool = True  # UDP to gtpu_port, G-PDUs
    wireguard: bool = True  # label UDP flows on wireguard_port (either side) as wireguard
    esp: bool = True  # label IP protocol 50 (and UDP esp_natt_port, NAT-T) flows as esp
    max_depth: int = 1  # tunnels decapsulated per packet (1..4); deeper nesting stays outer
    vxlan_ports: list[int] = field(default_factory=lambda: [4789, 8472])  # up to 4
    geneve_port: int = 6081
    gtpu_port: int = 2152
    wireguard_port: int = 51820
    esp_natt_port: int = 4500  # 0: no NAT-T label

    def validate(self) -> None:
        if not 1 <= self.max_depth <= 4:
            raise ConfigError("tunnel max_depth must be 1..4")
        if not 1 <= len(self.vxlan_ports) <= 4:
            raise ConfigError("vxlan_ports must list 1..4 ports")
        for name, port in [("vxlan_ports", p) for p in self.vxlan_ports] + [
            ("geneve_port", self.geneve_port),
            ("gtpu_port", self.gtpu_port),
            ("wireguard_port", self.wireguard_port),
        ]:
            if not 1 <= port <= 65535:
                raise ConfigError(f"tunnel {name} must be 1..65535, not {port}")
        if not 0 <= self.esp_natt_port <= 65535:
            raise ConfigError("tunnel esp_natt_port must be 0..65535 (0 = off)")

    def cflags(self) -> list[str]:
        """The -D flags of bpf/tunnel.h."""
        ports = [*self.vxlan_ports, 0, 0, 0, 0][:4]
        flags = [
            f"-DXDPML_DECAP_VXLAN={int(self.vxlan)}",
            f"-DXDPML_DECAP_GENEVE={int(self.geneve)}",
            f"-DXDPML_DECAP_IPIP={int(self.ipip)}",
            f"-DXDPML_DECAP_GRE={int(self.gre)}",
            f"-DXDPML_DECAP_GTPU={int(self.gtpu)}",
            f"-DXDPML_LABEL_WIREGUARD={int(self.wireguard)}",
            f"-DXDPML_LABEL_ESP={int(self.esp)}",
            f"-DXDPML_TUNNEL_MAX_DEPTH={self.max_depth}",
            f"-DXDPML_GENEVE_PORT={self.geneve_port}",
            f"-DXDPML_GTPU_PORT={self.gtpu_port}",
            f"-DXDPML_WIREGUARD_PORT={self.wireguard_port}",
            f"-DXDPML_ESP_NATT_PORT={self.esp_natt_port}",
        ]
        flags += [f"-DXDPML_VXLAN_PORT{i + 1}={p}" for i, p in enumerate(ports)]
        return flags


@dataclass
class HarvestSettings:
    """When flows leave the kernel table (NFStream defaults)."""

    idle_timeout_s: float = 120.0  # a flow with no packet for this long is exported
    active_timeout_s: float = 1800.0  # a flow older than this is exported and restarted
    interval_s: float = 1.0  # how often the table is scanned
    # "conversation": one record per conversation seen on several interfaces of the node,
    # listing them in seen_on (xdpml.agent.observations); "interface": one per interface.
    record_per: str = "conversation"
    # Early export (docs/features.md "Expiration"): a snapshot of each flow, expiration
    # id 3, once it has early_packets packets or is early_ms old, so verdicts can act
    # on a flood within a second. The flow stays in the table and is exported again at
    # its timeouts. Only sinks that ask for early records (the collector) get them.
    # The kernel trigger is compiled in: a change takes effect at the next attach.
    early_packets: int = 10  # 0 = no packet trigger
    early_ms: float = 500.0  # 0 = no age trigger

    def validate(self) -> None:
        if self.record_per not in RECORD_PER:
            raise ConfigError(f"record_per must be one of {', '.join(RECORD_PER)}, not {self.record_per!r}")
        if not 0 <= self.early_packets <= 1_000_000:
            raise ConfigError("early_packets must be 0..1000000 packets (0 = off)")
        if not 0 <= self.early_ms <= 3_600_000:
            raise ConfigError("early_ms must be 0..3600000 ms (0 = off)")
        if self.idle_timeout_s <= 0 or self.active_timeout_s <= 0:
            raise ConfigError("timeouts must be > 0 seconds")
        if self.active_timeout_s < self.idle_timeout_s:  # as the AgentConfig CRD requires
            raise ConfigError(
                f"the active timeout ({self.active_timeout_s:g} s) must be >= the idle "
                f"timeout ({self.idle_timeout_s:g} s)"
            )
        if not 0.05 <= self.interval_s <= 60:
            raise ConfigError("interval_s must be 0.05..60 seconds")


@dataclass
class WindowSettings:
    """Seed-000 window features over every packet: N packets or T seconds (0 = off)."""

    packets: int = 0
    seconds: float = 0.0

    def validate(self) -> None:
        if self.packets < 0 or self.seconds < 0:
            raise ConfigError("window size must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.packets > 0 or self.seconds > 0


@dataclass
class EnforceSettings:
    """Acting on verdicts (docs/enforcement.md). Kernel sizing becomes -D flags; the
    rest are the rule manager's limits."""

    # Where the rule maps are pinned (a bpffs directory), so rules outlive an agent
    # restart and `xdpml rules` reaches them; "" = not pinned (private to the process).
    pin_dir: str = "/sys/fs/bpf/xdpml"
    map_rules: int = 16384  # kernel rule slots (-DXDPML_ENF_MAX_RULES); fixed while pinned
    map_allow: int = 1024  # kernel allowlist prefixes per address family
    max_rules: int = 4096  # rules the agent installs from verdicts at most
    max_installs_per_s: float = 50.0  # verdict-made rules installed per second at most
    burst_installs: int = 100  # ... with this burst
    max_ttl_s: float = 600.0  # longer TTLs are clamped to this
    default_ttl_s: float = 60.0  # TTL of a rule made from a verdict
    rate_limit_pps: float = 100.0  # RATE_LIMIT verdicts: packets per second allowed per flow
    rate_limit_burst: int = 100  # ... with this burst, packets
    recent_flows: int = 65536  # exported flow keys remembered (verdicts must name one)
    recent_ttl_s: float = 300.0  # ... for this long

    def validate(self) -> None:
        if not 16 <= self.map_rules <= 1_048_576:
            raise ConfigError("enforce map_rules must be 16..1048576 slots")
        if not 8 <= self.map_allow <= 65536:
            raise ConfigError("enforce map_allow must be 8..65536 prefixes")
        if not 0 <= self.max_rules < self.map_rules:
            raise ConfigError(f"enforce max_rules must be 0..{self.map_rules - 1} (below map_rules)")
        if self.max_installs_per_s <= 0 or self.burst_installs < 1:
            raise ConfigError("enforce max_installs_per_s must be > 0 and burst_installs >= 1")
        if not 0 < self.default_ttl_s <= self.max_ttl_s:
            raise ConfigError("enforce default_ttl_s must be > 0 and <= max_ttl_s")
        if self.rate_limit_pps <= 0 or self.rate_limit_burst < 1:
            raise ConfigError("enforce rate_limit_pps must be > 0 and rate_limit_burst >= 1")
        if self.recent_flows < 1 or self.recent_ttl_s <= 0:
            raise ConfigError("enforce recent_flows must be >= 1 and recent_ttl_s > 0")


@dataclass
class ModelSettings:
    """A scikit-learn model in the kernel (docs/models.md): the two model slots are
    compiled in (-DXDPML_MODEL=1) when ``slots`` is on, a ``file`` is named or keys are
    trusted for pushed models."""

    slots: bool = False  # compile the slots in even with no model yet (`xdpml model load` later)
    # model file (.joblib/.pkl, .onnx tree ensemble, or .xdpml compiled bundle) loaded at start and reloaded
    # whenever it changes (e.g. a mounted ConfigMap); "" = none (slots empty until `xdpml model load`)
    file: str = ""
    # a ConfigMap of the agent's namespace and its key holding the model, read through the
    # API (Kubernetes only; xdpml/kube/model_source.py); "" = none. Exclusive with file.
    config_map: str = ""
    config_map_key: str = ""
    features: list[str] = field(default_factory=list)  # its input columns; [] = the names it was fitted on
    # class label -> pass | alert | drop | rate-limit:PPS[:BURST] (drop and rate-limit
    # through the enforcement mode, allowlist, kill switch; parse_model_action)
    actions: dict[str, str] = field(default_factory=dict)
    # sampled decisions (class, action, the model's inputs) as JSON lines to this file; "" = off
    decisions_file: str = ""
    sample_every: int = 100  # 1 in N classified packets' decisions to decisions_file / the collector
    # the same sampled decisions as "decision" records to the collector (not scored: kept for audit and retraining)
    decisions_to_collector: bool = False
    # flow-feature models classify a flow at its k-th packet (-DXDPML_MODEL_FLOW_K: compiled in)
    flow_k: int = 4
    # Ed25519 public keys (PEM files, `xdpml model keygen`) whose signed models the collector may push;
    # [] = pushed models are refused
    trusted_keys: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.slots or bool(self.file) or bool(self.config_map) or bool(self.trusted_keys)

    @property
    def sampling(self) -> bool:
        """Sampled decisions go somewhere: a file or the collector."""
        return bool(self.decisions_file) or self.decisions_to_collector

    def validate(self) -> None:
        for label, act in self.actions.items():
            try:
                parse_model_action(act)
            except ConfigError as exc:
                raise ConfigError(f"model action for class {label!r}: {exc}") from None
        if self.sample_every < 1:
            raise ConfigError("model sample_every must be >= 1 (1 in N decisions)")
        if not 1 <= self.flow_k <= 1024:
            raise ConfigError(f"model flow_k {self.flow_k}: must be 1..1024 (the packet a flow model decides at)")
        if self.file and not self.file.endswith((".joblib", ".pkl", ".onnx", ".xdpml")):
            raise ConfigError(f"model file {self.file!r}: expected a .joblib, .pkl, .onnx or .xdpml file")
        if self.config_map and self.file:
            raise ConfigError("model file and ConfigMap are mutually exclusive: name one source of the model")
        if self.config_map and not self.config_map_key.endswith(API_MODEL_SUFFIXES):
            # pickles are read only from the node's own disk, never from the API
            raise ConfigError(
                f"model ConfigMap key {self.config_map_key!r}: expected .onnx or .xdpml; a .joblib or .pkl model "
                "is not read from the API (unpickling runs arbitrary code as root in the agent): convert it with "
                "`xdpml model compile MODEL.joblib --out MODEL.xdpml`"
            )


# What a model read through the Kubernetes API may be: formats that load as data only.
API_MODEL_SUFFIXES = (".onnx", ".xdpml")


MODEL_ACTION_NAMES = ("pass", "alert", "drop", "rate-limit")


def parse_model_action(text: str) -> tuple[str, int, int]:
    """A model class's action: "pass", "alert", "drop" or "rate-limit:PPS[:BURST]" ->
    (name, packets per second, burst packets); 0, 0 unless rate-limit. BURST defaults to
    PPS (one second's packets). ConfigError names what is wrong."""
    name, _, spec = str(text).partition(":")
    if name not in MODEL_ACTION_NAMES:
        raise ConfigError(f"{text!r} is not one of pass, alert, drop, rate-limit:PPS[:BURST]")
    if name != "rate-limit":
        if spec:
            raise ConfigError(f"{text!r}: only rate-limit takes parameters")
        return name, 0, 0
    parts = spec.split(":") if spec else []
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"{text!r}: expected rate-limit:PPS[:BURST] (whole packets per second, burst packets)")
    pps = int(parts[0])
    burst = int(parts[1]) if len(parts) == 2 else pps
    if not 1 <= pps <= 1_000_000_000 or not 1 <= burst <= 1_000_000_000:
        raise ConfigError(f"{text!r}: PPS and BURST must be 1..1000000000")
    return name, pps, burst


@dataclass
class AgentSettings:
    interfaces: InterfaceSettings = field(default_factory=InterfaceSettings)
    datapath: DatapathSettings = field(default_factory=DatapathSettings)
    tunnels: TunnelSettings = field(default_factory=TunnelSettings)
    harvest: HarvestSettings = field(default_factory=HarvestSettings)
    window: WindowSettings = field(default_factory=WindowSettings)
    enforce: EnforceSettings = field(default_factory=EnforceSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    summary_interval_s: float = 5.0  # stderr summary line period; 0 = off

    def validate(self) -> AgentSettings:
        self.interfaces.validate()
        self.datapath.validate()
        self.tunnels.validate()
        self.harvest.validate()
        self.window.validate()
        self.enforce.validate()
        self.model.validate()
        return self
