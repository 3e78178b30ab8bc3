"""TLS and mutual-TLS credentials for gRPC, re-read when their files change.

Certificates in Kubernetes are mounted Secrets that cert-manager rotates in place;
both ends therefore watch the files' modification times instead of loading them once.
The client rebuilds its channel on the next (re)connection; the server answers each new
handshake with the current files (grpc.dynamic_ssl_server_credentials).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import grpc

from xdpml.errors import ConfigError

log = logging.getLogger(__name__)


class TlsConfigError(ConfigError):
    """A TLS file is missing, unreadable, or the combination makes no sense."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TlsConfigError(f"cannot read {what} {path!r}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {path!r} is not a PEM file")
    return data


def _mtimes(paths: list[str | None]) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p) if p else None
            out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass
class ClientTls:
    """Client side: ``ca_file`` verifies the collector; ``cert_file``+``key_file`` enable mTLS.

    ``server_name`` overrides the name checked against the collector's certificate
    (default: the host part of the target address).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsConfigError("client certificate and key must be given together")
        self._stamp: tuple | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        root = _read(self.ca_file, "CA certificate") if self.ca_file else None
        key = _read(self.key_file, "client key") if self.key_file else None
        chain = _read(self.cert_file, "client certificate") if self.cert_file else None
        self._stamp = _mtimes([self.ca_file, self.cert_file, self.key_file])
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def changed(self) -> bool:
        """True once the files differ from what the last credentials() call read."""
        return self._stamp is not None and _mtimes([self.ca_file, self.cert_file, self.key_file]) != self._stamp

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass
class ServerTls:
    """Server side: ``cert_file``+``key_file``; ``client_ca_file`` makes client certificates mandatory (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stamp: tuple | None = None

    def _config(self) -> grpc.ServerCertificateConfiguration:
        chain = _read(self.cert_file, "server certificate")
        key = _read(self.key_file, "server key")
        ca = _read(self.client_ca_file, "client CA certificate") if self.client_ca_file else None
        self._stamp = _mtimes([self.cert_file, self.key_file, self.client_ca_file])
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on every handshake: only re-read when a file changed.
        with self._lock:
            if _mtimes([self.cert_file, self.key_file, self.client_ca_file]) == self._stamp:
                return None
            try:
                cfg = self._config()
            except TlsConfigError as e:
                # Half-written rotation: keep serving the old certificate.
                log.warning("TLS files changed but cannot be loaded (%s); keeping the previous ones", e)
                return None
            log.info("reloaded TLS certificate %s", self.cert_file)
            return cfg

    def credentials(self) -> grpc.ServerCredentials:
        with self._lock:
            initial = self._config()
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=bool(self.client_ca_file)
        )
