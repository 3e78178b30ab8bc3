"""helm/xdpml: lint, render and validate, with Helm's own Go SDK (helm-python-sdk).

Every scenario under helm/xdpml/ci/ and the defaults are linted and rendered; every
rendered Kubernetes object is validated by kubernetes-validate (strict: unknown fields
fail) for a recent Kubernetes; custom resources are validated against their CRD
schemas. The security-relevant parts of the agent's pod and the RBAC rules are pinned
exactly, so a loosening shows up as a test failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "xdpml"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSION = "1.34"
RELEASE, NAMESPACE = "demo", "netobs"


def load_values(path: Path | None) -> dict:
    return {} if path is None else yaml.safe_load(path.read_text()) or {}


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def scenario_id(p: Path | None) -> str:
    return "defaults" if p is None else p.name


ALL = [None, *SCENARIOS]


def test_scenarios_exist():
    names = {p.name for p in SCENARIOS}
    assert {
        "tls-values.yaml",
        "privileged-values.yaml",
        "servicemonitor-values.yaml",
        "external-collector-values.yaml",
        "certmanager-values.yaml",
        "plaintext-values.yaml",
    } <= names


@pytest.mark.parametrize("scenario", ALL, ids=scenario_id)
def test_lint_strict_clean(scenario):
    report = helm.lint(CHART, load_values(scenario), strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSION}.0")
    assert report["errors"] == []
    # severity 1 (info, e.g. "icon is recommended") is advice; 2 warning, 3 error are not ok
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# ---- validation of every rendered object ------------------------------------------


def _crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema from the chart's crds/ directory."""
    out = {}
    for f in sorted((CHART / "crds").glob("*.y*ml")) if (CHART / "crds").is_dir() else []:
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


# The Prometheus Operator's CRD is not ours to ship; this is the part of its
# monitoring.coreos.com/v1 ServiceMonitor schema that the chart uses, strict.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                            },
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                        "targetLabel": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# cert-manager's CRDs are not ours to ship either: the cert-manager.io/v1 Issuer and
# Certificate fields the chart uses, strict.
_ISSUER_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"type": "string"},
    },
}
CERT_MANAGER_SCHEMAS = {
    "Issuer": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "maxProperties": 1,
                "properties": {
                    "selfSigned": {"type": "object", "additionalProperties": False},
                    "ca": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["secretName"],
                        "properties": {"secretName": {"type": "string"}},
                    },
                },
            },
        },
    },
    "Certificate": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["secretName", "issuerRef"],
                "properties": {
                    "secretName": {"type": "string"},
                    "commonName": {"type": "string", "maxLength": 64},
                    "isCA": {"type": "boolean"},
                    "dnsNames": {"type": "array", "items": {"type": "string"}},
                    "duration": {"type": "string"},
                    "renewBefore": {"type": "string"},
                    "usages": {
                        "type": "array",
                        "items": {
                            "enum": ["digital signature", "key encipherment", "server auth", "client auth", "cert sign"]
                        },
                    },
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                    "issuerRef": _ISSUER_REF,
                },
            },
        },
    },
}


@pytest.mark.parametrize("scenario", ALL, ids=scenario_id)
def test_every_rendered_object_validates(scenario):
    docs = render(load_values(scenario))
    assert docs
    for d in docs:
        api, kind = d["apiVersion"], d["kind"]
        ident = f"{kind}/{d['metadata']['name']}"
        if kind == "ServiceMonitor":
            jsonschema.validate(d, SERVICEMONITOR_SCHEMA)
        elif api.startswith("cert-manager.io/"):
            jsonschema.validate(d, CERT_MANAGER_SCHEMAS[kind])
        elif api.startswith("xdpml.io/"):
            # validated against the CRD in test_agentconfig_validates_against_crd
            assert (api, kind) == ("xdpml.io/v1alpha1", "AgentConfig"), ident
        else:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{ident} ({scenario_id(scenario)}): {'.'.join(map(str, e.path))}: {e.message}")
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        if kind not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == NAMESPACE, ident


