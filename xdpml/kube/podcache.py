"""Pod, Service and owner caches fed by list+watch, and IP -> endpoint resolution.

The agent always watches the pods of its own node (``fieldSelector=spec.nodeName=<node>``,
so the API server sends only those). For the remote end of a flow it can also watch
every pod and every Service of the cluster (``cluster_wide``, ``services``), and the
ReplicaSets and Jobs (``owners``) to name workloads exactly.

IP ownership. A pod IP is freed when its pod ends and may be handed to a new pod at
once, and the two pods' events can reach us in either order (two watches, a relist).
So every store keeps, per IP, the set of live pods that claim it, each with the
resourceVersion of the pod object that made the claim; the claim with the highest
resourceVersion wins (resourceVersions are etcd revisions: integers that only grow
cluster-wide; a non-numeric one ranks by arrival). A deleted pod, or a pod that reached
Succeeded/Failed (its sandbox and IP are gone), withdraws only its own claim: a new pod
that already took the IP keeps it, and the old pod's name never comes back for it.

Host-network pods share their node's IP, so that IP resolves to the node (workload kind
``Node``), never to one of the host-network pods. Node IPs come from ``status.hostIP``
and ``status.hostIPs`` of every pod we know.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes import client as k8s_client

from xdpml.kube.reflector import Backoff, Reflector
from xdpml.wire.columns import ip_from_str

TERMINAL_PHASES = ("Succeeded", "Failed")
# A CronJob's Jobs are named "<cronjob>-<scheduled time in minutes since the epoch>".
CRONJOB_JOB_NAME = re.compile(r"^(?P<cronjob>.+)-(?P<minutes>\d{8,})$")

_arrival = itertools.count()  # tie-break for resourceVersions that are not integers


def rv_key(resource_version: str | None) -> tuple[int, int]:
    """Order of two versions of the same or different objects: etcd revision, arrival."""
    try:
        return int(resource_version or ""), next(_arrival)
    except ValueError:
        return -1, next(_arrival)


def _ip_key(text: str) -> bytes | None:
    try:
        return ip_from_str(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class EndpointInfo:
    """What one IP address is, in Kubernetes terms. "" where unknown."""

    namespace: str = ""
    pod: str = ""
    workload_kind: str = ""  # Deployment, StatefulSet, DaemonSet, CronJob, Job, Pod, Node, Service...
    workload: str = ""
    node: str = ""
    service: str = ""  # Services selecting the pod, sorted, comma separated
    labels: Mapping[str, str] = field(default_factory=dict)


class EndpointResolver(Protocol):
    """What the enricher needs: IP (16 bytes, IPv4 v4-mapped) -> endpoint, or None."""

    def resolve(self, ip: bytes) -> EndpointInfo | None: ...


@dataclass(frozen=True)
class PodRecord:
    uid: str
    namespace: str
    name: str
    rv: tuple[int, int]
    ips: tuple[bytes, ...]  # claimed pod IPs; empty for host-network and ended pods
    host_ips: tuple[bytes, ...]
    node: str
    labels: Mapping[str, str]
    owner_kind: str
    owner_name: str


def pod_record(obj: dict) -> PodRecord:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    texts = [p.get("ip", "") for p in status.get("podIPs") or []] or [status.get("podIP") or ""]
    host_texts = [h.get("ip", "") for h in status.get("hostIPs") or []] or [status.get("hostIP") or ""]
    host_ips = tuple(k for k in (_ip_key(t) for t in host_texts if t) if k)
    ips: tuple[bytes, ...] = ()
    if not spec.get("hostNetwork") and status.get("phase") not in TERMINAL_PHASES:
        ips = tuple(k for k in (_ip_key(t) for t in texts if t) if k)
    owner_kind = owner_name = ""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") or not owner_kind:
            owner_kind, owner_name = ref.get("kind", ""), ref.get("name", "")
    return PodRecord(
        uid=meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}",
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        rv=rv_key(meta.get("resourceVersion")),
        ips=ips,
        host_ips=host_ips,
        node=spec.get("nodeName", ""),
        labels=dict(meta.get("labels") or {}),
        owner_kind=owner_kind,
        owner_name=owner_name,
    )


class PodStore:
    """Pods by uid, and who claims each IP. Fed by one reflector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, PodRecord] = {}
        self._claims: dict[bytes, dict[str, tuple[int, int]]] = {}
        self._host_claims: dict[bytes, dict[str, tuple[tuple[int, int], str]]] = {}
        self.version = 0  # bumps on every change

    def __len__(self) -> int:
        return len(self._pods)

    def replace(self, items: list[dict], resource_version: str) -> None:
        with self._lock:
            self._pods.clear()
            self._claims.clear()
            self._host_claims.clear()
            for obj in items:
                self._put(pod_record(obj))
            self.version += 1

    def apply(self, event_type: str, obj: dict) -> None:
        rec = pod_record(obj)
        with self._lock:
            old = self._pods.get(rec.uid)
            if old is not None and old.rv[0] > rec.rv[0] >= 0:
                return  # an older version arriving late: ignore
            if old is not None:
                self._drop(old)
            if event_type != "DELETED":
                self._put(rec)
            self.version += 1

    def _put(self, rec: PodRecord) -> None:
        self._pods[rec.uid] = rec
        for ip in rec.ips:
            self._claims.setdefault(ip, {})[rec.uid] = rec.rv
        for ip in rec.host_ips:
            if rec.node:
                self._host_claims.setdefault(ip, {})[rec.uid] = (rec.rv, rec.node)

    def _drop(self, rec: PodRecord) -> None:
        del self._pods[rec.uid]
        for table, ips in ((self._claims, rec.ips), (self._host_claims, rec.host_ips)):
            for ip in ips:
                claims = table.get(ip)
                if claims is not None:
                    claims.pop(rec.uid, None)
                    if not claims:
                        del table[ip]

    def owner_of(self, ip: bytes) -> PodRecord | None:
        with self._lock:
            claims = self._claims.get(ip)
            if not claims:
                return None
            uid = max(claims, key=claims.__getitem__)
            return self._pods[uid]

    def node_of(self, ip: bytes) -> tuple[tuple[int, int], str] | None:
        with self._lock:
            claims = self._host_claims.get(ip)
            if not claims:
                return None
            return max(claims.values())

    def pods(self) -> list[PodRecord]:
        with self._lock:
            return list(self._pods.values())


