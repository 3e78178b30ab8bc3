"""Add pod metadata columns to flow batches.

For each endpoint side (``src``, ``dst``) the enricher adds object (str) columns
``<side>_namespace``, ``<side>_pod``, ``<side>_workload_kind``, ``<side>_workload``,
``<side>_node``, ``<side>_service`` and, per allowlisted label key,
``<side>_label_<key>`` (key with every character other than a-z, 0-9 and _ turned
into _, e.g. ``app.kubernetes.io/name`` -> ``app_kubernetes_io_name``). Unknown
values are "". Each distinct IP of a batch is resolved once, then the answers are
spread over the rows with numpy fancy indexing; the columns repeat few distinct
strings, so the exporter can dictionary-encode them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from xdpml.kube.podcache import EndpointInfo, EndpointResolver
from xdpml.wire.columns import ColumnBatch, ColumnSpec

FIELDS = ("namespace", "pod", "workload_kind", "workload", "node", "service")
SIDES = ("src", "dst")
_FIELD_DOCS = {
    "namespace": "Kubernetes namespace of the endpoint's pod (or Service)",
    "pod": "pod name; empty for node and Service addresses",
    "workload_kind": "top controller kind: Deployment, StatefulSet, DaemonSet, CronJob, Job, "
    "ReplicaSet, Pod (no owner), Node (node or host-network address), Service (ClusterIP)",
    "workload": "top controller name (the node name for kind Node)",
    "node": "node the pod runs on, or the node owning the address",
    "service": "Services whose selector matches the pod's labels, sorted, comma separated",
}


def label_column_suffix(key: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", key.lower())


def metadata_column_names(labels: Sequence[str] = ()) -> list[str]:
    """Every column :meth:`Enricher.enrich` adds, in order."""
    return [
        f"{side}_{name}" for side in SIDES for name in (*FIELDS, *(f"label_{label_column_suffix(k)}" for k in labels))
    ]


class Enricher:
    """Flow batch in, the same batch plus metadata columns out."""

    def __init__(self, resolver: EndpointResolver, *, labels: Iterable[str] = ()):
        self.resolver = resolver
        self.labels = tuple(dict.fromkeys(labels))  # ordered, no duplicates
        suffixes = [label_column_suffix(k) for k in self.labels]
        clash = {s for s in suffixes if suffixes.count(s) > 1}
        if clash:
            raise ValueError(
                f"label keys {sorted(k for k in self.labels if label_column_suffix(k) in clash)} "
                "map to the same column name; keep one of them in the allowlist"
            )
        self.specs = {
            name: ColumnSpec(name=name, dtype="O", role="meta", doc=self._doc(name))
            for name in metadata_column_names(self.labels)
        }

    def _doc(self, name: str) -> str:
        side, rest = name.split("_", 1)
        who = "source" if side == "src" else "destination"
        if rest.startswith("label_"):
            key = self.labels[[f"label_{label_column_suffix(k)}" for k in self.labels].index(rest)]
            return f"{who} pod's label {key!r}"
        return f"{who}: {_FIELD_DOCS[rest]}"

    def _values(self, info: EndpointInfo | None) -> tuple[str, ...]:
        if info is None:
            return ("",) * (len(FIELDS) + len(self.labels))
        return (
            info.namespace,
            info.pod,
            info.workload_kind,
            info.workload,
            info.node,
            info.service,
            *(info.labels.get(k, "") for k in self.labels),
        )

    def enrich(self, batch: ColumnBatch) -> ColumnBatch:
        n = len(batch)
        columns = dict(batch.columns)
        specs = dict(batch.specs)
        width = len(FIELDS) + len(self.labels)
        names = metadata_column_names(self.labels)
        for s, side in enumerate(SIDES):
            side_names = names[s * width : (s + 1) * width]
            ips = batch.columns.get(f"{side}_ip")
            if ips is None or n == 0:
                for name in side_names:
                    columns[name] = np.full(n, "", dtype=object)
                continue
            unique, inverse = np.unique(ips, return_inverse=True)
            # One resolution per distinct address, one object array per column.
            table = np.empty((len(unique), width), dtype=object)
            for i, ip in enumerate(unique):
                table[i] = self._values(self.resolver.resolve(bytes(ip).ljust(16, b"\x00")))
            rows = table[inverse.reshape(-1)]
            for j, name in enumerate(side_names):
                columns[name] = rows[:, j].copy()
        specs.update(self.specs)
        return ColumnBatch(batch.kind, columns, specs)
