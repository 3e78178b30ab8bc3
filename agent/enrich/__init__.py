"""Pod metadata enrichment: a pod cache fed by the Kubernetes API, IP and interface -> pod.

Public API: :class:`PodCache` (list+watch, implements :class:`EndpointResolver`),
:class:`Enricher` (adds ``src_*``/``dst_*`` metadata columns to flow batches),
:class:`VethMap` (host-side veth ifindex -> pod), :class:`EnrichmentManager` (follows the
AgentConfig's enrichment settings live). See docs/enrichment.md.
"""

from xdpml.agent.enrich.enricher import Enricher, metadata_column_names
from xdpml.agent.enrich.manager import EnrichmentManager
from xdpml.agent.enrich.veth import IpRouteSource, RouteSource, VethMap

from xdpml.kube.podcache import EndpointInfo, EndpointResolver, PodCache

__all__ = [
    "EndpointInfo",
    "EndpointResolver",
    "Enricher",
    "EnrichmentManager",
    "IpRouteSource",
    "PodCache",
    "RouteSource",
    "VethMap",
    "metadata_column_names",
]