@dataclass(frozen=True)
class ServiceRecord:
    namespace: str
    name: str
    selector: Mapping[str, str]
    cluster_ips: tuple[bytes, ...]


class ServiceStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[tuple[str, str], ServiceRecord] = {}
        self._by_ip: dict[bytes, tuple[str, str]] = {}
        self._by_ns: dict[str, list[ServiceRecord]] = {}
        self.version = 0

    @staticmethod
    def _record(obj: dict) -> ServiceRecord:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        texts = spec.get("clusterIPs") or [spec.get("clusterIP") or ""]
        ips = tuple(k for k in (_ip_key(t) for t in texts if t and t != "None") if k)
        return ServiceRecord(meta.get("namespace", ""), meta.get("name", ""), dict(spec.get("selector") or {}), ips)

    def replace(self, items: list[dict], resource_version: str) -> None:
        with self._lock:
            self._services = {}
            for obj in items:
                rec = self._record(obj)
                self._services[(rec.namespace, rec.name)] = rec
            self._reindex()

    def apply(self, event_type: str, obj: dict) -> None:
        rec = self._record(obj)
        with self._lock:
            if event_type == "DELETED":
                self._services.pop((rec.namespace, rec.name), None)
            else:
                self._services[(rec.namespace, rec.name)] = rec
            self._reindex()

    def _reindex(self) -> None:
        self._by_ip = {ip: key for key, rec in self._services.items() for ip in rec.cluster_ips}
        self._by_ns = {}
        for rec in self._services.values():
            if rec.selector:  # a Service without selector never selects pods
                self._by_ns.setdefault(rec.namespace, []).append(rec)
        self.version += 1

    def selecting(self, namespace: str, labels: Mapping[str, str]) -> str:
        """Names of the Services of ``namespace`` whose selector matches ``labels``."""
        with self._lock:
            names = sorted(
                rec.name
                for rec in self._by_ns.get(namespace, ())
                if all(labels.get(k) == v for k, v in rec.selector.items())
            )
        return ",".join(names)

    def by_cluster_ip(self, ip: bytes) -> ServiceRecord | None:
        with self._lock:
            key = self._by_ip.get(ip)
            return self._services.get(key) if key else None


