"""AgentConfig custom resource (xdpml.io/v1alpha1) -> agent settings.

:func:`parse_agentconfig` turns the resource's ``spec`` into an :class:`AgentConfig`:
the :class:`xdpml.config.AgentSettings` the pipeline runs with, plus what AgentSettings
has no field for yet (per-interface rules, feature sets, export and enrichment
settings). It checks everything the CRD's schema and CEL rules check (an agent must
not trust that the CRD installed in the cluster is the current one, and the same
checks serve the CLI), and what a schema cannot express: overlapping interface rules,
the collector port range, and :meth:`AgentSettings.validate`. Every problem is
reported, each prefixed with its field path, in one :class:`ConfigError`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from xdpml.config import (AgentSettings, ConfigError, DatapathSettings, HarvestSettings, HOOKS,
                          InterfaceSettings, WindowSettings, XDP_MODES)

GROUP, VERSION, PLURAL, KIND = "xdpml.io", "v1alpha1", "agentconfigs", "AgentConfig"
INTERFACE_WORDS = ("physical", "pod-veths")
FEATURE_SETS = ("flows", "windows", "packets")
TLS_MODES = ("disabled", "tls", "mtls")
# Where the chart mounts the Secret named in collector.tls.secretName.
DEFAULT_TLS_MOUNT_ROOT = "/etc/xdpml/tls"

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@*?!\[\]-]+$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
RINGBUF_KIB = tuple(64 << i for i in range(15))  # 64 .. 1048576


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
            tls = ClientTls(ca_file=self.ca_file or None, cert_file=self.cert_file or None,
                            key_file=self.key_file or None, server_name=self.server_name or None)
        return {"target": self.collector_address, "tls": tls}


@dataclass(frozen=True)
class EnrichmentSettings:
    cluster_wide: bool = False
    services: bool = False
    owners: bool = False
    labels: tuple[str, ...] = ()


@dataclass
class AgentConfig:
    """One parsed, valid AgentConfig resource."""

    settings: AgentSettings
    interface_rules: tuple[InterfaceSettings, ...]
    features: FeatureSets = field(default_factory=FeatureSets)
    export: ExportSettings = field(default_factory=ExportSettings)
    enrichment: EnrichmentSettings = field(default_factory=EnrichmentSettings)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    namespace: str = ""
    generation: int = 0
    uid: str = ""

    def changed_sections(self, old: "AgentConfig | None") -> set[str]:
        """What differs from ``old``: interfaces, datapath, harvest, window, features,
        export, enrichment, summary. The pipeline redoes only these (datapath means
        recompile and reattach; interfaces means attach/detach the rules that changed)."""
        if old is None:
            return {"interfaces", "datapath", "harvest", "window", "features", "export", "enrichment", "summary"}
        out = set()
        if self.interface_rules != old.interface_rules:
            out.add("interfaces")
        for name in ("datapath", "harvest", "window"):
            if getattr(self.settings, name) != getattr(old.settings, name):
                out.add(name)
        if self.settings.summary_interval_s != old.settings.summary_interval_s:
            out.add("summary")
        for name in ("features", "export", "enrichment"):
            if getattr(self, name) != getattr(old, name):
                out.add(name)
        return out


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def _obj(parent: Mapping, key: str, path: str, errs: _Errors) -> dict:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        errs.add(f"{path}.{key}", f"must be an object, not {type(value).__name__}")
        return {}
    return value


def _number(parent: Mapping, key: str, path: str, errs: _Errors, *, lo: float, hi: float,
            default: float, integer: bool = False) -> float:
    value = parent.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        errs.add(f"{path}.{key}", f"must be {'an integer' if integer else 'a number'}, not {value!r}")
        return default
    if not lo <= value <= hi:
        errs.add(f"{path}.{key}", f"must be {lo:g}..{hi:g}, not {value!r}")
        return default
    return value


def _bool(parent: Mapping, key: str, path: str, errs: _Errors) -> bool:
    value = parent.get(key, False)
    if not isinstance(value, bool):
        errs.add(f"{path}.{key}", f"must be true or false, not {value!r}")
        return False
    return value


def _str(parent: Mapping, key: str, path: str, errs: _Errors, *, pattern: re.Pattern | None = None,
         max_len: int = 253, choices: tuple[str, ...] = (), default: str = "") -> str:
    value = parent.get(key, default)
    if not isinstance(value, str):
        errs.add(f"{path}.{key}", f"must be a string, not {value!r}")
        return default
    if choices and value not in choices:
        errs.add(f"{path}.{key}", f"must be one of {', '.join(choices)}, not {value!r}")
        return default
    if len(value) > max_len:
        errs.add(f"{path}.{key}", f"is longer than {max_len} characters")
        return default
    if pattern is not None and value and not pattern.match(value):
        errs.add(f"{path}.{key}", f"{value!r} is not valid")
        return default
    return value


def _str_list(parent: Mapping, key: str, path: str, errs: _Errors, *, min_items: int, max_items: int,
              pattern: re.Pattern, max_len: int) -> list[str]:
    value = parent.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errs.add(f"{path}.{key}", "must be a list of strings")
        return []
    if not min_items <= len(value) <= max_items:
        errs.add(f"{path}.{key}", f"must have {min_items}..{max_items} items, not {len(value)}")
    if len(set(value)) != len(value):
        errs.add(f"{path}.{key}", "has duplicate items")
    good = []
    for i, v in enumerate(value):
        if not v or len(v) > max_len or not pattern.match(v):
            errs.add(f"{path}.{key}[{i}]", f"{v!r} is not valid")
        else:
            good.append(v)
    return good


def _unknown(obj: Mapping, allowed: set[str], path: str, errs: _Errors) -> None:
    # The API server prunes unknown fields; here they are most likely typos.
    for key in sorted(set(obj) - allowed):
        errs.add(f"{path}.{key}", "unknown field")


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


def assign_interfaces(rules: tuple[InterfaceSettings, ...] | list[InterfaceSettings],
                      interfaces: Mapping[str, str]) -> dict[str, int]:
    """Which rule each interface falls under: ``interfaces`` maps name -> kind
    ("physical", "pod-veth" or "other"). Raises ConfigError when two rules match one
    interface (the runtime half of the overlap check)."""
    out: dict[str, int] = {}
    for name, kind in sorted(interfaces.items()):
        hits = []
        for i, rule in enumerate(rules):
            for pat in rule.names:
                if (pat == "physical" and kind == "physical") or (pat == "pod-veths" and kind == "pod-veth") \
                        or (pat not in INTERFACE_WORDS and fnmatch.fnmatchcase(name, pat)):
                    hits.append(i)
                    break
        if len(hits) > 1:
            raise ConfigError(f"interface {name!r} matches interface rules {hits[0]} and {hits[1]}; "
                              "an interface may match one rule only")
        if hits:
            out[name] = hits[0]
    return out


def parse_spec(spec: Any, *, tls_mount_root: str = DEFAULT_TLS_MOUNT_ROOT) -> AgentConfig:
    """Validate ``spec`` and map it to settings; ConfigError lists every problem."""
    errs = _Errors()
    if not isinstance(spec, dict):
        raise ConfigError("spec: must be an object")
    _unknown(spec, {"nodeSelector", "interfaces", "features", "sampling", "timeouts", "datapath",
                    "collector", "enrichment", "summaryIntervalSeconds"}, "spec", errs)

    selector = _obj(spec, "nodeSelector", "spec", errs)
    if len(selector) > 32:
        errs.add("spec.nodeSelector", "at most 32 labels")
    for k, v in selector.items():
        if not _LABEL_KEY.match(k) or not isinstance(v, str) or len(v) > 63:
            errs.add(f"spec.nodeSelector.{k}", "invalid label key or value")

    # interfaces
    rules: list[InterfaceSettings] = []
    raw_rules = spec.get("interfaces")
    if not isinstance(raw_rules, list) or not 1 <= len(raw_rules) <= 16:
        errs.add("spec.interfaces", "must be a list of 1..16 interface rules")
        raw_rules = raw_rules if isinstance(raw_rules, list) else []
    for i, raw in enumerate(raw_rules):
        path = f"spec.interfaces[{i}]"
        if not isinstance(raw, dict):
            errs.add(path, "must be an object")
            continue
        _unknown(raw, {"names", "hooks", "xdpMode"}, path, errs)
        names = _str_list(raw, "names", path, errs, min_items=1, max_items=64, pattern=_IFNAME, max_len=64)
        hooks = _str(raw, "hooks", path, errs, choices=HOOKS, default="auto")
        mode = _str(raw, "xdpMode", path, errs, choices=XDP_MODES, default="auto")
        if hooks == "tc" and mode != "auto":
            errs.add(path, "xdpMode has no effect with hooks 'tc'; leave it 'auto'")
        if "pod-veths" in names and mode == "native":
            errs.add(path, "native XDP on pod veths disables TSO on the pod side (throughput falls ~5x); "
                           "use 'auto' or 'generic'")
        rules.append(InterfaceSettings(names=names, hooks=hooks, xdp_mode=mode))
    for i in range(len(rules)):
        for j in range(i + 1, len(rules)):
            why = rules_overlap(rules[i].names, rules[j].names)
            if why:
                errs.add("spec.interfaces", f"rules {i} and {j} overlap ({why}); an interface may match one rule only")

    # features, sampling
    feats = _obj(spec, "features", "spec", errs)
    _unknown(feats, {"sets", "firstN", "window"}, "spec.features", errs)
    sets_raw = feats.get("sets", ["flows"])
    if not isinstance(sets_raw, list) or not 1 <= len(sets_raw) <= 3 or len(set(map(str, sets_raw))) != len(sets_raw) \
            or any(s not in FEATURE_SETS for s in sets_raw):
        errs.add("spec.features.sets", f"must be 1..3 distinct items of {', '.join(FEATURE_SETS)}")
        sets_raw = ["flows"]
    sets = FeatureSets(flows="flows" in sets_raw, windows="windows" in sets_raw, packets="packets" in sets_raw)
    first_n = int(_number(feats, "firstN", "spec.features", errs, lo=0, hi=32, default=10, integer=True))
    window = _obj(feats, "window", "spec.features", errs)
    _unknown(window, {"packets", "seconds"}, "spec.features.window", errs)
    win_packets = int(_number(window, "packets", "spec.features.window", errs, lo=0, hi=1_000_000, default=0,
                              integer=True))
    win_seconds = float(_number(window, "seconds", "spec.features.window", errs, lo=0, hi=3600, default=0))
    if sets.windows and win_packets <= 0 and win_seconds <= 0:
        errs.add("spec.features", "features.sets contains 'windows': set window.packets or window.seconds above 0")
    sampling = _obj(spec, "sampling", "spec", errs)
    _unknown(sampling, {"packetRate"}, "spec.sampling", errs)
    rate = int(_number(sampling, "packetRate", "spec.sampling", errs, lo=0, hi=1_000_000, default=0, integer=True))
    if sets.packets and rate < 1:
        errs.add("spec", "features.sets contains 'packets': set sampling.packetRate to 1 or more (1 in N packets)")
    if rate > 0 and not sets.packets:
        errs.add("spec", "sampling.packetRate is set but features.sets does not contain 'packets'")

    # timeouts, datapath
    tmo = _obj(spec, "timeouts", "spec", errs)
    _unknown(tmo, {"idleSeconds", "activeSeconds", "scanIntervalSeconds"}, "spec.timeouts", errs)
    idle = float(_number(tmo, "idleSeconds", "spec.timeouts", errs, lo=1, hi=86400, default=120))
    active = float(_number(tmo, "activeSeconds", "spec.timeouts", errs, lo=1, hi=604800, default=1800))
    scan = float(_number(tmo, "scanIntervalSeconds", "spec.timeouts", errs, lo=0.05, hi=60, default=1))
    if active < idle:
        errs.add("spec.timeouts", "timeouts.activeSeconds must be >= timeouts.idleSeconds")
    dp = _obj(spec, "datapath", "spec", errs)
    _unknown(dp, {"flowTableSize", "ringBufferKiB"}, "spec.datapath", errs)
    table = int(_number(dp, "flowTableSize", "spec.datapath", errs, lo=1024, hi=16_777_216, default=65536,
                        integer=True))
    ring = dp.get("ringBufferKiB", 4096)
    if ring not in RINGBUF_KIB or isinstance(ring, bool):
        errs.add("spec.datapath.ringBufferKiB", f"must be a power of two 64..1048576, not {ring!r}")
        ring = 4096

    # collector
    export = ExportSettings()
    col = _obj(spec, "collector", "spec", errs)
    if col:
        _unknown(col, {"address", "tls"}, "spec.collector", errs)
        address = _str(col, "address", "spec.collector", errs, max_len=261)
        m = _HOST_PORT.match(address)
        if not address:
            errs.add("spec.collector.address", "is required (host:port)")
        elif not m:
            errs.add("spec.collector.address", f"{address!r} is not host:port or [ipv6]:port")
        elif not 1 <= int(m.group(3)) <= 65535:
            errs.add("spec.collector.address", f"port {m.group(3)} is not 1..65535")
        tls = _obj(col, "tls", "spec.collector", errs)
        _unknown(tls, {"mode", "secretName", "caFile", "certFile", "keyFile", "serverName"}, "spec.collector.tls", errs)
        p = "spec.collector.tls"
        mode = _str(tls, "mode", p, errs, choices=TLS_MODES, default="disabled")
        secret = _str(tls, "secretName", p, errs, pattern=_DNS_SUBDOMAIN)
        files = {k: _str(tls, k, p, errs, max_len=4096) for k in ("caFile", "certFile", "keyFile")}
        for k, v in files.items():
            if v and not v.startswith("/"):
                errs.add(f"{p}.{k}", f"must be an absolute path, not {v!r}")
        server_name = _str(tls, "serverName", p, errs)
        if ("certFile" in tls) != ("keyFile" in tls):
            errs.add(p, "tls.certFile and tls.keyFile go together")
        if mode == "mtls" and not (secret or "certFile" in tls):
            errs.add(p, "tls.mode 'mtls' needs a client certificate: secretName, or certFile and keyFile")
        if mode == "disabled" and any(k in tls for k in ("secretName", "caFile", "certFile", "serverName")):
            errs.add(p, "TLS files or names are set but tls.mode is 'disabled'")
        mount = f"{tls_mount_root.rstrip('/')}/{secret}" if secret else ""
        export = ExportSettings(
            collector_address=address, tls_mode=mode, server_name=server_name, secret_name=secret,
            ca_file=files["caFile"] or (f"{mount}/ca.crt" if mount and mode != "disabled" else ""),
            cert_file=files["certFile"] or (f"{mount}/tls.crt" if mount and mode == "mtls" else ""),
            key_file=files["keyFile"] or (f"{mount}/tls.key" if mount and mode == "mtls" else ""))

    # enrichment
    enr = _obj(spec, "enrichment", "spec", errs)
    _unknown(enr, {"clusterWide", "services", "owners", "labels"}, "spec.enrichment", errs)
    labels = _str_list(enr, "labels", "spec.enrichment", errs, min_items=0, max_items=16, pattern=_LABEL_KEY,
                       max_len=317)
    enrichment = EnrichmentSettings(cluster_wide=_bool(enr, "clusterWide", "spec.enrichment", errs),
                                    services=_bool(enr, "services", "spec.enrichment", errs),
                                    owners=_bool(enr, "owners", "spec.enrichment", errs), labels=tuple(labels))
    summary = float(_number(spec, "summaryIntervalSeconds", "spec", errs, lo=0, hi=3600, default=5))

    if len(rules) == 1:
        iface = InterfaceSettings(names=list(rules[0].names), hooks=rules[0].hooks, xdp_mode=rules[0].xdp_mode)
    else:
        # AgentSettings holds one rule; with several, it gets every name with automatic
        # hooks and the per-rule choices live in interface_rules (see docs).
        iface = InterfaceSettings(names=[n for r in rules for n in r.names])
    settings = AgentSettings(
        interfaces=iface,
        datapath=DatapathSettings(flow_table_size=table, first_n=first_n, sample_rate=rate if sets.packets else 0,
                                  ringbuf_kib=ring),
        harvest=HarvestSettings(idle_timeout_s=idle, active_timeout_s=active, interval_s=scan),
        window=WindowSettings(packets=win_packets, seconds=win_seconds) if sets.windows else WindowSettings(),
        summary_interval_s=summary)
    if not errs.items:
        try:
            settings.validate()
            for rule in rules:
                rule.validate()
        except ConfigError as err:
            errs.add("spec", str(err))
    if errs.items:
        raise ConfigError("; ".join(errs.items))
    return AgentConfig(settings=settings, interface_rules=tuple(rules), features=sets, export=export,
                       enrichment=enrichment, node_selector=dict(selector))


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
    import yaml  # only the file check needs it

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


__all__ = ["AgentConfig", "check_file", "ExportSettings", "EnrichmentSettings", "FeatureSets", "parse_spec", "parse_agentconfig",
           "assign_interfaces", "rules_overlap", "selects_node", "ConfigError", "GROUP", "VERSION", "PLURAL", "KIND"]
