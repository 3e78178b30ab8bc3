"""Enrichment that follows the AgentConfig: one object for the pipeline to hold.

``apply(settings)`` (from the AgentConfig callback) swaps in a new pod cache when what
must be watched changed (cluster-wide pods, Services, owners), or only a new enricher
when just the label allowlist changed; ``enrich(batch)`` always uses a consistent pair.
The new cache is started before the old one is stopped, and batches keep using the old
one until the new one has synced, so a config change never blanks the metadata columns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s_client
from xdpml.agent.enrich.enricher import Enricher

from xdpml.kube.podcache import PodCache
from xdpml.wire.columns import ColumnBatch

log = logging.getLogger(__name__)


class EnrichmentManager:
    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        node_name: str,
        cache_factory: Callable[..., PodCache] = PodCache.for_settings,
        **cache_kwargs: Any,
    ):
        self._api_client = api_client
        self._node_name = node_name
        self._factory = cache_factory
        self._cache_kwargs = cache_kwargs
        self._lock = threading.Lock()
        self._settings: Any = None
        self._cache: PodCache | None = None
        self._enricher: Enricher | None = None
        self._pending: tuple[Any, PodCache] | None = None  # (settings, cache) still syncing

    def apply(self, settings: Any) -> None:
        """``settings``: an :class:`xdpml.kube.agentconfig.EnrichmentSettings`."""
        with self._lock:
            old = self._settings
            watch_key = (settings.cluster_wide, settings.services, settings.owners)
            same_watches = old is not None and (old.cluster_wide, old.services, old.owners) == watch_key
            if same_watches and self._cache is not None:
                self._enricher = Enricher(self._cache, labels=settings.labels)
                self._settings = settings
                self._drop_pending()
                return
            cache = self._factory(
                self._api_client, node_name=self._node_name, settings=settings, **self._cache_kwargs
            ).start()
            self._drop_pending()
            if self._cache is None:
                self._cache, self._enricher, self._settings = cache, Enricher(cache, labels=settings.labels), settings
            else:
                self._pending = (settings, cache)  # switched to once synced (see _promote)
                log.info(
                    "enrichment watches change to cluster_wide=%s services=%s owners=%s; switching when synced",
                    *watch_key,
                )

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].stop()
            self._pending = None

    def _promote(self) -> None:
        with self._lock:
            if self._pending is None or not self._pending[1].synced():
                return
            settings, cache = self._pending
            self._pending = None
            old, self._cache = self._cache, cache
            self._enricher, self._settings = Enricher(cache, labels=settings.labels), settings
        if old is not None:
            old.stop()

    def enrich(self, batch: ColumnBatch) -> ColumnBatch:
        self._promote()
        with self._lock:
            enricher = self._enricher
        if enricher is None:
            raise RuntimeError("EnrichmentManager.apply() was never called")
        return enricher.enrich(batch)

    @property
    def cache(self) -> PodCache | None:
        self._promote()
        with self._lock:
            return self._cache

    def synced(self) -> bool:
        cache = self.cache
        return cache is not None and cache.synced()

    def close(self) -> None:
        with self._lock:
            self._drop_pending()
            cache, self._cache, self._enricher = self._cache, None, None
        if cache is not None:
            cache.stop()

    def __enter__(self) -> EnrichmentManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