class OwnerStore:
    """(namespace, name) -> controller owner (kind, name), for ReplicaSets or Jobs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[tuple[str, str], tuple[str, str]] = {}

    @staticmethod
    def _entry(obj: dict) -> tuple[tuple[str, str], tuple[str, str]]:
        meta = obj.get("metadata") or {}
        owner = ("", "")
        for ref in meta.get("ownerReferences") or []:
            if ref.get("controller") or owner == ("", ""):
                owner = (ref.get("kind", ""), ref.get("name", ""))
        return (meta.get("namespace", ""), meta.get("name", "")), owner

    def replace(self, items: list[dict], resource_version: str) -> None:
        with self._lock:
            self._owners = dict(self._entry(o) for o in items)

    def apply(self, event_type: str, obj: dict) -> None:
        key, owner = self._entry(obj)
        with self._lock:
            if event_type == "DELETED":
                self._owners.pop(key, None)
            else:
                self._owners[key] = owner

    def owner(self, namespace: str, name: str) -> tuple[str, str] | None:
        """None: not known (not watched, or not seen); ("", ""): known, no owner."""
        with self._lock:
            return self._owners.get((namespace, name))


def workload_of(
    pod: PodRecord, *, replicasets: OwnerStore | None = None, jobs: OwnerStore | None = None
) -> tuple[str, str]:
    """The top controller of a pod: (kind, name).

    ReplicaSet -> Deployment and Job -> CronJob use the owner caches when they are
    watched and know the object; otherwise the controllers' naming conventions: a
    Deployment's ReplicaSet is "<deployment>-<pod-template-hash>" (the hash is also the
    pod's ``pod-template-hash`` label); a CronJob's Job is "<cronjob>-<minutes>".
    """
    kind, name = pod.owner_kind, pod.owner_name
    if not kind:
        return "Pod", pod.name
    if kind == "ReplicaSet":
        known = replicasets.owner(pod.namespace, name) if replicasets else None
        if known is not None:
            return known if known[0] else (kind, name)
        tmpl_hash = pod.labels.get("pod-template-hash", "")
        if tmpl_hash and name.endswith("-" + tmpl_hash):
            return "Deployment", name[: -len(tmpl_hash) - 1]
    elif kind == "Job":
        known = jobs.owner(pod.namespace, name) if jobs else None
        if known is not None:
            return known if known[0] else (kind, name)
        match = CRONJOB_JOB_NAME.match(name)
        if match:
            return "CronJob", match.group("cronjob")
    return kind, name


class PodCache:
    """The agent's view of pods (and optionally Services and owners) for enrichment.

    Implements :class:`EndpointResolver`. Start it (or use it as a context manager),
    then wait for :meth:`wait_synced` before trusting it (the agent's readiness).
    """

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        node_name: str,
        cluster_wide: bool = False,
        services: bool = False,
        owners: bool = False,
        watch_timeout_s: int = 300,
        page_size: int = 500,
        backoff_factory: Callable[[], Backoff] = Backoff,
    ):
        if not node_name:
            raise ValueError("node_name is required: set NODE_NAME from the downward API (fieldRef spec.nodeName)")
        core = k8s_client.CoreV1Api(api_client)
        self.node_name = node_name
        self.local_pods = PodStore()
        self.cluster_pods = PodStore() if cluster_wide else None
        self.services = ServiceStore() if services else None
        self.replicasets = OwnerStore() if owners else None
        self.jobs = OwnerStore() if owners else None
        common: dict[str, Any] = {"watch_timeout_s": watch_timeout_s, "page_size": page_size}
        self.reflectors = [
            Reflector(
                name="pods-local",
                list_func=core.list_pod_for_all_namespaces,
                store=self.local_pods,
                list_kwargs={"field_selector": f"spec.nodeName={node_name}"},
                backoff=backoff_factory(),
                **common,
            )
        ]
        if self.cluster_pods is not None:
            self.reflectors.append(
                Reflector(
                    name="pods-cluster",
                    list_func=core.list_pod_for_all_namespaces,
                    store=self.cluster_pods,
                    backoff=backoff_factory(),
                    **common,
                )
            )
        if self.services is not None:
            self.reflectors.append(
                Reflector(
                    name="services",
                    list_func=core.list_service_for_all_namespaces,
                    store=self.services,
                    backoff=backoff_factory(),
                    **common,
                )
            )
        if self.replicasets is not None and self.jobs is not None:
            apps, batch = k8s_client.AppsV1Api(api_client), k8s_client.BatchV1Api(api_client)
            self.reflectors.append(
                Reflector(
                    name="replicasets",
                    list_func=apps.list_replica_set_for_all_namespaces,
                    store=self.replicasets,
                    backoff=backoff_factory(),
                    **common,
                )
            )
            self.reflectors.append(
                Reflector(
                    name="jobs",
                    list_func=batch.list_job_for_all_namespaces,
                    store=self.jobs,
                    backoff=backoff_factory(),
                    **common,
                )
            )

    @classmethod
    def for_settings(
        cls, api_client: k8s_client.ApiClient, *, node_name: str, settings: Any, **kwargs: Any
    ) -> PodCache:
        """From an :class:`xdpml.kube.agentconfig.EnrichmentSettings` (what to watch).
        A change of those settings means a new cache: stop the old one, start this."""
        return cls(
            api_client,
            node_name=node_name,
            cluster_wide=settings.cluster_wide,
            services=settings.services,
            owners=settings.owners,
            **kwargs,
        )

    def start(self) -> PodCache:
        for r in self.reflectors:
            r.start()
        return self

    def stop(self) -> None:
        for r in self.reflectors:
            r.stop()

    def __enter__(self) -> PodCache:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors)

    def wait_synced(self, timeout_s: float) -> bool:
        return all(r.wait_synced(timeout_s) for r in self.reflectors)

    def _stores(self) -> Iterable[PodStore]:
        yield self.local_pods
        if self.cluster_pods is not None:
            yield self.cluster_pods

    def pod_for_ip(self, ip: bytes) -> PodRecord | None:
        """The newest pod claiming ``ip`` in any of our pod stores."""
        best = None
        for store in self._stores():
            rec = store.owner_of(ip)
            if rec is not None and (best is None or rec.rv > best.rv):
                best = rec
        return best

    def resolve(self, ip: bytes) -> EndpointInfo | None:
        pod = self.pod_for_ip(ip)
        if pod is not None:
            kind, name = workload_of(pod, replicasets=self.replicasets, jobs=self.jobs)
            service = self.services.selecting(pod.namespace, pod.labels) if self.services else ""
            return EndpointInfo(
                namespace=pod.namespace,
                pod=pod.name,
                workload_kind=kind,
                workload=name,
                node=pod.node,
                service=service,
                labels=pod.labels,
            )
        nodes = [n for n in (s.node_of(ip) for s in self._stores()) if n]
        if nodes:
            node = max(nodes)[1]
            return EndpointInfo(workload_kind="Node", workload=node, node=node)
        if self.services is not None:
            svc = self.services.by_cluster_ip(ip)
            if svc is not None:
                return EndpointInfo(
                    namespace=svc.namespace, workload_kind="Service", workload=svc.name, service=svc.name
                )
        return None
