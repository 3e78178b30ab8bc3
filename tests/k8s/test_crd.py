"""The AgentConfig CRD: a structural schema; example resources validate against it (JSON
Schema with jsonschema, CEL rules with cel-python, defaults applied first as the API
server does); invalid examples fail where their header says; and the agent's own Python
validation agrees with the CRD on every example."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from xdpml.config import ConfigError
from xdpml.kube.agentconfig import parse_agentconfig

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "helm/xdpml/crds/agentconfig.yaml"
EXAMPLES = ROOT / "examples/agentconfig"


def crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict:
    (version,) = crd()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def examples(kind: str) -> list[Path]:
    found = sorted((EXAMPLES / kind).glob("*.yaml"))
    assert found, f"no {kind} examples"
    return found


def header(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path.name} has no '# {key}:' line")


# ---- a small model of what the API server does with the schema ------------------------
def apply_defaults(data, node: dict):
    """Structural defaulting: missing properties with a default get it, recursively (the
    default value itself is defaulted too), as kube-apiserver does before validation."""
    if isinstance(data, dict) and node.get("type") == "object":
        for key, sub in (node.get("properties") or {}).items():
            if key not in data and "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
            if key in data:
                data[key] = apply_defaults(data[key], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(data) - set(node.get("properties") or {}):
                data[key] = apply_defaults(data[key], extra)
    elif isinstance(data, list) and node.get("type") == "array":
        return [apply_defaults(item, node["items"]) for item in data]
    return data


def typed(data, node: dict):
    """JSON -> CEL values with the schema's types (type: number is a CEL double even
    when written as 5, as in the API server)."""
    t = node.get("type")
    if t == "object" and isinstance(data, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else {}
        return celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): typed(v, props.get(k, extra)) for k, v in data.items()}
        )
    if t == "array" and isinstance(data, list):
        return celpy.celtypes.ListType([typed(v, node.get("items", {})) for v in data])
    if t == "number" and isinstance(data, (int, float)) and not isinstance(data, bool):
        return celpy.celtypes.DoubleType(float(data))
    return celpy.json_to_cel(data)


@functools.cache
def _program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_failures(data, node: dict, path: str = "") -> list[str]:
    """Messages of every x-kubernetes-validations rule that is false on ``data``."""
    out = []
    for rule in node.get("x-kubernetes-validations") or []:
        result = _program(rule["rule"]).evaluate({"self": typed(data, node)})
        if isinstance(result, Exception) or not bool(result):
            out.append(f"{path}: {rule.get('message', rule['rule'])}")
    if isinstance(data, dict) and node.get("type") == "object":
        for key, sub in (node.get("properties") or {}).items():
            if key in data:
                out += cel_failures(data[key], sub, f"{path}.{key}")
    if isinstance(data, list) and node.get("type") == "array":
        for i, item in enumerate(data):
            out += cel_failures(item, node["items"], f"{path}[{i}]")
    return out


def schema_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def check_structural(node: dict, path: str = "") -> list[str]:
    """The rules of a structural schema that matter here: a type everywhere, no
    additionalProperties beside properties, defaults valid under their own schema."""
    problems = []
    if (
        "type" not in node
        and not node.get("x-kubernetes-int-or-string")
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{path or '<root>'}: no type")
    if "properties" in node and isinstance(node.get("additionalProperties"), dict):
        problems.append(f"{path}: properties and additionalProperties together")
    if "default" in node:
        errors = list(jsonschema.Draft7Validator(node).iter_errors(node["default"]))
        if errors:
            problems.append(f"{path}: default does not validate: {errors[0].message}")
    for key, sub in (node.get("properties") or {}).items():
        problems += check_structural(sub, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += check_structural(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        problems += check_structural(node["items"], f"{path}[]")
    return problems


# ---- tests --------------------------------------------------------------------------
def test_crd_manifest_is_a_valid_kubernetes_object():
    doc = crd()
    kubernetes_validate.validate(doc, "1.30", strict=True)
    assert (doc["spec"]["group"], doc["spec"]["names"]["kind"], doc["spec"]["scope"]) == (
        "xdpml.io",
        "AgentConfig",
        "Namespaced",
    )
    (version,) = doc["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}


def test_crd_schema_is_structural():
    assert check_structural(schema()) == []


def test_cel_rules_compile():
    env = celpy.Environment()
    count = 0

    def walk(node):
        nonlocal count
        for rule in node.get("x-kubernetes-validations") or []:
            env.compile(rule["rule"])
            count += 1
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        if "items" in node:
            walk(node["items"])

    walk(schema())
    assert count >= 8


@pytest.mark.parametrize("path", examples("valid"), ids=lambda p: p.name)
def test_valid_examples(path):
    obj = yaml.safe_load(path.read_text())
    assert schema_errors(obj) == []
    defaulted = apply_defaults(copy.deepcopy(obj), schema())
    assert schema_errors(defaulted) == []
    assert cel_failures(defaulted, schema()) == []
    cfg = parse_agentconfig(obj)
    assert cfg.name == obj["metadata"]["name"]


@pytest.mark.parametrize("path", examples("invalid"), ids=lambda p: p.name)
def test_invalid_examples(path):
    obj = yaml.safe_load(path.read_text())
    expect, hint = header(path, "expect"), header(path, "error")
    defaulted = apply_defaults(copy.deepcopy(obj), schema())
    errors = schema_errors(defaulted)
    cel = cel_failures(defaulted, schema()) if not errors else []
    if expect == "schema":
        assert errors, "the CRD schema should refuse this"
    elif expect == "cel":
        assert errors == [] and cel, "the schema passes and a CEL rule refuses"
        assert any(hint in m for m in cel), cel
    else:
        assert expect == "agent"
        assert errors == [] and cel == [], "only the agent's own validation can see this"
    # The agent refuses all of them, naming the problem.
    with pytest.raises(ConfigError) as info:
        parse_agentconfig(obj)
    assert hint in str(info.value)


def test_cel_rules_are_not_vacuous():
    """Each CEL rule is exercised false by some invalid example (else the rule or the
    examples are wrong)."""
    messages = set()

    def walk(node):
        for rule in node.get("x-kubernetes-validations") or []:
            messages.add(rule["message"])
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        if "items" in node:
            walk(node["items"])

    walk(schema())
    failed = set()
    for path in examples("invalid"):
        obj = apply_defaults(yaml.safe_load(path.read_text()), schema())
        if not schema_errors(obj):
            failed |= {m.split(": ", 1)[1] for m in cel_failures(obj, schema())}
    untested = (
        messages
        - failed
        - {"TLS files or names are set but tls.mode is 'disabled'", "tls.certFile and tls.keyFile go together"}
    )
    assert untested == set()


def test_tls_rules_by_cel_and_by_the_agent():
    base = yaml.safe_load((EXAMPLES / "valid/minimal.yaml").read_text())
    cases = [
        ({"mode": "disabled", "caFile": "/ca.pem"}, "tls.mode is 'disabled'"),
        ({"mode": "mtls", "certFile": "/c.pem"}, "certFile and tls.keyFile go together"),
        ({"mode": "tls", "keyFile": "/k.pem"}, "certFile and tls.keyFile go together"),
    ]
    for tls, hint in cases:
        obj = copy.deepcopy(base)
        obj["spec"]["collector"] = {"address": "c:1", "tls": tls}
        obj = apply_defaults(obj, schema())
        assert schema_errors(obj) == []
        assert any(hint in m for m in cel_failures(obj, schema())), tls
        with pytest.raises(ConfigError, match=hint.replace("'", ".")):
            parse_agentconfig(obj)


def test_full_example_maps_to_settings():
    cfg = parse_agentconfig(yaml.safe_load((EXAMPLES / "valid/full.yaml").read_text()))
    s = cfg.settings
    assert [(r.names, r.hooks, r.xdp_mode) for r in cfg.interface_rules] == [
        (["physical"], "xdp+tc", "native"),
        (["pod-veths"], "tc", "auto"),
    ]
    assert (s.interfaces.names, s.interfaces.hooks) == (["physical", "pod-veths"], "auto")
    assert (s.datapath.flow_table_size, s.datapath.first_n, s.datapath.sample_rate, s.datapath.ringbuf_kib) == (
        262144,
        16,
        1000,
        8192,
    )
    assert (s.harvest.idle_timeout_s, s.harvest.active_timeout_s, s.harvest.interval_s) == (60, 600, 0.5)
    assert s.harvest.record_per == "interface"
    assert (s.window.packets, s.window.seconds, s.summary_interval_s) == (100, 0, 10)
    assert (cfg.features.flows, cfg.features.windows, cfg.features.packets) == (True, True, True)
    e = cfg.export
    assert (e.collector_address, e.tls_mode, e.server_name) == (
        "xdpml-collector.xdpml.svc:50051",
        "mtls",
        "xdpml-collector.xdpml.svc",
    )
    assert (e.ca_file, e.cert_file, e.key_file) == (
        "/etc/xdpml/tls/xdpml-agent-tls/ca.crt",
        "/etc/xdpml/tls/xdpml-agent-tls/tls.crt",
        "/etc/xdpml/tls/xdpml-agent-tls/tls.key",
    )
    assert cfg.enrichment.labels == ("app", "app.kubernetes.io/name", "team")
    assert cfg.node_selector == {"node.kubernetes.io/instance-type": "gpu-large", "xdpml.io/enabled": "true"}


def test_minimal_example_gets_the_documented_defaults():
    cfg = parse_agentconfig(yaml.safe_load((EXAMPLES / "valid/minimal.yaml").read_text()))
    s = cfg.settings
    assert (s.datapath.first_n, s.datapath.sample_rate, s.datapath.flow_table_size) == (10, 0, 65536)
    assert (s.harvest.idle_timeout_s, s.harvest.active_timeout_s, s.harvest.record_per) == (120, 1800, "conversation")
    assert cfg.export.collector_address == "" and not cfg.features.windows
    # and the same defaults as the CRD's
    d = apply_defaults(yaml.safe_load((EXAMPLES / "valid/minimal.yaml").read_text()), schema())["spec"]
    assert d["interfaces"][0] == {"names": ["physical"], "hooks": "auto", "xdpMode": "auto"}
    assert d["summaryIntervalSeconds"] == s.summary_interval_s


def test_agent_defaults_equal_the_crd_defaults():
    """Empty sections: the agent's defaults and the CRD's defaulting give the same config."""
    spec = {
        "interfaces": [{"names": ["eth0"]}],
        "features": {},
        "sampling": {},
        "timeouts": {},
        "datapath": {},
        "enrichment": {},
        "collector": {"address": "c:50051", "tls": {}},
    }
    obj = {"apiVersion": "xdpml.io/v1alpha1", "kind": "AgentConfig", "metadata": {"name": "d"}, "spec": spec}
    defaulted = apply_defaults(copy.deepcopy(obj), schema())
    assert defaulted["spec"]["timeouts"] == {
        "idleSeconds": 120,
        "activeSeconds": 1800,
        "scanIntervalSeconds": 1,
        "earlyPackets": 10,
        "earlyMilliseconds": 500,
    }
    assert schema_errors(defaulted) == [] and cel_failures(defaulted, schema()) == []
    assert parse_agentconfig(obj) == parse_agentconfig(defaulted)


def test_check_file_reports_each_document(tmp_path):
    from xdpml.kube.agentconfig import check_file

    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(
        (EXAMPLES / "valid/minimal.yaml").read_text()
        + "\n---\n"
        + (EXAMPLES / "invalid/overlapping-rules.yaml").read_text()
        + "\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n"
    )
    (ok_name, ok), (bad_name, bad) = check_file(str(bundle))
    assert ok_name == "default" and ok.settings.interfaces.names == ["physical"]
    assert bad_name == "overlapping-rules" and isinstance(bad, ConfigError) and "overlap" in str(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        check_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        check_file(str(tmp_path / "bad.yaml"))
    (tmp_path / "none.yaml").write_text("kind: Pod\n")
    with pytest.raises(ConfigError, match="no AgentConfig"):
        check_file(str(tmp_path / "none.yaml"))


def test_packaged_crd_is_the_charts():
    """The validator reads a copy shipped in the package: it must be the chart's CRD."""
    from importlib import resources

    import xdpml.kube.agentconfig as ac

    packaged = resources.files(ac.__package__).joinpath(ac.CRD_RESOURCE).read_bytes()
    assert packaged == CRD_PATH.read_bytes(), "run: cp helm/xdpml/crds/agentconfig.yaml xdpml/kube/agentconfig-crd.yaml"
    assert ac.crd_schema().schema == schema()