@pytest.mark.parametrize("scenario", ALL, ids=scenario_id)
def test_agentconfig_validates_against_crd_and_agent_parser(scenario):
    """The chart's AgentConfig passes the CRD's structural schema and the agent's own
    parser, and the TLS files that parser derives are exactly the files the DaemonSet
    mounts."""
    from xdpml.kube.agentconfig import parse_spec

    values = load_values(scenario)
    docs = render(values)
    acs = [d for d in docs if d["kind"] == "AgentConfig"]
    if not acs:
        assert not (values.get("agentConfig") or {}).get("create", True)
        return
    (ac,) = acs
    crds = _crd_schemas()
    assert ("xdpml.io/v1alpha1", "AgentConfig") in crds, "helm/xdpml/crds has no AgentConfig CRD"
    jsonschema.validate(ac, crds[("xdpml.io/v1alpha1", "AgentConfig")])
    cfg = parse_spec(ac["spec"])
    ds = [d for d in docs if d["kind"] == "DaemonSet"]
    if not ds:
        return
    pod = ds[0]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    collector_arg = next(a for a in c["args"] if a.startswith("--collector="))
    assert cfg.export.collector_address == collector_arg.split("=", 1)[1]
    tls_mount = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls"]
    if cfg.export.tls_mode == "disabled":
        assert not tls_mount
    else:
        (root,) = tls_mount
        assert cfg.export.ca_file == f"{root}/ca.crt"
        assert f"--tls-ca={cfg.export.ca_file}" in c["args"]
        if cfg.export.tls_mode == "mtls":
            assert (cfg.export.cert_file, cfg.export.key_file) == (f"{root}/tls.crt", f"{root}/tls.key")


def test_agentconfig_user_collector_wins():
    spec = {"interfaces": [{"names": ["eth0"]}], "collector": {"address": "elsewhere:50051"}}
    (ac,) = [d for d in render({"agentConfig": {"spec": spec}}) if d["kind"] == "AgentConfig"]
    assert ac["spec"]["collector"] == {"address": "elsewhere:50051"}
    assert ac["metadata"]["name"] == "default" and ac["metadata"]["namespace"] == NAMESPACE


def test_validator_catches_a_broken_object():
    """The validation above can fail: a misspelled field in a rendered object is caught."""
    ds = one(render(), "DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


# ---- agent DaemonSet security properties ------------------------------------------


def agent_pod(values: dict | None = None) -> tuple[dict, dict]:
    ds = one(render(values), "DaemonSet", f"{RELEASE}-xdpml-agent")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def mounts(container: dict, pod: dict) -> dict[str, tuple[str, bool]]:
    """mountPath -> (hostPath or '', readOnly)."""
    vols = {v["name"]: v for v in pod["volumes"]}
    return {
        m["mountPath"]: (vols[m["name"]].get("hostPath", {}).get("path", ""), m.get("readOnly", False))
        for m in container["volumeMounts"]
    }


def test_agent_defaults_least_privilege():
    pod, c = agent_pod()
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["terminationGracePeriodSeconds"] == 60
    # every host path is mounted read-only, and only these, but the BPF filesystem
    # (pinned rule maps: rules survive an agent restart)
    host = {p: v for p, v in mounts(c, pod).items() if v[0]}
    assert host == {
        "/lib/modules": ("/lib/modules", True),
        "/usr/src": ("/usr/src", True),
        "/sys/fs/bpf": ("/sys/fs/bpf", False),
    }
    (bpffs,) = [v for v in pod["volumes"] if v["name"] == "bpffs"]
    assert bpffs["hostPath"] == {"path": "/sys/fs/bpf", "type": "Directory"}
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # the address the health and metrics endpoints are to bind (the node's, not 0.0.0.0)
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8081, "metrics": 9464}
    # --log-format belongs to `xdpml` itself, so it comes before the subcommand
    tls = "/etc/xdpml/tls/xdpml-agent-tls"
    assert c["args"] == [
        "--log-format=text",
        "agent",
        "--kubernetes",
        "--config-name=default",
        f"--collector={RELEASE}-xdpml-collector.{NAMESPACE}.svc:50051",
        "--health-port=8081",
        "--bind-address=$(POD_IP)",
        "--metrics-port=9464",
        f"--tls-ca={tls}/ca.crt",
        f"--tls-cert={tls}/tls.crt",
        f"--tls-key={tls}/tls.key",
    ]
    # the shell wrapper must hand over with exec so SIGTERM reaches the agent
    assert c["command"][:2] == ["/bin/sh", "-c"] and 'exec xdpml "$@"' in c["command"][2]
    assert "--check-only" in c["command"][2]


