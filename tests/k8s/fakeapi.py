"""A small Kubernetes API server for tests: real HTTP on loopback, list/watch done right.

No kube-apiserver can run here, so the agent's Kubernetes code is tested with the real
``kubernetes`` Python client talking to this server through an ordinary
``kubernetes.client.Configuration(host=...)``. It implements the parts of the API
protocol the agent depends on, the way the real server behaves:

* every object and every list carries ``metadata.resourceVersion`` from one global,
  increasing counter (like etcd's revision); ``metadata.generation`` moves only when
  ``spec`` changes; ``uid`` and ``creationTimestamp`` are set on create;
* ``?watch=1`` answers a chunked ``application/json`` stream, one JSON event per line
  (ADDED / MODIFIED / DELETED, BOOKMARK when ``allowWatchBookmarks=true``), resuming
  after ``resourceVersion``; without one (or "0") it first replays the current objects
  as ADDED; ``timeoutSeconds`` ends the stream;
* an expired ``resourceVersion`` (older than the last :meth:`FakeKubeAPI.compact`)
  gets an ERROR event carrying a ``Status`` with code 410 (what the real server sends
  on an HTTP 200 watch), or a plain HTTP 410 with ``gone_mode="http"``;
* ``fieldSelector`` (``spec.nodeName=x``, ``metadata.name!=y`` ...) and equality
  ``labelSelector`` on lists and watches; an object that stops (starts) matching a
  watch's selector is sent as DELETED (ADDED), as the real server does;
* ``limit``/``continue`` paging over a snapshot taken by the first page; a continue
  token older than the last compaction answers 410;
* the ``status`` subresource of the custom resource (PATCH merge-patch or JSON patch,
  PUT), with the main resource ignoring ``status`` writes, and optimistic concurrency
  (``metadata.resourceVersion`` in a PUT or patch must match, else 409);
* core/v1 Events (POST, list); ConfigMaps (their ``binaryData`` is base64 text in JSON, as
  on the real server).

Tests drive it through Python: :meth:`create`, :meth:`update`, :meth:`delete`,
:meth:`compact` (expire history), :meth:`drop_watches`, :meth:`stop` / :meth:`start`
(go down and come back on the same port, state kept, as an API server backed by etcd).
Every request is recorded in :attr:`requests` so tests can check what the client asked.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    custom: bool = False  # a custom resource (no strategic merge patch)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = [
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "services", "Service"),
    Resource("", "v1", "events", "Event"),
    Resource("", "v1", "endpoints", "Endpoints"),
    Resource("", "v1", "configmaps", "ConfigMap"),  # data and binaryData (base64) kept as sent
    Resource("", "v1", "nodes", "Node", namespaced=False),
    Resource("apps", "v1", "replicasets", "ReplicaSet"),
    Resource("batch", "v1", "jobs", "Job"),
    Resource("xdpml.io", "v1alpha1", "agentconfigs", "AgentConfig", status_subresource=True, custom=True),
]
BY_PLURAL = {r.plural: r for r in RESOURCES}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str = ""


@dataclass
class _HistoryEntry:
    rv: int
    plural: str
    type: str
    obj: dict
    old: dict | None  # the object before a MODIFIED, for selector transitions


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 add/replace/remove/test (what status writers use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                parent.pop(last, None)
        else:
            raise ApiError(422, "Invalid", f"unsupported JSON patch op {kind!r}")
    return doc


def _lookup(obj: dict, dotted: str) -> str:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    return "" if cur is None else str(cur)


def _parse_selector(text: str) -> list[tuple[str, str, str]]:
    """'a=b,c!=d,e' -> [(key, op, value)]; op is '=', '!=' or 'exists'."""
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in term:
            key, value = term.split("=", 1)
            terms.append((key.strip(), "=", value.strip().lstrip("=")))
        else:
            terms.append((term, "exists", ""))
    return terms


class _Selector:
    def __init__(self, field_selector: str, label_selector: str):
        self.fields = _parse_selector(field_selector)
        self.labels = _parse_selector(label_selector)

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        for key, op, value in self.fields:
            actual = _lookup(obj, key)
            if (op == "=" and actual != value) or (op == "!=" and actual == value):
                return False
        labels = obj.get("metadata", {}).get("labels") or {}
        for key, op, value in self.labels:
            if op == "exists" and key not in labels:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
        return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FakeKubeAPI:
    """The server and its state. Use as a context manager; ``url`` is its address."""

    def __init__(
        self,
        *,
        port: int = 0,
        bookmark_interval_s: float | None = None,
        gone_mode: str = "event",
        max_watch_s: float = 30.0,
    ):
        self._lock = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], dict]] = {r.plural: {} for r in RESOURCES}
        self._history: list[_HistoryEntry] = []
        self._rv = 100  # start away from 0: "0" means "any version" to the real API
        self._compacted_rv = self._rv
        self._snapshots: dict[str, tuple[int, list[dict]]] = {}
        self.bookmark_interval_s = bookmark_interval_s
        self.gone_mode = gone_mode
        self.max_watch_s = max_watch_s  # server-side cap on a watch without timeoutSeconds
        self.requests: list[Request] = []
        self.fail_next: list[int] = []  # HTTP codes to answer to the next requests (e.g. 500)
        # (method, path substring) -> [code, times left]: fail matching requests only
        self.fail_rules: dict[tuple[str, str], list[int]] = {}
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._generation = 0  # bumps on stop(): running watches of an old life end
        self._paused = False  # watches send nothing (no events, no bookmarks) while set

    # ---- life cycle ---------------------------------------------------------------
    def start(self) -> FakeKubeAPI:
        api = self

        class Handler(_Handler):
            fake = api

        server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler, bind_and_activate=False)
        server.allow_reuse_address = True
        server.daemon_threads = True
        server.server_bind()
        server.server_activate()
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakeapi", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go down: stop listening and cut every open connection (watches included)."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._lock:
            self._generation += 1
            self._lock.notify_all()
            sockets = list(self._sockets)
        server.shutdown()
        server.server_close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    # ---- state changes (tests call these; the HTTP handlers too) --------------------
    def create(self, plural: str, obj: dict) -> dict:
        res = BY_PLURAL[plural]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if not key[1]:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        with self._lock:
            if key in self._objects[plural]:
                raise ApiError(409, "AlreadyExists", f'{plural} "{key[1]}" already exists')
            obj["kind"], obj["apiVersion"] = res.kind, res.api_version
            meta["uid"] = meta.get("uid") or str(uuid.uuid4())
            meta["creationTimestamp"] = meta.get("creationTimestamp") or _now()  # tests may set it
            meta["generation"] = 1
            return self._commit(plural, key, "ADDED", obj, None)

    def update(
        self,
        plural: str,
        namespace: str,
        name: str,
        change: dict | Callable[[dict], None],
        *,
        subresource: str = "",
        expect_rv: str | None = None,
    ) -> dict:
        """Replace (dict) or mutate in place (callable) an object, as PUT does."""
        res = BY_PLURAL[plural]
        key = (namespace if res.namespaced else "", name)
        with self._lock:
            old = self._objects[plural].get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            if expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {plural} "{name}": '
                    "the object has been modified; please apply your changes to the latest version",
                )
            new = copy.deepcopy(old)
            if callable(change):
                change(new)
            else:
                new = copy.deepcopy(change)
            new.setdefault("metadata", {})
            for keep in ("uid", "creationTimestamp", "name", "namespace", "generation"):
                if keep in old["metadata"]:
                    new["metadata"][keep] = old["metadata"][keep]
            new["kind"], new["apiVersion"] = res.kind, res.api_version
            if res.status_subresource:
                # The main resource cannot write status, the status subresource writes only it.
                if subresource == "status":
                    status = new.get("status")
                    new = copy.deepcopy(old)
                    if status is None:
                        new.pop("status", None)
                    else:
                        new["status"] = status
                elif "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            if new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            return self._commit(plural, key, "MODIFIED", new, old)

    def delete(self, plural: str, namespace: str, name: str) -> dict:
        res = BY_PLURAL[plural]
        key = (namespace if res.namespaced else "", name)
        with self._lock:
            old = self._objects[plural].get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            gone = copy.deepcopy(old)
            return self._commit(plural, key, "DELETED", gone, old)

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        res = BY_PLURAL[plural]
        with self._lock:
            obj = self._objects[plural].get((namespace if res.namespaced else "", name))
            return copy.deepcopy(obj) if obj else None

    def list(self, plural: str) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._objects[plural].values()]

    def compact(self) -> int:
        """Forget all history: watches or continue tokens from older versions get 410."""
        with self._lock:
            self._history.clear()
            self._compacted_rv = self._rv
            self._snapshots.clear()
            return self._rv

    def drop_watches(self) -> None:
        """End every running watch stream (as an API server restart or a proxy would)."""
        with self._lock:
            self._generation += 1
            self._lock.notify_all()

    def pause_watches(self) -> None:
        """Hold every watch stream: changes pile up unsent (a slow or partitioned watcher)."""
        with self._lock:
            self._paused = True

    def resume_watches(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    def watch_count(self) -> int:
        return sum(1 for r in self.requests if r.query.get("watch") in ("1", "true", "True"))

    def _commit(self, plural: str, key: tuple[str, str], kind: str, obj: dict, old: dict | None) -> dict:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if kind == "DELETED":
            del self._objects[plural][key]
        else:
            self._objects[plural][key] = obj
        self._history.append(
            _HistoryEntry(self._rv, plural, kind, copy.deepcopy(obj), copy.deepcopy(old) if old else None)
        )
        self._lock.notify_all()
        return copy.deepcopy(obj)

    # ---- request handling -------------------------------------------------------
    def _route(self, path: str) -> tuple[Resource, str | None, str | None, str]:
        """-> (resource, namespace or None for all, name, subresource)."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
            group, version = "", "v1"
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in BY_PLURAL:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        res = BY_PLURAL[rest[0]]
        if (res.group, res.version) != (group, version):
            raise ApiError(404, "NotFound", f"no {rest[0]} in {group or 'core'}/{version}")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if sub and not (sub == "status" and res.status_subresource):
            raise ApiError(404, "NotFound", f"no subresource {sub!r} for {res.plural}")
        return res, namespace, name, sub

    def _list(self, res: Resource, namespace: str | None, query: dict[str, str]) -> dict:
        selector = _Selector(query.get("fieldSelector", ""), query.get("labelSelector", ""))
        limit = int(query.get("limit") or 0)
        token = query.get("continue", "")
        with self._lock:
            if token:
                try:
                    decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                    snap_rv, snap_id, offset = decoded["rv"], decoded["id"], decoded["offset"]
                except (ValueError, KeyError) as err:
                    raise ApiError(400, "BadRequest", f"invalid continue token: {err}") from None
                if snap_id not in self._snapshots:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a "
                        "consistent list result. You can start a new list without the continue parameter.",
                    )
                snap_rv, items = self._snapshots[snap_id]
            else:
                items = [
                    copy.deepcopy(o)
                    for k, o in sorted(self._objects[res.plural].items())
                    if (namespace is None or k[0] == namespace) and selector.matches(o)
                ]
                snap_rv, snap_id, offset = self._rv, uuid.uuid4().hex, 0
            page = items[offset : offset + limit] if limit else items[offset:]
            meta: dict[str, Any] = {"resourceVersion": str(snap_rv)}
            if limit and offset + limit < len(items):
                self._snapshots[snap_id] = (snap_rv, items)
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"rv": snap_rv, "id": snap_id, "offset": offset + limit}).encode()
                ).decode()
                meta["remainingItemCount"] = len(items) - offset - limit
            else:
                self._snapshots.pop(snap_id, None)
        return {"kind": res.kind + "List", "apiVersion": res.api_version, "metadata": meta, "items": page}

    def _watch(self, handler: _Handler, res: Resource, namespace: str | None, query: dict[str, str]) -> None:
        selector = _Selector(query.get("fieldSelector", ""), query.get("labelSelector", ""))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1", "True")
        timeout = float(query.get("timeoutSeconds") or self.max_watch_s)
        deadline = time.monotonic() + timeout
        rv_text = query.get("resourceVersion", "")
        with self._lock:
            life = self._generation
            if rv_text in ("", "0"):
                # "Start at most recent": synthetic ADDED for what exists, then changes.
                start_rv = self._rv
                initial = [
                    copy.deepcopy(o)
                    for k, o in sorted(self._objects[res.plural].items())
                    if (namespace is None or k[0] == namespace) and selector.matches(o)
                ]
            else:
                try:
                    start_rv = int(rv_text)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_text!r}") from None
                initial = []
                if start_rv < self._compacted_rv:
                    gone = ApiError(410, "Expired", f"too old resource version: {start_rv} ({self._compacted_rv})")
                    if self.gone_mode == "http":
                        raise gone
                    initial = None
        handler.start_chunked()
        if initial is None:
            handler.write_chunk(json.dumps({"type": "ERROR", "object": gone.status()}) + "\n")
            handler.end_chunked()
            return
        for obj in initial:
            handler.write_chunk(json.dumps({"type": "ADDED", "object": obj}) + "\n")
        sent_rv = start_rv
        last_bookmark = time.monotonic()
        expired = None
        while True:
            with self._lock:
                if self._paused:
                    if life != self._generation:
                        break
                    self._lock.wait(0.05)
                    continue
                if sent_rv < self._compacted_rv:
                    # History this watch had not sent yet was compacted away: end it as
                    # expired rather than skip events silently; the client relists.
                    expired = ApiError(410, "Expired", f"too old resource version: {sent_rv} ({self._compacted_rv})")
                    break
                pending = [h for h in self._history if h.rv > sent_rv and h.plural == res.plural]
                if not pending:
                    now = time.monotonic()
                    wake = deadline
                    if bookmarks and self.bookmark_interval_s:
                        wake = min(wake, last_bookmark + self.bookmark_interval_s)
                    if life != self._generation or now >= deadline:
                        break
                    if now < wake:
                        self._lock.wait(wake - now)
                    if self._paused:
                        continue
                    pending = [h for h in self._history if h.rv > sent_rv and h.plural == res.plural]
                    if life != self._generation:
                        break
                current_rv = self._rv
            lines = []
            for h in pending:
                sent_rv = h.rv
                ns = h.obj["metadata"].get("namespace", "")
                if namespace is not None and ns != namespace:
                    continue
                now_in, was_in = selector.matches(h.obj), selector.matches(h.old)
                kind = h.type
                if kind == "MODIFIED":
                    if now_in and not was_in:
                        kind = "ADDED"
                    elif was_in and not now_in:
                        kind = "DELETED"
                    elif not now_in:
                        continue
                elif not now_in:
                    continue
                lines.append(json.dumps({"type": kind, "object": h.obj}) + "\n")
            if not pending:
                # Caught up: nothing of this resource is pending up to current_rv.
                sent_rv = max(sent_rv, current_rv)
                if (
                    bookmarks
                    and self.bookmark_interval_s
                    and time.monotonic() - last_bookmark >= self.bookmark_interval_s
                ):
                    last_bookmark = time.monotonic()
                    lines.append(
                        json.dumps(
                            {
                                "type": "BOOKMARK",
                                "object": {
                                    "kind": res.kind,
                                    "apiVersion": res.api_version,
                                    "metadata": {"resourceVersion": str(sent_rv)},
                                },
                            }
                        )
                        + "\n"
                    )
            if lines and not handler.write_chunk("".join(lines)):
                return
            if time.monotonic() >= deadline:
                break
        if expired is not None:
            handler.write_chunk(json.dumps({"type": "ERROR", "object": expired.status()}) + "\n")
        handler.end_chunked()

    def handle(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        content_type = handler.headers.get("Content-Type", "")
        self.requests.append(Request(method, split.path, query, content_type))
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            if self.fail_next:
                code = self.fail_next.pop(0)
                raise ApiError(code, "InternalError", f"injected failure {code}")
            for (fail_method, fragment), rule in self.fail_rules.items():
                if fail_method == method and fragment in split.path and rule[1] > 0:
                    rule[1] -= 1
                    raise ApiError(rule[0], "InternalError", f"injected failure {rule[0]}")
            res, namespace, name, sub = self._route(split.path)
            body = json.loads(raw) if raw else None
            if method == "GET" and name is None:
                if query.get("watch") in ("1", "true", "True"):
                    self._watch(handler, res, namespace, query)
                    return
                handler.send_json(200, self._list(res, namespace, query))
            elif method == "GET":
                obj = self.get(res.plural, namespace or "", name)
                if obj is None:
                    raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
                handler.send_json(200, obj)
            elif method == "POST" and name is None:
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "body must be a JSON object")
                if res.namespaced:
                    body.setdefault("metadata", {})["namespace"] = namespace or "default"
                if res.status_subresource:
                    body.pop("status", None)
                body.get("metadata", {}).pop("creationTimestamp", None)  # the server sets it
                handler.send_json(201, self.create(res.plural, body))
            elif method == "PUT" and name:
                expect = (body or {}).get("metadata", {}).get("resourceVersion")
                handler.send_json(
                    200, self.update(res.plural, namespace or "", name, body, subresource=sub, expect_rv=expect)
                )
            elif method == "PATCH" and name:
                current = self.get(res.plural, namespace or "", name)
                if current is None:
                    raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
                media = content_type.split(";")[0].strip()
                # Strategic merge patch exists only for built-in kinds (approximated here
                # by a merge patch); custom resources refuse it, as on the real server.
                strategic_ok = media == "application/strategic-merge-patch+json" and not res.custom
                if media == "application/json-patch+json":
                    patched = json_patch(current, body)
                    expect = None
                elif media == "application/merge-patch+json" or strategic_ok:
                    patched = merge_patch(current, body)
                    expect = (body or {}).get("metadata", {}).get("resourceVersion")
                else:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format - accepted media "
                        f"types include: application/json-patch+json, application/merge-patch+json "
                        f"(got {content_type!r})",
                    )
                handler.send_json(
                    200, self.update(res.plural, namespace or "", name, patched, subresource=sub, expect_rv=expect)
                )
            elif method == "DELETE" and name:
                handler.send_json(200, self.delete(res.plural, namespace or "", name))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} not allowed on {split.path}")
        except ApiError as err:
            handler.send_json(err.code, err.status())
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            handler.send_json(400, ApiError(400, "BadRequest", f"bad request: {err}").status())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watches, like the real server
    fake: FakeKubeAPI

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._sockets.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # quiet: tests read fake.requests
        pass

    def do_GET(self) -> None:
        self.fake.handle(self, "GET")

    def do_POST(self) -> None:
        self.fake.handle(self, "POST")

    def do_PUT(self) -> None:
        self.fake.handle(self, "PUT")

    def do_PATCH(self) -> None:
        self.fake.handle(self, "PATCH")

    def do_DELETE(self) -> None:
        self.fake.handle(self, "DELETE")

    def send_json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, text: str) -> bool:
        data = text.encode()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False

    def end_chunked(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