def test_crd_enums_are_what_the_pipeline_accepts():
    from xdpml.config import HOOKS, XDP_MODES

    rule = schema()["properties"]["spec"]["properties"]["interfaces"]["items"]["properties"]
    assert tuple(rule["hooks"]["enum"]) == HOOKS and tuple(rule["xdpMode"]["enum"]) == XDP_MODES


def test_check_config_refuses_what_the_crd_refuses(tmp_path):
    """`xdpml check-config`: a bad label pair, and each kind of CRD refusal, one line each."""
    import subprocess
    import sys

    bundle = tmp_path / "bad.yaml"
    bundle.write_text(
        "\n---\n".join(
            (EXAMPLES / "invalid" / name).read_text()
            for name in (
                "node-selector-bad-value.yaml",
                "node-selector-bad-key.yaml",
                "bad-hook.yaml",
                "tc-with-xdp-mode.yaml",
            )
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "xdpml", "check-config", str(bundle)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and all(": INVALID: " in line for line in lines), lines
    assert (
        "node-selector-bad-value: INVALID: spec.nodeSelector[xdpml.io/pool]: 'gpu nodes' is not valid: A label value"
        in lines[0]
    )
    assert "node-selector-bad-key: INVALID: spec.nodeSelector: label keys are [prefix/]name" in lines[1]
    assert "spec.interfaces[0].hooks: must be one of auto, xdp, tc, xdp+tc, not" in lines[2]
    assert "spec.interfaces[0]: xdpMode has no effect with hooks 'tc'" in lines[3]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node and not isinstance(node[0], str):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def test_agent_and_crd_model_agree_on_mutated_specs():
    """Every field of the full example set to values of other types and out of range:
    the agent accepts exactly what this file's model of the API server accepts."""
    base = yaml.safe_load((EXAMPLES / "valid/full.yaml").read_text())
    crd_schema = schema()
    validator = jsonschema.Draft7Validator(crd_schema)
    tried = disagree = 0
    for path in _leaves(base["spec"]):
        for bad in ("x", -1, 0, 0.5, 10**9, True, [], {}, ["flows"]):
            obj = copy.deepcopy(base)
            parent = obj["spec"]
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = bad
            defaulted = apply_defaults(copy.deepcopy(obj), crd_schema)
            model_ok = validator.is_valid(defaulted) and not cel_failures(defaulted, crd_schema)
            try:
                parse_agentconfig(obj)
                agent_ok = True
            except ConfigError:
                agent_ok = False
            tried += 1
            disagree += model_ok != agent_ok
            assert model_ok == agent_ok, (path, bad)
    assert tried > 200 and disagree == 0
