"""AgentConfig custom resource (xdpml.io/v1alpha1) -> agent settings.

:func:`parse_agentconfig` turns the resource's ``spec`` into an :class:`AgentConfig`:
the :class:`xdpml.config.AgentSettings` the pipeline runs with, plus what AgentSettings
has no field for yet (per-interface rules, feature sets, export and enrichment
settings).

The CRD is the single source of truth for what a valid spec is: its openAPIV3Schema
and CEL rules are evaluated here (:mod:`xdpml.kube.crd_schema`) exactly as the API
server does, from the copy of ``helm/xdpml/crds/agentconfig.yaml`` shipped in this
package (an agent must not trust that the CRD installed in the cluster is the current
one, and the same checks serve ``xdpml check-config``). On top come only the checks a
CRD cannot express, each with its reason where it is made: unknown fields
(:func:`validate_spec`), overlapping interface rules (:func:`_agent_checks`), the
pipeline's own limits (:func:`parse_spec`). Every problem is reported, each prefixed
with its field path, in one :class:`ConfigError`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from xdpml.config import (
    AgentSettings,
    ConfigError,
    DatapathSettings,
    EnforceSettings,
    HarvestSettings,
    InterfaceSettings,
    ModelSettings,
    TunnelSettings,
    WindowSettings,
)
from xdpml.kube.crd_schema import CrdSchema

GROUP, VERSION, PLURAL, KIND = "xdpml.io", "v1alpha1", "agentconfigs", "AgentConfig"
INTERFACE_WORDS = ("physical", "pod-veths")
# Where the chart mounts the Secret named in collector.tls.secretName.
DEFAULT_TLS_MOUNT_ROOT = "/etc/xdpml/tls"
# A copy of helm/xdpml/crds/agentconfig.yaml (tests/k8s/test_crd.py keeps them identical).
CRD_RESOURCE = "agentconfig-crd.yaml"


@lru_cache(maxsize=1)
def crd_schema() -> CrdSchema:
    """The AgentConfig CRD's schema and compiled CEL rules (loaded once)."""
    text = resources.files(__package__).joinpath(CRD_RESOURCE).read_text(encoding="utf-8")
    return CrdSchema(yaml.safe_load(text), VERSION)


@dataclass(frozen=True)
class FeatureSets:
    flows: bool = True
    windows: bool = False
    packets: bool = False


@dataclass(frozen=True)
class ExportSettings:
    """gRPC export to the collector; empty address = no gRPC export."""

    collector_address: str = ""
    tls_mode: str = "disabled"  # disabled | tls | mtls
    ca_file: str = ""  # "" = system roots
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    secret_name: str = ""  # informational: the Secret the files come from

    def exporter_kwargs(self) -> dict:
        """``target`` and ``tls`` for :class:`xdpml.agent.export.grpc_client.ExporterSettings`."""
        from xdpml.wire.tls import ClientTls  # the exporter's type; imported only when used

        tls = None
        if self.tls_mode != "disabled":
            tls = ClientTls(
                ca_file=self.ca_file or None,
                cert_file=self.cert_file or None,
                key_file=self.key_file or None,
                server_name=self.server_name or None,
            )
        return {"target": self.collector_address, "tls": tls}


@dataclass(frozen=True)
class EnrichmentSettings:
    cluster_wide: bool = False
    services: bool = False
    owners: bool = False
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnforcementConfig:
    """spec.enforcement beyond the limits (those are AgentSettings.enforce)."""

    mode: str = "dry-run"  # off | dry-run | enforce
    allow: tuple[str, ...] = ()  # operator CIDRs
    # namespace -> actions allowed on its pods' traffic ("*": every other namespace);
    # empty = the agent's default (kube-system none, others drop and rate-limit)
    namespace_policy: tuple[tuple[str, tuple[str, ...]], ...] = ()
    follow_api_server: bool = True


