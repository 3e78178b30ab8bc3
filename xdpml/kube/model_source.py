"""The model named by ``spec.model.configMap``: one ConfigMap of the agent's namespace,
watched through the API, its key's bytes handed to the agent whenever they change.

The watch carries ``fieldSelector=metadata.name=<name>``: the agent lists and watches
that one object, which is also what lets RBAC grant it by name (a list or watch is
authorized against ``resourceNames`` only with that field selector; the chart's Role
names ``rbac.modelConfigMaps`` and the AgentConfig's ConfigMap, no others). A
:class:`xdpml.kube.reflector.Reflector` does the list-then-watch (410 -> relist).

Every version of the ConfigMap ends in one call of ``on_model(self, data, problem, version)``:
the key's bytes (``binaryData`` first, then ``data``) with ``problem`` "", or ``data``
None and the reason it cannot be used (no such ConfigMap, no such key, too big, read
refused by RBAC). A
version whose bytes equal the last delivered ones is not delivered again.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable

from kubernetes import client as k8s_client

from xdpml.kube.reflector import Backoff, Reflector

log = logging.getLogger(__name__)

# A ConfigMap holds at most 1 MiB; a model that fits the kernel's slots is far smaller.
MAX_MODEL_BYTES = 1 << 20

# (the ConfigMapModel, data, problem, resourceVersion)
ModelCallback = Callable[["ConfigMapModel", bytes | None, str, str], None]


class _OneObject:
    """The Reflector's store for a watch of one named object."""

    def __init__(self, changed: Callable[[dict | None], None]):
        self._changed = changed

    def replace(self, items: list[dict], resource_version: str) -> None:
        self._changed(items[0] if items else None)

    def apply(self, event_type: str, obj: dict) -> None:
        self._changed(None if event_type == "DELETED" else obj)


class ConfigMapModel:
    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        namespace: str,
        name: str,
        key: str,
        on_model: ModelCallback,
        max_bytes: int = MAX_MODEL_BYTES,
        watch_timeout_s: int = 300,
        backoff_factory: Callable[[], Backoff] = Backoff,
    ):
        self.namespace, self.name, self.key = namespace, name, key
        self.max_bytes = max_bytes
        self._on_model = on_model
        self._lock = threading.Lock()
        self._last: tuple[str, str] | None = None  # (sha256 of the bytes or "", problem) delivered last
        self.data: bytes | None = None  # the last good bytes delivered
        self.version = ""  # the ConfigMap version of those bytes
        self.seen = ""  # the ConfigMap version looked at last ("" before the first, or none)
        core = k8s_client.CoreV1Api(api_client)
        self.reflector = Reflector(
            name=f"configmap {namespace}/{name}",
            list_func=core.list_namespaced_config_map,
            list_args=(namespace,),
            list_kwargs={"field_selector": f"metadata.name={name}"},
            store=_OneObject(self._changed),
            on_error=self._failed,
            watch_timeout_s=watch_timeout_s,
            backoff=backoff_factory(),
        )

    @property
    def source(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name} key {self.key}"

    def start(self) -> ConfigMapModel:
        self.reflector.start()
        return self

    def stop(self) -> None:
        self.reflector.stop()

    def _read(self, obj: dict | None) -> tuple[bytes | None, str]:
        if obj is None:
            return None, f"ConfigMap {self.namespace}/{self.name} not found"
        binary, text = obj.get("binaryData") or {}, obj.get("data") or {}
        if self.key in binary:
            try:
                data = base64.b64decode(binary[self.key], validate=True)
            except ValueError as exc:
                return None, f"{self.source}: binaryData is not base64 ({exc})"
        elif self.key in text:
            data = str(text[self.key]).encode()
        else:
            keys = ", ".join(sorted({*binary, *text})) or "none"
            return None, f"{self.source}: no such key (keys: {keys})"
        if len(data) > self.max_bytes:
            return None, f"{self.source}: {len(data)} bytes, more than the {self.max_bytes} a model may have"
        return data, ""

    def _changed(self, obj: dict | None) -> None:
        data, problem = self._read(obj)
        version = ((obj or {}).get("metadata") or {}).get("resourceVersion", "")
        self.seen = version  # the last version looked at, delivered or not
        mark = (hashlib.sha256(data).hexdigest() if data is not None else "", problem)
        with self._lock:
            if mark == self._last:
                return  # same bytes (or the same problem): nothing to reload
            self._last = mark
            if data is not None:
                self.data, self.version = data, version
        self._on_model(self, data, problem, version)

    def _failed(self, status: int, what: str) -> None:
        """A refused read is the user's to fix (RBAC): reported like a missing ConfigMap.
        Outages are the reflector's to ride out (it logs them and retries)."""
        if status in (401, 403):
            self._report_problem(
                f"cannot read ConfigMap {self.namespace}/{self.name}: {what} (the chart grants it when it is "
                "named in rbac.modelConfigMaps)"
            )

    def _report_problem(self, problem: str) -> None:
        with self._lock:
            if self._last == ("", problem):
                return
            self._last = ("", problem)
        self._on_model(self, None, problem, "")

    def forget(self) -> None:
        """Deliver the next version even if its bytes are the ones delivered last (the
        agent that held them is gone, or refused them)."""
        with self._lock:
            self._last = None
