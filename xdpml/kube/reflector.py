"""List then watch one Kubernetes resource into a store, the way client-go's reflector does.

Loop: list (paged) -> ``store.replace(items, rv)`` -> watch from ``rv`` -> each event to
``store.apply(type, obj)``; BOOKMARK events only move ``rv`` forward, so a later
reconnect resumes from a recent version instead of an expired one. A watch that ends
normally (server ``timeoutSeconds``) is resumed from the last ``rv``. A 410 Gone (as an
ERROR event or as HTTP 410) means our ``rv`` was compacted away: relist at once. Any
other failure (API server down, 5xx, broken stream) waits a jittered exponential
backoff and then resumes the watch from the last ``rv``; a resume that hits 410 relists.

Objects are handled as plain dicts (``raw_object`` of the client's watch events and the
JSON of the list), not the client's models: no per-object model parsing, and custom
resources look the same as built-in ones.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


class Store(Protocol):
    """What a reflector feeds: a local copy of one resource's objects."""

    def replace(self, items: list[dict], resource_version: str) -> None: ...

    def apply(self, event_type: str, obj: dict) -> None: ...


@dataclass
class Backoff:
    """Jittered exponential backoff: base * 2**n, capped, times a random 0.5..1."""

    base_s: float = 0.5
    cap_s: float = 30.0
    _failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.base_s * (2**self._failures))
        self._failures += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._failures = 0


@dataclass
class ReflectorStats:
    lists: int = 0  # successful full lists (the first one plus every relist)
    relists_410: int = 0  # relists forced by 410 Gone
    watches: int = 0  # watch requests started
    events: int = 0  # ADDED/MODIFIED/DELETED applied
    bookmarks: int = 0
    errors: int = 0  # failures that cost a backoff
    last_error: str = ""


class Reflector:
    """Keeps ``store`` in sync with one list function of the ``kubernetes`` client.

    ``list_func`` is a bound client method such as ``CoreV1Api.list_namespaced_pod`` or
    ``CustomObjectsApi.list_namespaced_custom_object``; ``list_args``/``list_kwargs``
    are passed to every list and watch call (namespace, field selector...).
    """

    def __init__(
        self,
        *,
        name: str,
        list_func: Callable[..., Any],
        store: Store,
        list_args: tuple = (),
        list_kwargs: dict | None = None,
        watch_timeout_s: int = 300,
        page_size: int = 500,
        request_timeout_s: float = 30.0,
        backoff: Backoff | None = None,
        on_sync: Callable[[], None] | None = None,
        on_error: Callable[[int, str], None] | None = None,
    ):
        self.name = name
        self._list_func = list_func
        self._store = store
        self._args = list_args
        self._kwargs = dict(list_kwargs or {})
        self.watch_timeout_s = watch_timeout_s
        self.page_size = page_size
        self.request_timeout_s = request_timeout_s
        self.backoff = backoff or Backoff()
        self._on_sync = on_sync
        self._on_error = on_error  # (HTTP status or 0, what failed), before each retry
        self.resource_version: str | None = None
        self.stats = ReflectorStats()
        self.synced = threading.Event()  # set after the first complete list
        self._stop = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._thread: threading.Thread | None = None

    # ---- life cycle -----------------------------------------------------------------
    def start(self) -> Reflector:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"reflector-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread, deadline = self._thread, time.monotonic() + timeout_s
        # Watch.stop() shuts the socket down, so a blocked read returns at once. Repeat
        # it: a watch that was just starting resets its stop flag and needs another.
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            w = self._watch
            if w is not None:
                w.stop()
            thread.join(0.1)
        self._thread = None

    def __enter__(self) -> Reflector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_synced(self, timeout_s: float) -> bool:
        return self.synced.wait(timeout_s)

    # ---- the loop -----------------------------------------------------------------
    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch_once()
                self.backoff.reset()
            except ApiException as err:
                if err.status == 410:
                    # Our version was compacted away: only a new list can catch up.
                    self.stats.relists_410 += 1
                    log.info("%s: watch expired (410 Gone), relisting", self.name)
                    self.resource_version = None
                    continue
                self._failed(f"API error {err.status} {err.reason}", err.status or 0)
            except Exception as err:  # connection refused, reset, timeouts, bad JSON...
                if self._stop.is_set():
                    break
                self._failed(f"{type(err).__name__}: {err}")

    def _failed(self, what: str, status: int = 0) -> None:
        if self._on_error is not None:
            self._on_error(status, what)
        self.stats.errors += 1
        self.stats.last_error = what
        delay = self.backoff.next_delay()
        # Log the first failure and then every 10th: an API server outage must not
        # flood the log, but must be visible.
        if self.stats.errors == 1 or self.stats.errors % 10 == 0:
            log.warning(
                "%s: %s; retrying in %.1fs (failure %d; check the API server and the agent's RBAC)",
                self.name,
                what,
                delay,
                self.stats.errors,
            )
        self._stop.wait(delay)

    def _list(self) -> None:
        items: list[dict] = []
        token = None
        while True:
            kwargs = dict(
                self._kwargs, limit=self.page_size, _preload_content=False, _request_timeout=self.request_timeout_s
            )
            if token:
                kwargs["_continue"] = token
            resp = self._list_func(*self._args, **kwargs)
            try:
                if not 200 <= resp.status <= 299:
                    raise ApiException(status=resp.status, reason=resp.reason, http_resp=None)
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                rv = meta.get("resourceVersion") or ""
                break
        self._store.replace(items, rv)
        self.resource_version = rv
        self.stats.lists += 1
        if not self.synced.is_set():
            self.synced.set()
            if self._on_sync:
                self._on_sync()

    def _watch_once(self) -> None:
        w = k8s_watch.Watch(return_type=object)  # object: events stay plain dicts
        self._watch = w
        if self._stop.is_set():
            return
        self.stats.watches += 1
        stream = w.stream(
            self._list_func,
            *self._args,
            **self._kwargs,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_s,
            # the server closes at timeout_seconds; the read timeout only
            # catches a peer that vanished without closing the connection
            _request_timeout=(self.request_timeout_s, self.watch_timeout_s + 30),
        )
        try:
            for event in stream:
                kind = event.get("type")
                obj = event.get("raw_object") or {}
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    self.stats.bookmarks += 1
                elif kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._store.apply(kind, obj)
                    self.stats.events += 1
                else:
                    continue
                if rv:
                    self.resource_version = rv
                if self._stop.is_set():
                    break
        except ApiException:
            raise
        except Exception:
            if self._stop.is_set():
                return
            raise
        finally:
            self._watch = None