@dataclass
class AgentConfig:
    """One parsed, valid AgentConfig resource."""

    settings: AgentSettings
    interface_rules: tuple[InterfaceSettings, ...]
    features: FeatureSets = field(default_factory=FeatureSets)
    export: ExportSettings = field(default_factory=ExportSettings)
    enrichment: EnrichmentSettings = field(default_factory=EnrichmentSettings)
    enforcement: EnforcementConfig = field(default_factory=EnforcementConfig)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    namespace: str = ""
    generation: int = 0
    uid: str = ""

    def changed_sections(self, old: AgentConfig | None) -> set[str]:
        """What differs from ``old``: interfaces, datapath, harvest, window, model,
        features, export, enrichment, enforcement, summary. The pipeline redoes only these (datapath means
        recompile and reattach; interfaces means attach/detach the rules that changed)."""
        if old is None:
            return {
                "interfaces",
                "datapath",
                "harvest",
                "window",
                "model",
                "features",
                "export",
                "enrichment",
                "enforcement",
                "summary",
            }
        out = set()
        if self.interface_rules != old.interface_rules:
            out.add("interfaces")
        for name in ("datapath", "harvest", "window", "model"):
            if getattr(self.settings, name) != getattr(old.settings, name):
                out.add(name)
        if self.settings.tunnels != old.settings.tunnels:
            out.add("datapath")  # compiled in: recompile and reattach
        h, oh = self.settings.harvest, old.settings.harvest
        if (h.early_packets, h.early_ms) != (oh.early_packets, oh.early_ms):
            out.add("datapath")  # the early-export trigger is compiled into the programs
        if self.settings.model.flow_k != old.settings.model.flow_k:
            out.add("datapath")  # k is compiled in (-DXDPML_MODEL_FLOW_K)
        if self.settings.summary_interval_s != old.settings.summary_interval_s:
            out.add("summary")
        for name in ("features", "export", "enrichment"):
            if getattr(self, name) != getattr(old, name):
                out.add(name)
        if self.enforcement != old.enforcement or self.settings.enforce != old.settings.enforce:
            out.add("enforcement")
        return out


def rules_overlap(a: list[str], b: list[str]) -> str:
    """Why two interface rules can match the same interface, or "" if they cannot (as far
    as a static check can tell: 'physical' against a glob is checked when interfaces are
    assigned, see :func:`assign_interfaces`)."""
    for x in a:
        for y in b:
            if x == y:
                return f"both list {x!r}"
            if x in INTERFACE_WORDS or y in INTERFACE_WORDS:
                continue
            # A name (or a glob read as a name) that the other glob matches.
            if fnmatch.fnmatchcase(x, y) or fnmatch.fnmatchcase(y, x):
                return f"{x!r} and {y!r} match the same names"
    return ""


def assign_interfaces(
    rules: tuple[InterfaceSettings, ...] | list[InterfaceSettings], interfaces: Mapping[str, str]
) -> dict[str, int]:
    """Which rule each interface falls under: ``interfaces`` maps name -> kind
    ("physical", "pod-veth" or "other"). Raises ConfigError when two rules match one
    interface (the runtime half of the overlap check)."""
    out: dict[str, int] = {}
    for name, kind in sorted(interfaces.items()):
        hits = []
        for i, rule in enumerate(rules):
            for pat in rule.names:
                if (
                    (pat == "physical" and kind == "physical")
                    or (pat == "pod-veths" and kind == "pod-veth")
                    or (pat not in INTERFACE_WORDS and fnmatch.fnmatchcase(name, pat))
                ):
                    hits.append(i)
                    break
        if len(hits) > 1:
            raise ConfigError(
                f"interface {name!r} matches interface rules {hits[0]} and {hits[1]}; "
                "an interface may match one rule only"
            )
        if hits:
            out[name] = hits[0]
    return out


def _agent_checks(spec: Mapping) -> list[str]:
    """What the CRD cannot express, on a spec that passed it."""
    errs: list[str] = []
    # Two rules matching one interface name: needs glob-against-glob matching across
    # list items, which neither OpenAPI nor CEL (no fnmatch) can state.
    rules = spec["interfaces"]
    for i in range(len(rules)):
        for j in range(i + 1, len(rules)):
            why = rules_overlap(rules[i]["names"], rules[j]["names"])
            if why:
                errs.append(f"spec.interfaces: rules {i} and {j} overlap ({why}); an interface may match one rule only")
    return errs


def validate_spec(spec: Any) -> Mapping:
    """The spec pruned and defaulted as the API server would; ConfigError lists every
    problem the CRD (schema, CEL) and :func:`_agent_checks` find."""
    # unknown=True: the API server prunes unknown fields silently; in a file, or from a
    # CRD newer than this agent, they are typos or settings this agent lacks: refuse them.
    defaulted, errs = crd_schema().validate(spec, "spec", unknown=True)
    if not errs:
        errs = _agent_checks(defaulted)
    if errs:
        raise ConfigError("; ".join(errs))
    return defaulted


def _section(spec: Mapping, *path: str) -> Mapping:
    """A sub-object of a validated spec, defaulted by the CRD even when absent."""
    value: Any = spec
    for key in path:
        value = value.get(key) or {}
    return crd_schema().defaulted(value, "spec", *path)


