"""The chart's security posture by default: mutual TLS between agents and collector with
certificates made at install (Helm-generated, or cert-manager), proven by a real TLS
handshake with the rendered certificates; a NetworkPolicy that admits only the agents
to the collector's gRPC port and only the scrapers to its metrics port."""

from __future__ import annotations

import base64
import socket
import ssl
import sys
import threading
from pathlib import Path

import helm_python as helm
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from grpc_fixtures import collector  # noqa: F401 - the pytest fixture (tests/ is on sys.path)
from test_chart import CHART, NAMESPACE, RELEASE, load_values, one, render

pytestmark = pytest.mark.timeout(120)

COLLECTOR = f"{RELEASE}-xdpml-collector"


def container(docs: list[dict], kind: str) -> dict:
    (c,) = one(docs, kind)["spec"]["template"]["spec"]["containers"]
    return c


def flag(c: dict, name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith(f"--{name}=")]
    return value


def secret_files(docs: list[dict], name: str) -> dict[str, bytes]:
    sec = one(docs, "Secret", name)
    assert sec["type"] == "kubernetes.io/tls"
    return {k: base64.b64decode(v) for k, v in sec["data"].items()}


def mounted_secret(docs: list[dict], kind: str, path: str) -> str:
    """Which Secret the file at ``path`` in the pod of ``kind`` comes from."""
    pod = one(docs, kind)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (m,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert "subPath" not in m and m.get("readOnly") is True  # whole directory: renewals reach the pod
    vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
    return vol["secret"]["secretName"]


def handshake(tmp_path: Path, server: dict[str, bytes], client: dict[str, bytes] | None, server_name: str) -> str:
    """A TLS 1.2+ handshake on loopback: the collector's side requires a client
    certificate signed by its ca.crt; the agent's side verifies ``server_name``.
    Returns "ok" or the client's SSL error."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for side, files in (("s", server), ("c", client or {})):
        for k, v in files.items():
            (tmp_path / f"{side}-{k}").write_bytes(v)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "s-tls.crt", tmp_path / "s-tls.key")
    sctx.load_verify_locations(tmp_path / "s-ca.crt")
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(tmp_path / "c-ca.crt")
    if client and "tls.crt" in client:
        cctx.load_cert_chain(tmp_path / "c-tls.crt", tmp_path / "c-tls.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve():
        conn, _ = listener.accept()
        try:
            with sctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"x")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc
        finally:
            listener.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with cctx.wrap_socket(raw, server_hostname=server_name) as tls:
                # TLS 1.3 reports a refused client certificate on the first read
                return "ok" if tls.recv(1) == b"x" and "peer" in seen else f"server: {seen.get('error')}"
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        t.join(timeout=30)


# ---- mutual TLS by default ----------------------------------------------------------


def test_mtls_by_default_with_helm_generated_certificates(tmp_path):
    docs = render()
    agent, col = container(docs, "DaemonSet"), container(docs, "Deployment")
    # every TLS file each side reads comes from the Secret the chart generated for it
    for c, kind, flags, secret in (
        (agent, "DaemonSet", ("tls-ca", "tls-cert", "tls-key"), "xdpml-agent-tls"),
        (col, "Deployment", ("tls-cert", "tls-key", "tls-client-ca"), "xdpml-collector-tls"),
    ):
        for f in flags:
            assert mounted_secret(docs, kind, flag(c, f)) == secret, (kind, f)
    ac = one(docs, "AgentConfig")
    assert ac["spec"]["collector"]["tls"] == {"mode": "mtls", "secretName": "xdpml-agent-tls"}

    server, client = secret_files(docs, "xdpml-collector-tls"), secret_files(docs, "xdpml-agent-tls")
    assert set(server) == set(client) == {"ca.crt", "tls.crt", "tls.key"}
    host = flag(agent, "collector").rsplit(":", 1)[0]
    assert host == f"{COLLECTOR}.{NAMESPACE}.svc"
    # the agents' certificate and CA against the collector's: a real handshake both ways
    assert handshake(tmp_path / "ok", server, client, host) == "ok"


def test_generated_pki_refuses_strangers(tmp_path):
    docs = render()
    server, client = secret_files(docs, "xdpml-collector-tls"), secret_files(docs, "xdpml-agent-tls")
    host = f"{COLLECTOR}.{NAMESPACE}.svc"
    # a client without a certificate
    no_cert = {"ca.crt": client["ca.crt"]}
    assert "certificate required" in handshake(tmp_path / "a", server, no_cert, host)
    # a client certificate from another install's CA (each render makes a new CA)
    other = secret_files(render(), "xdpml-agent-tls")
    assert other["ca.crt"] != client["ca.crt"]
    assert "unknown ca" in handshake(tmp_path / "b", server, {**other, "ca.crt": client["ca.crt"]}, host)
    # a name the collector's certificate does not carry
    assert "mismatch" in handshake(tmp_path / "c", server, client, "collector.elsewhere")


def test_generated_certificate_carries_the_server_name(tmp_path):
    docs = render({"tls": {"serverName": "collector.xdpml.internal"}})
    assert flag(container(docs, "DaemonSet"), "tls-server-name") == "collector.xdpml.internal"
    server, client = secret_files(docs, "xdpml-collector-tls"), secret_files(docs, "xdpml-agent-tls")
    assert handshake(tmp_path, server, client, "collector.xdpml.internal") == "ok"


def test_generation_needs_the_chart_collector():
    with pytest.raises(helm.HelmRenderError, match="tls.generate needs collector.enabled"):
        render({"collector": {"enabled": False}, "agent": {"collectorAddress": "c.example:50051"}})
    # with the operator's own Secrets it renders, and mounts them
    docs = render(
        {"collector": {"enabled": False}, "agent": {"collectorAddress": "c.example:50051"}, "tls": {"generate": False}}
    )
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert mounted_secret(docs, "DaemonSet", flag(container(docs, "DaemonSet"), "tls-cert")) == "xdpml-agent-tls"


def test_cert_manager_scenario():
    docs = render(load_values(CHART / "ci" / "certmanager-values.yaml"))
    assert not [d for d in docs if d["kind"] == "Secret"]  # cert-manager writes them
    certs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    ca, col, agent = certs[f"{RELEASE}-xdpml-ca"], certs[COLLECTOR], certs[f"{RELEASE}-xdpml-agent"]
    # self-signed root -> CA Issuer from its Secret -> the two leaf certificates
    assert ca["isCA"] is True and issuers[ca["issuerRef"]["name"]] == {"selfSigned": {}}
    ca_issuer = col["issuerRef"]["name"]
    assert agent["issuerRef"] == col["issuerRef"] == {"name": ca_issuer, "kind": "Issuer", "group": "cert-manager.io"}
    assert issuers[ca_issuer] == {"ca": {"secretName": ca["secretName"]}}
    # the leaves are the Secrets the pods mount, with the names and usages each side needs
    a, c = container(docs, "DaemonSet"), container(docs, "Deployment")
    assert mounted_secret(docs, "Deployment", flag(c, "tls-cert")) == col["secretName"]
    assert mounted_secret(docs, "Deployment", flag(c, "tls-client-ca")) == col["secretName"]
    assert mounted_secret(docs, "DaemonSet", flag(a, "tls-cert")) == agent["secretName"]
    assert "server auth" in col["usages"] and "client auth" in agent["usages"]
    assert flag(a, "tls-server-name") in col["dnsNames"]
    assert flag(a, "collector").rsplit(":", 1)[0] in col["dnsNames"]
    assert (col["duration"], col["renewBefore"]) == ("720h", "240h")
    assert col["privateKey"]["rotationPolicy"] == "Always"


def test_cert_manager_with_an_existing_issuer():
    ref = {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    docs = render({"tls": {"certManager": {"enabled": True, "issuerRef": ref}}})
    assert not [d for d in docs if d["kind"] == "Issuer"]
    certs = [d["spec"] for d in docs if d["kind"] == "Certificate"]
    assert len(certs) == 2 and all(c["issuerRef"] == ref for c in certs)


def test_cert_manager_for_an_external_collector_needs_its_issuer():
    external = {"collector": {"enabled": False}, "agent": {"collectorAddress": "c.example:50051"}}
    with pytest.raises(helm.HelmRenderError, match="needs tls.certManager.issuerRef"):
        render({**external, "tls": {"certManager": {"enabled": True}}})
    ref = {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    docs = render({**external, "tls": {"certManager": {"enabled": True, "issuerRef": ref}}})
    (cert,) = [d for d in docs if d["kind"] == "Certificate"]
    assert cert["metadata"]["name"] == f"{RELEASE}-xdpml-agent" and cert["spec"]["issuerRef"] == ref


def test_plaintext_only_on_request():
    docs = render(load_values(CHART / "ci" / "plaintext-values.yaml"))
    assert not [d for d in docs if d["kind"] in ("Secret", "Certificate")]
    for kind in ("DaemonSet", "Deployment"):
        assert not [a for a in container(docs, kind)["args"] if a.startswith("--tls")]
    assert "tls" not in one(docs, "AgentConfig")["spec"]["collector"]


def _as_mounted(docs: list[dict], kind: str, c: dict, root: Path) -> dict[str, str]:
    """The TLS flags of container ``c`` with each file written where its Secret is mounted
    (under ``root`` instead of /), as the kubelet would lay them out."""
    out = {}
    for a in c["args"]:
        if a.startswith("--tls-") and "=" in a and not a.startswith("--tls-server-name"):
            name, path = a[2:].split("=", 1)
            f = root / path.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(secret_files(docs, mounted_secret(docs, kind, path))[Path(path).name])
            out[name] = str(f)
    return out


def test_agent_exporter_and_collector_speak_mtls_with_the_rendered_files(collector, tmp_path):
    """The project's own gRPC collector and exporter, configured from the rendered flags
    and the generated Secrets' files: a batch goes through; an agent certificate from
    another install does not."""
    from grpc_fixtures import batch_with_ids
    from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter

    from xdpml.wire.tls import ClientTls, ServerTls

    docs = render()
    agent, col = container(docs, "DaemonSet"), container(docs, "Deployment")
    srv_files = _as_mounted(docs, "Deployment", col, tmp_path / "collector")
    srv = collector(
        tls=ServerTls(srv_files["tls-cert"], srv_files["tls-key"], client_ca_file=srv_files["tls-client-ca"])
    )
    host = flag(agent, "collector").rsplit(":", 1)[0]

    def export(files: dict[str, str], rows: int, wait_s: float) -> int:
        tls = ClientTls(
            ca_file=files["tls-ca"], cert_file=files["tls-cert"], key_file=files["tls-key"], server_name=host
        )
        ex = GrpcExporter(
            ExporterSettings(
                target=f"127.0.0.1:{srv.port}", tls=tls, flush_age_s=0.01, backoff_initial_s=0.05, backoff_max_s=0.2
            )
        )
        ex.put(batch_with_ids(rows, 0))
        return ex.close(wait_s)["sent_rows"]  # returns once every row is acknowledged

    assert export(_as_mounted(docs, "DaemonSet", agent, tmp_path / "agent"), 20, 60) == 20
    stranger = render()  # another install: another CA
    assert export(_as_mounted(stranger, "DaemonSet", container(stranger, "DaemonSet"), tmp_path / "other"), 5, 1) == 0
    assert srv.stats()["rows_received"] == 20


# ---- NetworkPolicy --------------------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    return set(selector["matchLabels"].items()) <= set(labels.items()) and not selector.get("matchExpressions")


def rules_by_port(np: dict) -> dict[int, list[dict]]:
    out = {}
    for rule in np["spec"]["ingress"]:
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP"
        # an empty or missing `from` admits every source: never rendered
        assert rule.get("from"), rule
        out[port["port"]] = rule["from"]
    return out


def test_network_policy_admits_only_agents_and_scrapers():
    docs = render()
    np = one(docs, "NetworkPolicy", COLLECTOR)
    col_pod = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    agent_pod = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    assert selects(np["spec"]["podSelector"], col_pod) and not selects(np["spec"]["podSelector"], agent_pod)
    ports = rules_by_port(np)
    assert set(ports) == {50051, 9464}
    (peer,) = ports[50051]
    assert set(peer) == {"podSelector"} and selects(peer["podSelector"], agent_pod)
    assert not selects(peer["podSelector"], col_pod)
    assert ports[9464] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]


def test_network_policy_node_cidrs_and_no_scrapers():
    docs = render(load_values(CHART / "ci" / "plaintext-values.yaml"))
    ports = rules_by_port(one(docs, "NetworkPolicy"))
    assert set(ports) == {50051}  # no scrapers: the metrics port admits no one
    assert ports[50051][1:] == [{"ipBlock": {"cidr": "192.168.0.0/24"}}]
    ports = rules_by_port(one(render(load_values(CHART / "ci" / "certmanager-values.yaml")), "NetworkPolicy"))
    assert ports[50051][1:] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}, {"ipBlock": {"cidr": "fd00:10::/64"}}]


def test_network_policy_follows_ports_and_switches():
    custom = {
        "collector": {"port": 7000, "metrics": {"port": 7001}},
        "networkPolicy": {"scrapers": [{"ipBlock": {"cidr": "10.9.0.0/24"}}]},
    }
    ports = rules_by_port(one(render(custom), "NetworkPolicy"))
    assert set(ports) == {7000, 7001} and ports[7001] == [{"ipBlock": {"cidr": "10.9.0.0/24"}}]
    assert set(rules_by_port(one(render({"collector": {"metrics": {"enabled": False}}}), "NetworkPolicy"))) == {50051}
    assert not [d for d in render({"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]
    assert "WARNING: networkPolicy.agentNodeCIDRs is empty" in _notes({})
    assert "WARNING" not in _notes({"networkPolicy": {"agentNodeCIDRs": ["10.0.0.0/8"]}})


def _notes(values: dict) -> str:
    from test_chart import notes

    return notes(values)


# ---- the agent's endpoints bind the pod IP ------------------------------------------


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) in container args, as the kubelet expands it (only variables the
    container's env defines; anything else is left as written)."""
    import re

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def test_agent_endpoints_bind_the_pod_ip_and_probes_reach_them():
    import urllib.request

    from xdpml.cli import _health, build_parser, check_agent_args

    docs = render()
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    c = container(docs, "DaemonSet")
    assert pod["hostNetwork"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # the kubelet probes the pod IP (no host set) on the named port the agent serves
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "host" not in c[probe]["httpGet"] and c[probe]["httpGet"]["port"] == "health"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    # 127.0.0.2 stands for the node's address: a loopback address that is not 127.0.0.1
    pod_ip = "127.0.0.2"
    args = build_parser().parse_args([kubelet_expand(a, {"POD_IP": pod_ip}) for a in c["args"]])
    check_agent_args(args)
    assert args.bind_address == pod_ip and args.health_port == ports["health"]
    assert args.metrics_port == ports["metrics"]
    # unexpanded (POD_IP missing from env), the agent refuses in one line rather than bind 0.0.0.0
    raw = build_parser().parse_args(c["args"])
    with pytest.raises(Exception, match=r"--bind-address '\$\(POD_IP\)' is not an IP address"):
        check_agent_args(raw)

    # the real health server the agent starts from these arguments: answers on the pod
    # IP, and nowhere else (127.0.0.1 stands for every other address of the node)
    args.health_port = 0
    health = _health(args, conditions=())
    try:
        port = health.port
        with urllib.request.urlopen(f"http://{pod_ip}:{port}/livez", timeout=30) as r:
            assert r.status == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=30).close()
    finally:
        health.close()


# ---- the collector scores, with a baseline the operator chose, and stores rows -------


def test_collector_learns_from_authenticated_agents_by_default():
    docs = render()
    col = container(docs, "Deployment")
    assert flag(col, "learn-from") == "authenticated"
    assert not [a for a in col["args"] if a.startswith("--baseline")]
    # "authenticated" means a client certificate verified against this CA: mTLS is on
    assert mounted_secret(docs, "Deployment", flag(col, "tls-client-ca")) == "xdpml-collector-tls"
    # scored rows in a subdirectory of the data volume (an emptyDir unless a claim is named)
    assert flag(col, "parquet") == "/var/lib/xdpml/scored/flows.parquet"
    assert not [a for a in col["args"] if a.startswith("--jsonl")]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data == {"name": "data", "emptyDir": {}}
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


def test_learning_from_authenticated_without_mtls_is_refused():
    with pytest.raises(Exception, match="learnFrom=authenticated needs tls.enabled and tls.mutual"):
        render({"tls": {"mutual": False}})
    # without TLS an operator must say so: a pinned baseline, or "any" (a lab)
    col = container(render(load_values(CHART / "ci" / "plaintext-values.yaml")), "Deployment")
    assert flag(col, "learn-from") == "any"


def test_pinned_baseline_and_created_claim(tmp_path):
    from xdpml.cli import build_parser

    docs = render(load_values(CHART / "ci" / "baseline-values.yaml"))
    col = container(docs, "Deployment")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert flag(col, "baseline") == "/etc/xdpml/baseline/baseline.joblib"
    assert not [a for a in col["args"] if a.startswith("--learn-from")]  # pinned: nobody teaches it
    vols = {v["name"]: v for v in pod["volumes"]}
    mnt = {m["mountPath"]: m for m in col["volumeMounts"]}
    assert mnt["/etc/xdpml/baseline"]["readOnly"] is True
    assert vols[mnt["/etc/xdpml/baseline"]["name"]]["configMap"]["name"] == "xdpml-baseline"
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert vols[mnt["/var/lib/xdpml"]["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    a = build_parser().parse_args(col["args"])
    assert a.parquet == "/var/lib/xdpml/scored/flows.parquet" and a.jsonl == "/var/lib/xdpml/scored/flows.jsonl"
    # a baseline from an existing claim instead
    docs = render({"collector": {"baseline": {"existingClaim": "baselines", "key": "b.joblib"}}})
    col = container(docs, "Deployment")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (v,) = [v for v in pod["volumes"] if v["name"] == "baseline"]
    assert v["persistentVolumeClaim"] == {"claimName": "baselines", "readOnly": True}
    assert flag(col, "baseline") == "/etc/xdpml/baseline/b.joblib"


def test_collector_accepts_the_rendered_output_directory(tmp_path):
    """The collector's own output check on the volume as Kubernetes lays it out with
    fsGroup (the volume root group-writable and setgid): it creates scored/ 0700 and
    accepts it; the volume root itself would also pass, /tmp-like directories not."""
    import os
    import stat

    from xdpml.collector.sinks import check_output_path

    from xdpml.errors import OutputError

    col = container(render(), "Deployment")
    parquet = flag(col, "parquet")
    rel = os.path.relpath(parquet, "/var/lib/xdpml")
    vol = tmp_path / "vol"
    vol.mkdir()
    vol.chmod(0o2775)
    check_output_path(str(vol / rel))
    made = vol / os.path.dirname(rel)
    assert stat.S_IMODE(made.stat().st_mode) & 0o777 == 0o700  # (setgid kept from the volume root)
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with pytest.raises(OutputError, match="writable by every user"):
        check_output_path(str(sticky / "flows.parquet"))
