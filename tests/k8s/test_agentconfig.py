"""Spec mapping details: runtime interface assignment, changed sections, error reporting."""

from __future__ import annotations

import pytest

from xdpml.config import ConfigError
from xdpml.kube.agentconfig import assign_interfaces, parse_spec, rules_overlap

pytestmark = pytest.mark.timeout(30)

BASE = {
    "interfaces": [
        {"names": ["physical"], "hooks": "xdp", "xdpMode": "native"},
        {"names": ["pod-veths"], "hooks": "tc"},
    ]
}


def test_assign_interfaces_by_kind_and_glob():
    rules = parse_spec(dict(BASE, interfaces=BASE["interfaces"] + [{"names": ["bond*"]}])).interface_rules
    got = assign_interfaces(rules, {"eth0": "physical", "lxc12ab": "pod-veth", "bond0": "other", "lo": "other"})
    assert got == {"eth0": 0, "lxc12ab": 1, "bond0": 2}


def test_assign_interfaces_refuses_an_interface_matching_two_rules():
    rules = parse_spec(dict(BASE, interfaces=BASE["interfaces"] + [{"names": ["eth*"]}])).interface_rules
    assert assign_interfaces(rules, {"eth0": "other"}) == {"eth0": 2}  # not physical: fine
    with pytest.raises(ConfigError, match="'eth0' matches interface rules 0 and 2"):
        assign_interfaces(rules, {"eth0": "physical"})


def test_static_overlaps():
    assert rules_overlap(["eth0"], ["eth0"]) == "both list 'eth0'"
    assert "match the same names" in rules_overlap(["ens*"], ["ens3"])
    assert "match the same names" in rules_overlap(["ens[0-9]"], ["ens5"])
    assert rules_overlap(["physical"], ["eth*"]) == ""  # decided at assignment time
    assert rules_overlap(["eth*"], ["ens*"]) == ""


