"""Local sinks: JSON lines to a file or stdout, and a Unix socket.

A sink takes ColumnBatch objects. Each JSON line is one record with a leading
"record" field ("flow", "window" or "packet"), IPs as text, sequences as lists,
undefined statistics as null. Files are created 0600 and sockets are only used when
other users cannot have created them first (agent.export.paths).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from typing import IO, Protocol

from xdpml.agent.export.paths import (
    DEFAULT_SOCKET_DIR,
    check_directory,
    open_private_append,
    peer_uid,
    resolve_socket_path,
    trusted_peer_uids,
)

from xdpml.errors import OutputError
from xdpml.wire.columns import ColumnBatch

EXPIRATION_EARLY = 3  # expiration_id of an early snapshot (xdpml.agent.features.EXPIRATION)

log = logging.getLogger(__name__)


class Sink(Protocol):
    """What the pipeline writes to. Optional attributes it also reads: ``name`` (metrics),
    ``kinds`` (record kinds the sink takes; None = all), ``dropped`` (rows not delivered),
    ``drop_reason`` (metric reason when write() returns False) and ``delivery()``
    ((rows given, rows delivered), read after close)."""

    def write(self, batch: ColumnBatch) -> bool | None: ...
    def close(self) -> None: ...


def batch_lines(batch: ColumnBatch) -> list[str]:
    kind = batch.kind
    return [json.dumps({"record": kind, **row}, separators=(",", ":")) for row in batch.rows()]


class JsonLinesSink:
    """Appends JSON lines to a file ('-' = stdout); flushes after every batch.

    A file is created 0600 in a directory other users cannot write to; anything else
    raises :class:`xdpml.errors.OutputError` with the reason in one line."""

    def __init__(self, path: str):
        self.path = path
        self.name = "stdout" if path == "-" else "file"  # metrics attribute
        self.records = 0
        if path == "-":
            self._fh: IO[str] = sys.stdout
        else:
            self._fh = open_private_append(path)

    def write(self, batch: ColumnBatch) -> None:
        if not len(batch):
            return
        lines = batch_lines(batch)
        self._fh.write("\n".join(lines) + "\n")
        self._fh.flush()
        self.records += len(lines)

    def delivery(self) -> tuple[int, int]:
        return self.records, self.records

    def close(self) -> None:
        if self._fh is not sys.stdout:
            self._fh.close()
        else:
            self._fh.flush()


class UnixSocketSink:
    """Streams JSON lines to a Unix stream socket a consumer listens on.

    Never blocks the agent for long: while the consumer is away, records are
    dropped and counted, and reconnection is retried with exponential backoff.

    ``path`` without a slash is a name in ``socket_dir`` (made 0700). The socket's
    directory must not be writable by other users (checked here and before every
    connection), and the listener must be root, the agent's user or the directory's
    owner (SO_PEERCRED); any other listener is disconnected, counted in
    ``refused_peers``, and its records dropped."""

    name = "unix"  # metrics attribute
    drop_reason = "no_consumer"

    def __init__(
        self, path: str, *, timeout_s: float = 2.0, max_backoff_s: float = 30.0, socket_dir: str = DEFAULT_SOCKET_DIR
    ):
        self.path = resolve_socket_path(path, socket_dir)
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.records = 0
        self.dropped = 0
        self.refused_peers = 0
        self._sock: socket.socket | None = None
        self._backoff = 0.5
        self._next_try = 0.0
        self._last_warn = 0.0

    def _connect(self) -> bool:
        now = time.monotonic()
        if self._sock is not None:
            return True
        if now < self._next_try:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            check_directory(self.path, "unix socket")
            s.connect(self.path)
            uid = peer_uid(s)
            if uid not in trusted_peer_uids(self.path):
                self.refused_peers += 1
                raise OutputError(
                    f"the listener runs as uid {uid}, not root, the agent's user or the directory's owner: refused"
                )
        except (OSError, OutputError) as exc:
            s.close()
            self._next_try = now + self._backoff
            self._backoff = min(self._backoff * 2, self.max_backoff_s)
            if now - self._last_warn > 30:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.warning("unix socket %s: %s; dropping records until a trusted consumer listens", self.path, reason)
                self._last_warn = now
            return False
        self._sock = s
        self._backoff = 0.5
        log.info("unix socket %s: connected", self.path)
        return True

    def write(self, batch: ColumnBatch) -> bool:
        """False (the rows counted in ``dropped``) when no trusted consumer took them."""
        if not len(batch):
            return True
        if not self._connect():
            self.dropped += len(batch)
            return False
        data = ("\n".join(batch_lines(batch)) + "\n").encode()
        try:
            self._sock.sendall(data)
            self.records += len(batch)
            return True
        except OSError as exc:
            self.dropped += len(batch)
            log.warning("unix socket %s: %s; reconnecting", self.path, exc.strerror or exc)
            self._sock.close()
            self._sock = None
            return False

    def delivery(self) -> tuple[int, int]:
        return self.records + self.dropped, self.records

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class CollectorSink:
    """Feeds the gRPC exporter (agent.export.grpc_client.GrpcExporter): put() never
    blocks the harvester; what the bounded queue drops is counted there.

    ``kinds``: the record kinds the collector takes: flows (scored) and the kernel
    model's sampled decisions (stored, not scored; sent only with
    --model-decisions-to-collector); the pipeline does not hand it others (windows,
    packet samples go to the local sinks only). ``early``: it
    also takes early flow snapshots (expiration id 3), which the collector judges and
    does not count as flows; the local sinks never get them."""

    name = "grpc"  # metrics attribute

    def __init__(self, exporter, *, kinds: tuple[str, ...] | None = ("flow", "decision"), early: bool = True):
        self.exporter = exporter
        self.kinds = kinds
        self.early = early

    def delivery(self) -> tuple[int, int]:
        st = self.exporter.stats()
        return st["produced_rows"], st["sent_rows"]

    def write(self, batch: ColumnBatch) -> bool:
        """False when the exporter's bounded queue dropped the batch. Early snapshots
        are sent at once: a verdict about a flood should not wait for the flush age."""
        if not len(batch):
            return True
        exp = batch.columns.get("expiration_id") if batch.kind == "flow" else None
        if exp is not None and bool((exp == EXPIRATION_EARLY).any()):
            return self.exporter.put(batch, urgent=True)
        return self.exporter.put(batch)

    @property
    def dropped(self) -> int:
        return self.exporter.stats()["dropped_rows"]

    @property
    def queue_depth(self) -> int:
        return self.exporter.stats()["queue_batches"]

    def close(self) -> None:
        stats = self.exporter.close()
        log.info(
            "collector export: sent %d of %d rows, dropped %d, verdicts received %d",
            stats.get("sent_rows", 0),
            stats.get("produced_rows", 0),
            stats.get("dropped_rows", 0),
            stats.get("verdicts_received", 0),
        )