def _interface_rules(spec: Mapping) -> tuple[InterfaceSettings, ...]:
    return tuple(
        InterfaceSettings(names=list(r["names"]), hooks=r["hooks"], xdp_mode=r["xdpMode"]) for r in spec["interfaces"]
    )


def _features(spec: Mapping) -> FeatureSets:
    sets = _section(spec, "features")["sets"]
    return FeatureSets(flows="flows" in sets, windows="windows" in sets, packets="packets" in sets)


def _settings(spec: Mapping, rules: tuple[InterfaceSettings, ...], features: FeatureSets) -> AgentSettings:
    feats, window = _section(spec, "features"), _section(spec, "features", "window")
    timeouts, datapath = _section(spec, "timeouts"), _section(spec, "datapath")
    model = _section(spec, "model")
    if len(rules) == 1:
        iface = InterfaceSettings(names=list(rules[0].names), hooks=rules[0].hooks, xdp_mode=rules[0].xdp_mode)
    else:
        # AgentSettings holds one rule; with several, it gets every name with automatic
        # hooks and the per-rule choices live in interface_rules (see docs).
        iface = InterfaceSettings(names=[n for r in rules for n in r.names])
    return AgentSettings(
        interfaces=iface,
        datapath=DatapathSettings(
            flow_table_size=datapath["flowTableSize"],
            first_n=feats["firstN"],
            sample_rate=_section(spec, "sampling")["packetRate"] if features.packets else 0,
            ringbuf_kib=datapath["ringBufferKiB"],
        ),
        tunnels=_tunnels(_section(spec, "datapath", "tunnels")),
        harvest=HarvestSettings(
            idle_timeout_s=float(timeouts["idleSeconds"]),
            active_timeout_s=float(timeouts["activeSeconds"]),
            interval_s=float(timeouts["scanIntervalSeconds"]),
            record_per=feats["recordPer"],
            early_packets=int(timeouts["earlyPackets"]),
            early_ms=float(timeouts["earlyMilliseconds"]),
        ),
        window=WindowSettings(packets=int(window.get("packets", 0)), seconds=float(window.get("seconds", 0)))
        if features.windows
        else WindowSettings(),
        enforce=_enforce_limits(spec),
        model=ModelSettings(
            slots=model["slots"],
            file=model["file"],
            config_map=(model.get("configMap") or {}).get("name", ""),
            config_map_key=(model.get("configMap") or {}).get("key", ""),
            features=list(model.get("features", ())),
            actions={str(k): str(v) for k, v in (model.get("actions") or {}).items()},
            decisions_file=model["decisionsFile"],
            sample_every=int(model["decisionSampleEvery"]),
            decisions_to_collector=bool(model["decisionsToCollector"]),
            flow_k=int(model["flowPackets"]),
            trusted_keys=[str(k) for k in model.get("trustedKeys") or ()],
        ),
        summary_interval_s=float(spec["summaryIntervalSeconds"]),
    )


def _tunnels(t: Mapping) -> TunnelSettings:
    return TunnelSettings(
        vxlan=t["vxlan"],
        geneve=t["geneve"],
        ipip=t["ipip"],
        gre=t["gre"],
        gtpu=t["gtpu"],
        wireguard=t["wireguard"],
        esp=t["esp"],
        max_depth=t["maxDepth"],
        vxlan_ports=list(t["vxlanPorts"]),
        geneve_port=t["genevePort"],
        gtpu_port=t["gtpuPort"],
        wireguard_port=t["wireguardPort"],
        esp_natt_port=t["espNatTPort"],
    )


def _enforce_limits(spec: Mapping) -> EnforceSettings:
    enf = _section(spec, "enforcement")
    return EnforceSettings(
        max_rules=int(enf["maxRules"]),
        max_installs_per_s=float(enf["maxInstallsPerSecond"]),
        max_ttl_s=float(enf["maxRuleTTLSeconds"]),
        default_ttl_s=float(enf["ruleTTLSeconds"]),
    )


def _enforcement(spec: Mapping) -> EnforcementConfig:
    import ipaddress

    enf = _section(spec, "enforcement")
    allow = tuple(enf.get("allow") or ())
    bad = []
    for i, cidr in enumerate(allow):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            bad.append(f"spec.enforcement.allow[{i}]: {cidr!r} is not an IP address or CIDR")
    policy = tuple((p["namespace"], tuple(p["actions"])) for p in enf.get("namespacePolicy") or ())
    names = [n for n, _ in policy]
    if len(set(names)) != len(names):
        bad.append("spec.enforcement.namespacePolicy: a namespace is listed twice")
    if bad:
        raise ConfigError("; ".join(bad))
    return EnforcementConfig(
        mode=enf["mode"], allow=allow, namespace_policy=policy, follow_api_server=bool(enf["followApiServer"])
    )