def test_agent_sys_resource_only_on_request():
    _, c = agent_pod({"agent": {"capabilities": {"sysResource": True, "extra": ["SYS_PTRACE"]}}})
    assert c["securityContext"]["capabilities"]["add"] == ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE"]


def test_agent_privileged_scenario():
    pod, c = agent_pod(load_values(CHART / "ci" / "privileged-values.yaml"))
    sc = c["securityContext"]
    assert sc["privileged"] is True and "capabilities" not in sc
    assert "allowPrivilegeEscalation" not in sc  # the API rejects privileged with it false
    m = mounts(c, pod)
    assert "/lib/modules" not in m and "/usr/src" not in m  # the image's headers are linked instead
    assert sc["readOnlyRootFilesystem"] is False
    assert m["/sys/fs/bpf"] == ("/sys/fs/bpf", False)
    assert m["/sys/kernel/debug"] == ("/sys/kernel/debug", True)
    assert "--check-only" not in c["command"][2]
    assert pod["priorityClassName"] == "system-node-critical"


def test_tls_scenario_wires_secret_files():
    docs = render(load_values(CHART / "ci" / "tls-values.yaml"))
    assert not [d for d in docs if d["kind"] == "Secret"]  # tls.generate=false: the operator's Secrets
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    d = "/etc/xdpml/tls/xdpml-agent-tls"
    assert {
        f"--tls-ca={d}/ca.crt",
        f"--tls-cert={d}/tls.crt",
        f"--tls-key={d}/tls.key",
        "--tls-server-name=collector.xdpml.internal",
    } <= set(agent["args"])
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "xdpml-agent-tls"
    # whole-directory mount (no subPath) so renewed certificates reach the pod
    assert {"name": "tls", "mountPath": d, "readOnly": True} in agent["volumeMounts"]
    cpod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (col,) = cpod["containers"]
    d = "/etc/xdpml/tls/xdpml-collector-tls"
    assert {f"--tls-cert={d}/tls.crt", f"--tls-key={d}/tls.key", f"--tls-client-ca={d}/ca.crt"} <= set(col["args"])
    assert {v["name"]: v for v in cpod["volumes"]}["tls"]["secret"]["secretName"] == "xdpml-collector-tls"
    # kubelet gRPC probes cannot do TLS: tcp probes instead
    assert col["readinessProbe"]["tcpSocket"] == {"port": "grpc"}


