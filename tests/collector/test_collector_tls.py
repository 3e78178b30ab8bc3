"""TLS and mTLS between exporter and collector, with certificates made in the test."""

import datetime as dt
import shutil
import time
from pathlib import Path

import pytest
from conftest import batch_with_ids
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter

from xdpml.wire.tls import ClientTls, ServerTls, TlsConfigError

NOW = dt.datetime.now(dt.UTC)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca, cn, *, dns=None, client=False, expired=False):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = (
        (NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1))
        if expired
        else (NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30))
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    )
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _write(d: Path, name: str, pair) -> tuple[str, str]:
    key, cert = pair
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = _ca("xdpml test CA"), _ca("some other CA")
    files = {
        "ca": _write(d, "ca", ca)[0],
        "other_ca": _write(d, "other_ca", other_ca)[0],
        "server": _write(d, "server", _leaf(ca, "collector", dns="collector.test")),
        "wrong_name": _write(d, "wrong_name", _leaf(ca, "collector", dns="elsewhere.test")),
        "expired": _write(d, "expired", _leaf(ca, "collector", dns="collector.test", expired=True)),
        "other_ca_server": _write(d, "other_ca_server", _leaf(other_ca, "collector", dns="collector.test")),
        "client": _write(d, "client", _leaf(ca, "agent-1", client=True)),
        "client2": _write(d, "client2", _leaf(ca, "agent-2", client=True)),
        "other_ca_client": _write(d, "other_ca_client", _leaf(other_ca, "agent-1", client=True)),
        "dir": d,
    }
    return files


def _export(port, tls, *, expect_ok: bool, rows=20) -> dict:
    ex = GrpcExporter(
        ExporterSettings(
            target=f"127.0.0.1:{port}", tls=tls, flush_age_s=0.01, backoff_initial_s=0.05, backoff_max_s=0.2
        )
    )
    ex.put(batch_with_ids(rows, 0))
    end = time.monotonic() + 5
    while time.monotonic() < end:
        st = ex.stats()
        if st["sent_rows"] == rows or (not expect_ok and st["stream_failures"] >= 2):
            break
        time.sleep(0.02)
    ex.close(0.2)
    st = ex.stats()
    st["last_error"] = ex.last_error
    return st


def _client(pki, *, ca="ca", cert=None, name="collector.test"):
    c = pki[cert] if cert else (None, None)
    return ClientTls(ca_file=pki[ca], cert_file=c[0], key_file=c[1], server_name=name)


def test_tls_works_with_the_right_ca_and_name(collector, pki):
    srv = collector(tls=ServerTls(*pki["server"]))
    assert _export(srv.port, _client(pki), expect_ok=True)["sent_rows"] == 20


def test_plaintext_client_refused_by_tls_server(collector, pki):
    srv = collector(tls=ServerTls(*pki["server"]))
    st = _export(srv.port, None, expect_ok=False)
    assert st["sent_rows"] == 0 and st["stream_failures"] >= 1 and srv.stats()["rows_received"] == 0


def test_tls_client_refused_by_plaintext_server(collector, pki):
    srv = collector()
    st = _export(srv.port, _client(pki), expect_ok=False)
    assert st["sent_rows"] == 0 and "UNAVAILABLE" in st["last_error"]


@pytest.mark.parametrize(
    "server, client_kw",
    [
        ("other_ca_server", {}),  # server signed by a CA the client does not trust
        ("server", {"ca": "other_ca"}),  # client trusts the wrong CA
        ("wrong_name", {}),  # certificate for another host name
        ("server", {"name": "not-the-collector.test"}),
        ("expired", {}),
    ],
)
def test_bad_server_certificates_refused(collector, pki, server, client_kw):
    srv = collector(tls=ServerTls(*pki[server]))
    st = _export(srv.port, _client(pki, **client_kw), expect_ok=False)
    assert st["sent_rows"] == 0 and "UNAVAILABLE" in st["last_error"] and srv.stats()["rows_received"] == 0


