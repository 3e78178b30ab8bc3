"""Watch AgentConfig resources and apply the one for this node, live.

Which config: the AgentConfigs of the agent's namespace whose ``spec.nodeSelector``
matches this node's labels (read once from the Node object; needs ``get nodes``). If
several match, the oldest (creationTimestamp, then name) wins and the others get this
node's entry in their status set to ``ready: false, reason: Superseded``.

Each new generation of the chosen config is parsed and validated
(:func:`xdpml.kube.agentconfig.parse_agentconfig`). A valid one is handed to the
callback with the config it replaces (``None`` the first time), so the pipeline can redo
only what changed (:meth:`AgentConfig.changed_sections`). An invalid one is rejected:
the agent keeps running its last good config, sets the ``Accepted`` condition to False
with the reason, and posts a Warning Event on the resource. A callback that raises is
reported the same way (reason ``ApplyFailed``) and the old config stays current.

Status (through the ``status`` subresource, JSON merge patch): ``observedGeneration``,
the ``Accepted`` condition (every agent computes the same verdict), and
``nodes.<this node>`` with readiness, the generation seen and the generation applied.
Each agent writes only its own key of ``nodes``, so merge patches of different nodes
never overwrite each other. Writes that fail are retried with backoff; the watch
itself is a :class:`xdpml.kube.reflector.Reflector` (relist on 410, resume after
outages).

Deleting every matching AgentConfig leaves the agent on its last good config.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kubernetes import client as k8s_client

from xdpml.config import ConfigError
from xdpml.kube.agentconfig import (
    DEFAULT_TLS_MOUNT_ROOT,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    AgentConfig,
    parse_agentconfig,
    selects_node,
)
from xdpml.kube.reflector import Backoff, Reflector

log = logging.getLogger(__name__)
COMPONENT = "xdpml-agent"


class ConfigCallback(Protocol):
    """Apply ``new``; ``old`` is the config running now (None at start). Raise to refuse."""

    def __call__(self, old: AgentConfig | None, new: AgentConfig) -> None: ...


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class _ConfigStore:
    """AgentConfig objects by name; wakes the watcher on every change."""

    def __init__(self, wake: Callable[[], None]):
        self._lock = threading.Lock()
        self._objs: dict[str, dict] = {}
        self._wake = wake

    def replace(self, items: list[dict], resource_version: str) -> None:
        with self._lock:
            self._objs = {o["metadata"]["name"]: o for o in items}
        self._wake()

    def apply(self, event_type: str, obj: dict) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._objs.pop(obj["metadata"]["name"], None)
            else:
                self._objs[obj["metadata"]["name"]] = obj
        self._wake()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self._objs.values())


class AgentConfigWatcher:
    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        namespace: str,
        node_name: str,
        on_change: ConfigCallback,
        node_labels: Mapping[str, str] | None = None,
        tls_mount_root: str = DEFAULT_TLS_MOUNT_ROOT,
        watch_timeout_s: int = 300,
        backoff_factory: Callable[[], Backoff] = Backoff,
        component: str = COMPONENT,
        config_name: str | None = None,
    ):
        if not namespace or not node_name:
            raise ValueError("namespace and node_name are required (downward API: metadata.namespace, spec.nodeName)")
        self.namespace, self.node_name = namespace, node_name
        self.config_name = config_name  # follow only this AgentConfig (None: the oldest matching)
        self._on_change = on_change
        self._node_labels = dict(node_labels) if node_labels is not None else None
        self._tls_mount_root = tls_mount_root
        self._component = component
        self._custom = k8s_client.CustomObjectsApi(api_client)
        self._core = k8s_client.CoreV1Api(api_client)
        self._backoff = backoff_factory()
        self._wake_event = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.store = _ConfigStore(self._wake_event.set)
        self.reflector = Reflector(
            name="agentconfigs",
            list_func=self._custom.list_namespaced_custom_object,
            list_args=(GROUP, VERSION, namespace, PLURAL),
            store=self.store,
            watch_timeout_s=watch_timeout_s,
            backoff=backoff_factory(),
        )
        self.current: AgentConfig | None = None  # the last good config, running now
        self.last_error = ""  # why the newest generation was refused, "" if it was not
        self._seen: dict[str, tuple[str, int]] = {}  # config name -> (uid, generation) handled
        self._superseded: dict[str, tuple[str, int]] = {}  # same, for configs reported as Superseded
        self._ready = (False, "Starting", "waiting for the first valid AgentConfig")
        self._pending_status: dict[str, dict] = {}  # config name -> merge patch not yet written
        self._pending_events: list[dict] = []
        self._enforcement: dict | None = None  # set_enforcement(): status.nodes.<node>.enforcement
        self._model: dict | None = None  # set_model(): status.nodes.<node>.model
        self._model_gone = False
        self._held_reports: list[tuple[str, str, str]] = []  # report() before the first config applied
        self._thread: threading.Thread | None = None

    # ---- life cycle -----------------------------------------------------------------
    def start(self) -> AgentConfigWatcher:
        self._stop.clear()
        self.reflector.start()
        self._thread = threading.Thread(target=self._run, name="agentconfig-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake_event.set()
        self.reflector.stop()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> AgentConfigWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_ready(self, ready: bool, reason: str, message: str = "") -> None:
        """The pipeline reports whether this node runs the current config (programs
        attached, pod cache synced); written to ``status.nodes.<node>``."""
        with self._lock:
            self._ready = (ready, reason, message)
            cfg = self.current
        self._queue_node_status(cfg)

    def set_enforcement(self, summary: dict) -> None:
        """This node's enforcement (mode, counts), shown in ``status.nodes.<node>.enforcement``."""
        with self._lock:
            self._enforcement = dict(summary)
            cfg = self.current
        self._queue_node_status(cfg)

    def set_model(self, summary: dict | None) -> None:
        """The model this node reads from ``spec.model.configMap`` (configMap, key,
        resourceVersion, loaded, message), shown in ``status.nodes.<node>.model``."""
        with self._lock:
            self._model = dict(summary) if summary is not None else None
            self._model_gone = summary is None  # a merge patch removes the entry with a null
            cfg = self.current
        self._queue_node_status(cfg)

    def report(self, event_type: str, reason: str, message: str) -> None:
        """An Event on the current AgentConfig (e.g. a model refused); nothing before the first."""
        with self._lock:
            cfg = self.current
            if cfg is None:  # during the first config's apply: posted once it is current
                self._held_reports.append((event_type, reason, message))
                del self._held_reports[:-20]
                return
        meta = {"name": cfg.name, "uid": cfg.uid}
        self._queue_event({"metadata": meta}, event_type, reason, f"node {self.node_name}: {message}")
        self._wake_event.set()

    def _queue_node_status(self, cfg: AgentConfig | None) -> None:
        """Queue this node's entry (readiness, enforcement) in the status of ``cfg``, the
        current config (None: nothing applied yet, nothing to write)."""
        if cfg is None:
            return
        with self._lock:
            self._pending_status[cfg.name] = self._merge_node_patch(
                self._pending_status.get(cfg.name), self._node_entry(observed=self._seen.get(cfg.name, ("", 0))[1])
            )
        self._wake_event.set()

    def post_event(self, event: dict) -> None:
        """Queue an Event on any object (e.g. a pod whose traffic a rule drops), created in
        the event's own namespace; best effort, bounded like the watcher's own."""
        with self._lock:
            self._pending_events.append(event)
            del self._pending_events[:-20]
        self._wake_event.set()

    # ---- the worker -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if self._node_labels is None and not self._read_node_labels():
                self._stop.wait(self._backoff.next_delay())
                continue
            self._wake_event.clear()
            try:
                self._reconcile()
            except Exception:  # a bug here must not kill config handling for good
                log.exception("AgentConfig reconcile failed; retrying")
            if self._flush():
                self._backoff.reset()
                self._wake_event.wait(5.0)
            else:
                self._wake_event.wait(self._backoff.next_delay())

    def _read_node_labels(self) -> bool:
        try:
            # raw response (urllib3), not a V1Node: _preload_content=False
            resp: Any = self._core.read_node(self.node_name, _preload_content=False, _request_timeout=10)
            try:
                if resp.status == 200:
                    self._node_labels = (json.loads(resp.data).get("metadata") or {}).get("labels") or {}
                    return True
                if resp.status in (403, 404):
                    log.warning(
                        "cannot read Node %s (HTTP %s): only AgentConfigs without nodeSelector will "
                        "match; grant the agent 'get nodes'",
                        self.node_name,
                        resp.status,
                    )
                    self._node_labels = {}
                    return True
            finally:
                resp.release_conn()
        except Exception as err:
            log.warning("cannot read Node %s yet: %s", self.node_name, err)
        return False

    def _reconcile(self) -> None:
        labels = self._node_labels or {}
        matching = []
        for obj in self.store.snapshot():
            if self.config_name and obj["metadata"]["name"] != self.config_name:
                continue
            selector = (obj.get("spec") or {}).get("nodeSelector") or {}
            if isinstance(selector, dict) and selects_node(selector, labels):
                matching.append(obj)
        if not matching:
            return
        matching.sort(key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["name"]))
        chosen, others = matching[0], matching[1:]
        for obj in others:
            meta = obj["metadata"]
            key = (meta.get("uid", ""), int(meta.get("generation") or 0))
            if self._superseded.get(meta["name"]) != key:
                self._superseded[meta["name"]] = key
                self._seen.pop(meta["name"], None)  # if it is chosen again later, handle it anew
                self._queue_status(
                    obj,
                    node={
                        "ready": False,
                        "observedGeneration": key[1],
                        "reason": "Superseded",
                        "message": f"node {self.node_name} uses AgentConfig "
                        f"{chosen['metadata']['name']} (the oldest that selects it)",
                    },
                )
        meta = chosen["metadata"]
        key = (meta.get("uid", ""), int(meta.get("generation") or 0))
        if self._seen.get(meta["name"]) == key:
            return
        self._seen[meta["name"]] = key
        self._superseded.pop(meta["name"], None)
        generation = key[1]
        try:
            new = parse_agentconfig(chosen, tls_mount_root=self._tls_mount_root)
        except ConfigError as err:
            self._refuse(chosen, "InvalidSpec", str(err), spec_valid=False)
            return
        old = self.current
        try:
            self._on_change(old, new)
        except Exception as err:  # the pipeline could not apply it: keep the old config
            log.exception("applying AgentConfig %s generation %d failed", new.name, generation)
            self._refuse(chosen, "ApplyFailed", f"{type(err).__name__}: {err}", spec_valid=True)
            return
        with self._lock:
            self.current = new
            self.last_error = ""
            if not self._ready[0] and self._ready[1] in ("Starting", "InvalidSpec", "ApplyFailed"):
                self._ready = (True, "Applied", "")
            held, self._held_reports = self._held_reports, []
        changed = ", ".join(sorted(new.changed_sections(old))) or "nothing"
        log.info("applied AgentConfig %s/%s generation %d (changed: %s)", new.namespace, new.name, generation, changed)
        self._queue_status(
            chosen,
            accepted=("True", "Valid", f"generation {generation} is valid"),
            node=self._node_entry(observed=generation),
        )
        self._queue_event(
            chosen, "Normal", "Applied", f"node {self.node_name} applied generation {generation} (changed: {changed})"
        )
        for report in held:
            self.report(*report)

    def _refuse(self, obj: dict, reason: str, message: str, *, spec_valid: bool) -> None:
        generation = int(obj["metadata"].get("generation") or 0)
        keeping = (
            f"keeping generation {self.current.generation} of {self.current.name}"
            if self.current
            else "no valid config yet: the agent runs nothing"
        )
        with self._lock:
            self.last_error = message
            if self.current is None:
                self._ready = (False, reason, message)
        log.error(
            "AgentConfig %s/%s generation %d refused (%s): %s; %s",
            self.namespace,
            obj["metadata"]["name"],
            generation,
            reason,
            message,
            keeping,
        )
        node = self._node_entry(observed=generation)
        node["reason"], node["message"] = reason, f"{keeping}: {message}"
        if self.current is None:
            node["ready"] = False
        accepted = ("True", "Valid", f"generation {generation} is valid") if spec_valid else ("False", reason, message)
        self._queue_status(obj, accepted=accepted, node=node)
        self._queue_event(
            obj, "Warning", reason, f"node {self.node_name}: generation {generation} refused: {message}; {keeping}"
        )

    def _node_entry(self, *, observed: int) -> dict:
        ready, reason, message = self._ready
        entry: dict[str, Any] = {
            "ready": bool(ready and self.current is not None),
            "observedGeneration": observed,
            "reason": reason,
            "message": message,
            "lastUpdateTime": _rfc3339(time.time()),
        }
        if self.current is not None:
            entry["appliedGeneration"] = self.current.generation
        if self._enforcement is not None:
            entry["enforcement"] = dict(self._enforcement)
        if self._model is not None:
            entry["model"] = dict(self._model)
        elif self._model_gone:
            entry["model"] = None
        return entry

    @staticmethod
    def _merge_node_patch(existing: dict | None, node_entry: dict) -> dict:
        patch = copy.deepcopy(existing) if existing else {"status": {}}
        patch["status"]["_node"] = node_entry
        return patch

    def _queue_status(self, obj: dict, *, node: dict, accepted: tuple[str, str, str] | None = None) -> None:
        meta = obj["metadata"]
        generation = int(meta.get("generation") or 0)
        status = obj.get("status") or {}
        patch: dict[str, Any] = {"_node": node}
        if accepted is not None:
            if generation >= int(status.get("observedGeneration") or 0):
                patch["observedGeneration"] = generation
            previous = next((c for c in status.get("conditions") or [] if c.get("type") == "Accepted"), None)
            changed = previous is None or previous.get("status") != accepted[0]
            patch["conditions"] = [
                {
                    "type": "Accepted",
                    "status": accepted[0],
                    "reason": accepted[1],
                    "message": accepted[2][:32768],
                    "observedGeneration": generation,
                    "lastTransitionTime": _rfc3339(time.time()) if changed else (previous or {})["lastTransitionTime"],
                }
            ]
        with self._lock:
            self._pending_status[meta["name"]] = {"status": patch}

    def _queue_event(self, obj: dict, event_type: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = _rfc3339(time.time())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": self.namespace,
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": event_type,
            "source": {"component": self._component, "host": self.node_name},
            "reportingComponent": f"{GROUP}/agent",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        with self._lock:
            self._pending_events.append(event)
            del self._pending_events[:-20]  # bounded: events are best effort

    def _flush(self) -> bool:
        """Write queued status patches and events; False if something must be retried."""
        ok = True
        with self._lock:
            pending = dict(self._pending_status)
        for name, patch in pending.items():
            body = copy.deepcopy(patch)
            node = body["status"].pop("_node", None)
            if node is not None:
                body["status"]["nodes"] = {self.node_name: node}
            try:
                self._custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, self.namespace, PLURAL, name, body, _request_timeout=10
                )
            except k8s_client.ApiException as err:
                if err.status == 404:  # the config is gone: nothing to report on
                    pass
                else:
                    log.warning(
                        "cannot write status of AgentConfig %s: %s %s; will retry", name, err.status, err.reason
                    )
                    ok = False
                    continue
            except Exception as err:
                log.warning("cannot write status of AgentConfig %s: %s; will retry", name, err)
                ok = False
                continue
            with self._lock:
                if self._pending_status.get(name) is patch:
                    del self._pending_status[name]
        while True:
            with self._lock:
                if not self._pending_events:
                    break
                event = self._pending_events[0]
            try:
                ns = event["metadata"].get("namespace") or self.namespace
                self._core.create_namespaced_event(ns, event, _request_timeout=10)  # type: ignore[arg-type]  # a dict is sent as is
            except Exception as err:
                log.warning("cannot post Event %s: %s; will retry", event["reason"], err)
                return False
            with self._lock:
                if self._pending_events and self._pending_events[0] is event:
                    self._pending_events.pop(0)
        return ok