def test_collector_runs_as_non_root_with_grpc_probes():
    dep = one(render(load_values(CHART / "ci" / "plaintext-values.yaml")), "Deployment", f"{RELEASE}-xdpml-collector")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["args"] == [
        "--log-format=text",
        "collector",
        "--listen=0.0.0.0:50051",
        "--state-dir=/var/lib/xdpml/state",
        "--learn-from=any",
        "--parquet=/var/lib/xdpml/scored/flows.parquet",
        "--metrics-port=9464",
    ]
    assert {"name": "data", "mountPath": "/var/lib/xdpml"} in c["volumeMounts"]
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert c["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    svc = one(render(), "Service", f"{RELEASE}-xdpml-collector")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # by default (mutual TLS) the same collector with TLS flags, and TCP probes
    (c,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    tls = "/etc/xdpml/tls/xdpml-collector-tls"
    assert c["args"] == [
        "--log-format=text",
        "collector",
        "--listen=0.0.0.0:50051",
        "--state-dir=/var/lib/xdpml/state",
        "--learn-from=authenticated",
        "--parquet=/var/lib/xdpml/scored/flows.parquet",
        "--metrics-port=9464",
        f"--tls-cert={tls}/tls.crt",
        f"--tls-key={tls}/tls.key",
        f"--tls-client-ca={tls}/ca.crt",
    ]
    assert c["readinessProbe"]["tcpSocket"] == {"port": "grpc"}


def test_external_collector_scenario():
    docs = render(load_values(CHART / "ci" / "external-collector-values.yaml"))
    assert not [d for d in docs if d["kind"] in ("Deployment", "AgentConfig")]
    _, c = agent_pod(load_values(CHART / "ci" / "external-collector-values.yaml"))
    assert "--collector=xdpml-collector.inference.svc.cluster.local:50051" in c["args"]
    assert "--config-name=edge-nodes" in c["args"]
    assert not any(a.startswith("--metrics-port") for a in c["args"])


def test_servicemonitors_select_the_metrics_services():
    docs = render(load_values(CHART / "ci" / "servicemonitor-values.yaml"))
    sms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(sms) == {f"{RELEASE}-xdpml-agent", f"{RELEASE}-xdpml-collector"}
    services = [d for d in docs if d["kind"] == "Service"]
    for sm in sms.values():
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1 and "metrics" in [p["name"] for p in matched[0]["spec"]["ports"]]
    _, c = agent_pod(load_values(CHART / "ci" / "servicemonitor-values.yaml"))
    assert c["args"][:3] == ["--log-format=json", "--verbose", "agent"]
    assert "--otlp-endpoint=http://otel-collector.monitoring.svc:4317" in c["args"]


# ---- RBAC ------------------------------------------------------------------------


def rules(doc: dict) -> set[tuple[str, str, tuple[str, ...]]]:
    return {
        (g, r, tuple(sorted(rule["verbs"])))
        for rule in doc["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }


def test_rbac_is_exactly_least_privilege():
    docs = render()
    cr = one(docs, "ClusterRole", f"{RELEASE}-xdpml-agent")
    assert rules(cr) == {
        ("", "pods", ("get", "list", "watch")),
        ("", "services", ("get", "list", "watch")),
        ("apps", "replicasets", ("get", "list", "watch")),
        ("batch", "jobs", ("get", "list", "watch")),
        ("", "events", ("create", "patch")),  # Events on pods whose traffic a rule drops
        ("", "endpoints", ("get",)),  # default/kubernetes only (below): the allowlist
    }
    (ep,) = [r for r in cr["rules"] if r["resources"] == ["endpoints"]]
    assert ep["resourceNames"] == ["kubernetes"]
    role = one(docs, "Role", f"{RELEASE}-xdpml-agent")
    assert rules(role) == {
        ("xdpml.io", "agentconfigs", ("get", "list", "watch")),
        ("xdpml.io", "agentconfigs/status", ("patch", "update")),
        ("", "events", ("create", "patch")),
    }
    for doc in (cr, role):
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert "resourceNames" not in rule or rule["resources"] in (["endpoints"], ["configmaps"])
    sa = f"{RELEASE}-xdpml-agent"
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        b = one(docs, kind)
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        assert b["roleRef"]["name"] == sa
    assert one(docs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa
    # the collector gets no RBAC at all
    assert not [
        d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding") and d["subjects"][0]["name"] != sa
    ]


def test_watch_nodes_adds_only_node_reads():
    cr = one(render({"rbac": {"watchNodes": True}}), "ClusterRole")
    assert ("", "nodes", ("get", "list", "watch")) in rules(cr) and len(rules(cr)) == 7


def test_model_configmaps_readable_by_name_only():
    # none by default: no ConfigMap in the release namespace is readable
    assert not [r for r in one(render(), "Role")["rules"] if "configmaps" in r["resources"]]
    values = {
        "rbac": {"modelConfigMaps": ["tree", "forest"]},
        "agentConfig": {"spec": {"model": {"configMap": {"name": "boost", "key": "boost.onnx"}}}},
    }
    role = one(render(values), "Role", f"{RELEASE}-xdpml-agent")
    assert role["metadata"]["namespace"] == NAMESPACE
    (cm,) = [r for r in role["rules"] if "configmaps" in r["resources"]]
    assert cm == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["tree", "forest", "boost"],
        "verbs": ["get", "list", "watch"],
    }
    assert not [r for r in one(render(values), "ClusterRole")["rules"] if "configmaps" in r["resources"]]
    # the AgentConfig's own name alone, listed once
    role = one(
        render({"rbac": {"modelConfigMaps": ["boost"]}, **{k: v for k, v in values.items() if k != "rbac"}}), "Role"
    )
    (cm,) = [r for r in role["rules"] if "configmaps" in r["resources"]]
    assert cm["resourceNames"] == ["boost"]


def test_rbac_off_renders_none():
    docs = render({"rbac": {"create": False}})
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io")]


# ---- values.schema.json ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"agent": {"privileged": "yes"}}, "/agent/privileged"),
        ({"agent": {"privilegd": True}}, "privilegd"),
        ({"agent": {"capabilities": {"extra": ["ALL"]}}}, "/agent/capabilities/extra/0"),
        ({"agent": {"health": {"port": 70000}}}, "/agent/health/port"),
        ({"agent": {"terminationGracePeriodSeconds": 2}}, "/agent/terminationGracePeriodSeconds"),
        ({"agent": {"seccompProfile": "Localhost"}}, "/agent/seccompProfile"),
        ({"agent": {"collectorAddress": "no-port"}}, "/agent/collectorAddress"),
        ({"agent": {"extraArgs": ["positional"]}}, "/agent/extraArgs/0"),
        ({"collector": {"enabled": False}}, "/agent/collectorAddress"),
        ({"tls": {"certManager": {"issuerRef": {"kind": "Bogus"}}}}, "/tls/certManager/issuerRef/kind"),
        ({"tls": {"validityDays": 0}}, "/tls/validityDays"),
        ({"networkPolicy": {"agentNodeCIDRs": ["10.0.0.0"]}}, "/networkPolicy/agentNodeCIDRs/0"),
        ({"networkPolicy": {"scrapers": [{}]}}, "/networkPolicy/scrapers/0"),
        ({"logging": {"format": "xml"}}, "/logging/format"),
        ({"logging": {"level": "trace"}}, "/logging/level"),
        ({"otlp": {"endpoint": "grpc://x:4317"}}, "/otlp/endpoint"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"unknownTopLevel": 1}, "unknownTopLevel"),
    ],
)
def test_schema_rejects_bad_values(bad, where):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)
    assert where in str(err.value)


def test_schema_accepts_defaults_and_every_scenario():
    with helm.Chart.load(CHART) as chart:
        assert json.loads((CHART / "values.schema.json").read_text()) == chart.schema
        for s in ALL:
            chart.validate_schema(chart.merge_values(load_values(s)))


def test_notes_render():
    text = notes()
    assert f"rollout status daemonset/{RELEASE}-xdpml-agent" in text
    assert "not privileged; capabilities BPF, NET_ADMIN, PERFMON." in text
    assert "WARNING: agent.privileged=true" in notes({"agent": {"privileged": True}})


# ---- the rendered commands against the real CLI parser ------------------------------


@pytest.mark.parametrize("scenario", ALL, ids=scenario_id)
def test_rendered_commands_parse_with_the_cli(scenario):
    from xdpml.cli import build_parser

    docs = render(load_values(scenario))
    for kind in ("DaemonSet", "Deployment"):
        for d in docs:
            if d["kind"] != kind:
                continue
            (c,) = d["spec"]["template"]["spec"]["containers"]
            try:
                build_parser().parse_args(c["args"])
            except SystemExit:
                pytest.fail(f"{kind} args do not parse: {c['args']}")