def test_mutual_tls(collector, pki):
    srv = collector(tls=ServerTls(*pki["server"], client_ca_file=pki["ca"]))
    assert _export(srv.port, _client(pki, cert="client"), expect_ok=True)["sent_rows"] == 20
    assert _export(srv.port, _client(pki), expect_ok=False)["sent_rows"] == 0  # no client certificate
    assert _export(srv.port, _client(pki, cert="other_ca_client"), expect_ok=False)["sent_rows"] == 0
    assert srv.stats()["rows_received"] == 20


def test_rotated_files_are_reloaded(collector, pki, tmp_path):
    # Server starts with an expired certificate; rotating the files in place fixes it
    # without a restart. The client starts trusting the wrong CA; fixing its file fixes it.
    cert, key = tmp_path / "srv.pem", tmp_path / "srv.key"
    shutil.copy(pki["expired"][0], cert)
    shutil.copy(pki["expired"][1], key)
    srv = collector(tls=ServerTls(str(cert), str(key)))
    assert _export(srv.port, _client(pki), expect_ok=False)["sent_rows"] == 0
    time.sleep(0.01)
    shutil.copy(pki["server"][0], cert)
    shutil.copy(pki["server"][1], key)
    assert _export(srv.port, _client(pki), expect_ok=True)["sent_rows"] == 20

    ca = tmp_path / "ca.pem"
    shutil.copy(pki["other_ca"], ca)
    ex = GrpcExporter(
        ExporterSettings(
            target=f"127.0.0.1:{srv.port}",
            flush_age_s=0.01,
            backoff_initial_s=0.05,
            backoff_max_s=0.1,
            tls=ClientTls(ca_file=str(ca), server_name="collector.test"),
        )
    )
    ex.put(batch_with_ids(7, 0))
    time.sleep(0.5)
    assert ex.stats()["sent_rows"] == 0
    shutil.copy(pki["ca"], ca)
    end = time.monotonic() + 5
    while ex.stats()["sent_rows"] < 7 and time.monotonic() < end:
        time.sleep(0.02)
    assert ex.close(1)["sent_rows"] == 7


def test_tls_configuration_errors(tmp_path, pki):
    with pytest.raises(TlsConfigError, match="together"):
        ClientTls(ca_file=pki["ca"], cert_file=pki["client"][0])
    with pytest.raises(TlsConfigError, match="cannot read"):
        ServerTls(str(tmp_path / "missing.pem"), pki["server"][1]).credentials()
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(TlsConfigError, match="not a PEM"):
        ClientTls(ca_file=str(tmp_path / "junk.pem")).credentials()


def test_only_the_agents_named_in_learn_from_teach_the_baseline(collector, pki, tmp_path):
    """--learn-from agent-1 over mTLS: agent-2's rows (attack-like, sent first) are not
    learned; agent-1's are, and the provenance names agent-1 only."""
    from xdpml.agent.export.synthetic import flow_batch
    from xdpml.collector.models import EmbeddedIsolationForest

    model = EmbeddedIsolationForest(state_dir=str(tmp_path), baseline_rows=300)
    srv = collector(tls=ServerTls(*pki["server"], client_ca_file=pki["ca"]), model=model, learn_from=("agent-1",))

    def send(cert, batch):
        ex = GrpcExporter(
            ExporterSettings(target=f"127.0.0.1:{srv.port}", tls=_client(pki, cert=cert), flush_age_s=0.01)
        )
        ex.put(batch)
        end = time.monotonic() + 20
        while ex.stats()["sent_rows"] < len(batch):
            assert time.monotonic() < end, ex.stats()
            time.sleep(0.02)
        ex.close(1)

    send("client2", flow_batch(400, kind="synflood", seed=1))
    assert not model.trained and srv.stats()["rows_unscored"] == 400
    send("client", flow_batch(300, seed=2))
    assert model.trained and model.provenance["agents"] == {"agent-1": 300} and model.provenance["rows"] == 300
    import json

    side = json.loads((tmp_path / "embedded-iforest.json").read_text())
    assert side["agents"] == {"agent-1": 300} and side["source"] == "live"
    assert (tmp_path / "embedded-iforest.joblib").stat().st_mode & 0o777 == 0o600