def _export(spec: Mapping, tls_mount_root: str) -> ExportSettings:
    if "collector" not in spec:
        return ExportSettings()
    col, tls = spec["collector"], _section(spec, "collector", "tls")
    mode, secret = tls["mode"], tls.get("secretName", "")
    mount = f"{tls_mount_root.rstrip('/')}/{secret}" if secret else ""
    return ExportSettings(
        collector_address=col["address"],
        tls_mode=mode,
        server_name=tls.get("serverName", ""),
        secret_name=secret,
        ca_file=tls.get("caFile") or (f"{mount}/ca.crt" if mount and mode != "disabled" else ""),
        cert_file=tls.get("certFile") or (f"{mount}/tls.crt" if mount and mode == "mtls" else ""),
        key_file=tls.get("keyFile") or (f"{mount}/tls.key" if mount and mode == "mtls" else ""),
    )


def _enrichment(spec: Mapping) -> EnrichmentSettings:
    enr = _section(spec, "enrichment")
    return EnrichmentSettings(
        cluster_wide=enr["clusterWide"],
        services=enr["services"],
        owners=enr["owners"],
        labels=tuple(enr.get("labels", ())),
    )


def parse_spec(spec: Any, *, tls_mount_root: str = DEFAULT_TLS_MOUNT_ROOT) -> AgentConfig:
    """Validate ``spec`` and map it to settings; ConfigError lists every problem."""
    spec = validate_spec(spec)
    rules = _interface_rules(spec)
    features = _features(spec)
    settings = _settings(spec, rules, features)
    try:
        # The pipeline's own limits, the ones the CLI applies too: kept so that a CRD
        # older or newer than this agent can never loosen what the datapath accepts.
        settings.validate()
        for rule in rules:
            rule.validate()
    except ConfigError as err:
        raise ConfigError(f"spec: {err}") from None
    return AgentConfig(
        settings=settings,
        interface_rules=rules,
        features=features,
        export=_export(spec, tls_mount_root),
        enrichment=_enrichment(spec),
        enforcement=_enforcement(spec),
        node_selector=dict(spec.get("nodeSelector") or {}),
    )


def parse_agentconfig(obj: Mapping, *, tls_mount_root: str = DEFAULT_TLS_MOUNT_ROOT) -> AgentConfig:
    """A whole AgentConfig object (as the API returns it) -> AgentConfig."""
    meta = obj.get("metadata") or {}
    cfg = parse_spec(obj.get("spec"), tls_mount_root=tls_mount_root)
    cfg.name, cfg.namespace = meta.get("name", ""), meta.get("namespace", "")
    cfg.generation, cfg.uid = int(meta.get("generation") or 0), meta.get("uid", "")
    return cfg


def selects_node(selector: Mapping[str, str], node_labels: Mapping[str, str]) -> bool:
    return all(node_labels.get(k) == v for k, v in selector.items())


def check_file(path: str) -> list[tuple[str, AgentConfig | ConfigError]]:
    """Every AgentConfig in a YAML file (multi-document allowed) -> its config or the
    ConfigError saying why the agents would refuse it. For a CLI ``check-config``."""
    try:
        with open(path, encoding="utf-8") as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    out: list[tuple[str, AgentConfig | ConfigError]] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        name = (doc.get("metadata") or {}).get("name") or f"document {i + 1}"
        if doc.get("apiVersion") != f"{GROUP}/{VERSION}":
            out.append((name, ConfigError(f"apiVersion must be {GROUP}/{VERSION}, not {doc.get('apiVersion')!r}")))
            continue
        try:
            out.append((name, parse_agentconfig(doc)))
        except ConfigError as err:
            out.append((name, err))
    if not out:
        raise ConfigError(f"{path} holds no {KIND} resource")
    return out


__all__ = [
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "AgentConfig",
    "ConfigError",
    "EnrichmentSettings",
    "ExportSettings",
    "FeatureSets",
    "assign_interfaces",
    "check_file",
    "crd_schema",
    "parse_agentconfig",
    "parse_spec",
    "rules_overlap",
    "selects_node",
    "validate_spec",
]
