"""Fixtures shared by tests/collector and tests/export: a collector on loopback with a
known model, a sink recording row ids, synthetic batches with ids."""

import socket
import threading

import numpy as np
import pytest
from xdpml.agent.export.synthetic import flow_batch
from xdpml.collector.models import Scores, feature_matrix
from xdpml.collector.server import CollectorServer, CollectorSettings

from xdpml.wire.columns import ColumnBatch


class PacketsModel:
    """A fixed, known model: score = bidirectional_packets / 100."""

    name, version, default_threshold = "packets", "1", 0.5
    feature_names = ("bidirectional_packets",)

    def score(self, batch: ColumnBatch) -> Scores:
        return Scores(feature_matrix(batch, self.feature_names)[:, 0] / 100.0)

    def close(self) -> None:
        pass


class RecordingSink:
    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.lock = threading.Lock()

    def write(self, scored) -> None:
        with self.lock:
            self.ids.append(np.array(scored.batch["row_id"]))

    def all_ids(self) -> np.ndarray:
        with self.lock:
            return np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.uint64)

    def close(self) -> None:
        pass


def batch_with_ids(n: int, first_id: int, *, seed: int = 0, kind: str = "normal") -> ColumnBatch:
    b = flow_batch(n, seed=seed, kind=kind)
    b.columns["row_id"] = np.arange(first_id, first_id + n, dtype=np.uint64)
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def collector():
    servers = []

    def start(*, listen="127.0.0.1:0", tls=None, model=None, **kw):
        sink = RecordingSink()
        srv = CollectorServer(model or PacketsModel(), [sink], CollectorSettings(listen=listen, tls=tls, **kw)).start()
        srv.sink = sink
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop(0)