def test_changed_sections():
    a = parse_spec(BASE)
    assert a.changed_sections(None) == {
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
    assert parse_spec(BASE).changed_sections(a) == set()
    cases = {
        "datapath": {"datapath": {"flowTableSize": 2048}},
        "datapath ": {"datapath": {"tunnels": {"gre": False}}},  # compiled in: recompile
        "export": {"collector": {"address": "c:1"}},
        "enrichment": {"enrichment": {"labels": ["app"]}},
        "summary": {"summaryIntervalSeconds": 0},
        "harvest": {"timeouts": {"scanIntervalSeconds": 2}},
        "enforcement": {"enforcement": {"mode": "enforce"}},
        "model": {"model": {"file": "/models/tree.joblib"}},
    }
    for section, extra in cases.items():
        assert parse_spec(dict(BASE, **extra)).changed_sections(a) == {section.strip()}, section
    # one record per interface instead of per conversation: a harvest change, applied live
    assert parse_spec(dict(BASE, features={"recordPer": "interface"})).changed_sections(a) == {"harvest"}
    both = parse_spec(dict(BASE, features={"sets": ["flows", "windows"], "window": {"seconds": 1}}))
    assert both.changed_sections(a) == {"features", "window"}  # both restart the datapath (window stream on)
    for enf in ({"maxRules": 7}, {"allow": ["10.0.0.0/8"]}, {"namespacePolicy": [{"namespace": "a", "actions": []}]}):
        assert parse_spec(dict(BASE, enforcement=enf)).changed_sections(a) == {"enforcement"}, enf


def test_enforcement_fields():
    c = parse_spec(
        dict(
            BASE,
            enforcement={
                "mode": "off",
                "maxRules": 10,
                "maxInstallsPerSecond": 2.5,
                "maxRuleTTLSeconds": 120,
                "ruleTTLSeconds": 30,
                "allow": ["10.1.0.0/16", "fd00::1"],
                "namespacePolicy": [{"namespace": "shop", "actions": ["rate-limit"]}],
                "followApiServer": False,
            },
        )
    )
    e, lim = c.enforcement, c.settings.enforce
    assert (e.mode, e.allow, e.namespace_policy, e.follow_api_server) == (
        "off",
        ("10.1.0.0/16", "fd00::1"),
        (("shop", ("rate-limit",)),),
        False,
    )
    assert (lim.max_rules, lim.max_installs_per_s, lim.max_ttl_s, lim.default_ttl_s) == (10, 2.5, 120.0, 30.0)
    d = parse_spec(BASE)
    assert (d.enforcement.mode, d.enforcement.follow_api_server, d.settings.enforce.max_rules) == (
        "dry-run",
        True,
        4096,
    )
    for bad, text in (
        ({"mode": False}, "spec.enforcement.mode"),  # a bare YAML off
        ({"allow": ["10.0.0.0/99"]}, "spec.enforcement.allow[0]"),
        ({"maxRules": 20000}, "spec.enforcement.maxRules"),
        ({"namespacePolicy": [{"namespace": "a", "actions": ["nuke"]}]}, "spec.enforcement.namespacePolicy"),
        ({"namespacePolicy": [{"namespace": "a", "actions": []}, {"namespace": "a", "actions": []}]}, "twice"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_spec(dict(BASE, enforcement=bad))
        assert text in str(info.value), (bad, str(info.value))


def test_every_problem_reported_with_its_path():
    with pytest.raises(ConfigError) as info:
        parse_spec(
            {
                "interfaces": [{"names": ["eth0"], "hookz": "xdp"}],
                "timeouts": {"idleSeconds": "soon"},
                "datapath": {"flowTableSize": 10},
                "enrichment": {"labels": ["Bad Key"]},
            }
        )
    text = str(info.value)
    for expected in (
        "spec.interfaces[0].hookz: unknown field",
        "spec.timeouts.idleSeconds: must be a number",
        "spec.datapath.flowTableSize: must be 1024..16777216, not 10",
        "spec.enrichment.labels[0]",
    ):
        assert expected in text, (expected, text)
    with pytest.raises(ConfigError, match="spec: must be an object"):
        parse_spec(None)
    with pytest.raises(ConfigError, match=r"spec.interfaces: must have 1\.\.16 items, not 0"):
        parse_spec({"interfaces": []})


def test_export_settings_feed_the_exporter():
    from xdpml.agent.export.grpc_client import ExporterSettings

    cfg = parse_spec(
        dict(
            BASE,
            collector={
                "address": "collector.xdpml:50051",
                "tls": {"mode": "mtls", "secretName": "agent-tls", "serverName": "collector"},
            },
        )
    )
    settings = ExporterSettings(**cfg.export.exporter_kwargs())
    assert settings.target == "collector.xdpml:50051"
    assert (settings.tls.ca_file, settings.tls.cert_file, settings.tls.key_file, settings.tls.server_name) == (
        "/etc/xdpml/tls/agent-tls/ca.crt",
        "/etc/xdpml/tls/agent-tls/tls.crt",
        "/etc/xdpml/tls/agent-tls/tls.key",
        "collector",
    )
    plain = parse_spec(dict(BASE, collector={"address": "[fd00::1]:50051"})).export.exporter_kwargs()
    assert plain == {"target": "[fd00::1]:50051", "tls": None}
    server_only = parse_spec(dict(BASE, collector={"address": "c:1", "tls": {"mode": "tls"}})).export
    tls = server_only.exporter_kwargs()["tls"]
    assert (tls.ca_file, tls.cert_file) == (None, None)  # system roots, no client certificate


def test_tunnel_settings_from_the_spec():
    from xdpml.config import TunnelSettings

    assert parse_spec(BASE).settings.tunnels == TunnelSettings()  # every kind on, depth 1
    t = parse_spec(
        dict(
            BASE,
            datapath={
                "tunnels": {
                    "vxlan": False,
                    "esp": False,
                    "maxDepth": 3,
                    "vxlanPorts": [4789, 4790, 8472],
                    "genevePort": 6082,
                    "espNatTPort": 0,
                }
            },
        )
    ).settings.tunnels
    assert (t.vxlan, t.geneve, t.esp, t.max_depth, t.vxlan_ports, t.geneve_port, t.esp_natt_port) == (
        False,
        True,
        False,
        3,
        [4789, 4790, 8472],
        6082,
        0,
    )
    assert "-DXDPML_DECAP_VXLAN=0" in t.cflags() and "-DXDPML_VXLAN_PORT3=8472" in t.cflags()
    assert "-DXDPML_VXLAN_PORT4=0" in t.cflags() and "-DXDPML_TUNNEL_MAX_DEPTH=3" in t.cflags()
    with pytest.raises(ConfigError) as info:
        parse_spec(dict(BASE, datapath={"tunnels": {"maxDepth": 5, "vxlanPorts": [], "gtpuPort": 0, "bogus": 1}}))
    text = str(info.value)
    for expected in (
        "spec.datapath.tunnels.maxDepth: must be 1..4, not 5",
        "spec.datapath.tunnels.vxlanPorts",
        "spec.datapath.tunnels.gtpuPort",
        "spec.datapath.tunnels.bogus: unknown field",
    ):
        assert expected in text, (expected, text)


def test_model_section():
    m = parse_spec(dict(BASE, model={"file": "/etc/xdpml/model/tree.joblib", "features": ["dst_port", "ip_ttl"]}))
    assert (m.settings.model.file, m.settings.model.features) == (
        "/etc/xdpml/model/tree.joblib",
        ["dst_port", "ip_ttl"],
    )
    assert m.settings.model.enabled and not parse_spec(BASE).settings.model.enabled
    with pytest.raises(ConfigError, match="model.file"):
        parse_spec(dict(BASE, model={"file": "relative/tree.joblib"}))
    with pytest.raises(ConfigError, match="model.file"):
        parse_spec(dict(BASE, model={"file": "/m/tree.txt"}))
    assert parse_spec(dict(BASE, model={"file": "/m/tree.onnx"})).settings.model.file == "/m/tree.onnx"


def test_model_actions_decisions_and_flow_k():
    from xdpml.config import ModelSettings

    d = parse_spec(BASE).settings.model
    want = ModelSettings()
    assert (d.actions, d.decisions_file, d.sample_every, d.flow_k) == ({}, "", 100, 4)  # CRD defaults
    assert (want.actions, want.decisions_file, want.sample_every, want.flow_k) == ({}, "", 100, 4)  # = the agent's
    m = parse_spec(
        dict(
            BASE,
            model={
                "file": "/m/tree.joblib",
                "actions": {"0": "alert", "1": "drop", "attack": "rate-limit:500:50"},
                "decisionsFile": "/var/log/xdpml/decisions.jsonl",
                "decisionSampleEvery": 10,
                "flowPackets": 6,
            },
        )
    ).settings.model
    assert m.actions == {"0": "alert", "1": "drop", "attack": "rate-limit:500:50"}
    assert (m.decisions_file, m.sample_every, m.flow_k) == ("/var/log/xdpml/decisions.jsonl", 10, 6)
    for bad, field in (
        ({"actions": {"1": "block"}}, "model.actions"),
        ({"actions": {"1": "rate-limit:0"}}, "model.actions"),
        ({"actions": {"1": "rate-limit"}}, "model.actions"),
        ({"decisionsFile": "rel.jsonl"}, "model.decisionsFile"),
        ({"decisionSampleEvery": 0}, "model.decisionSampleEvery"),
        ({"flowPackets": 0}, "model.flowPackets"),
    ):
        with pytest.raises(ConfigError, match=field):
            parse_spec(dict(BASE, model=bad))
    base = parse_spec(BASE)
    # actions and the decision sampling are applied live; k is compiled in
    assert parse_spec(dict(BASE, model={"actions": {"1": "drop"}})).changed_sections(base) == {"model"}
    assert parse_spec(dict(BASE, model={"decisionSampleEvery": 5})).changed_sections(base) == {"model"}
    assert parse_spec(dict(BASE, model={"flowPackets": 8})).changed_sections(base) == {"model", "datapath"}


def test_early_export_fields():
    d = parse_spec(BASE).settings.harvest
    assert (d.early_packets, d.early_ms) == (10, 500.0)  # the CRD's defaults = the agent's
    from xdpml.config import HarvestSettings

    assert (HarvestSettings().early_packets, HarvestSettings().early_ms) == (10, 500.0)
    c = parse_spec(dict(BASE, timeouts={"earlyPackets": 3, "earlyMilliseconds": 0}))
    assert (c.settings.harvest.early_packets, c.settings.harvest.early_ms) == (3, 0.0)
    # compiled into the programs: the datapath restarts
    assert c.changed_sections(parse_spec(BASE)) == {"harvest", "datapath"}
    with pytest.raises(ConfigError) as info:
        parse_spec(dict(BASE, timeouts={"earlyPackets": -1}))
    assert "spec.timeouts.earlyPackets" in str(info.value)
