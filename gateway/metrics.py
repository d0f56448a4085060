"""Every Prometheus metric Sluis exports, defined in one place on an injected registry.

Labels only ever take bounded, registered values: tenant names from the tenant store, model ids
from the catalog, limit codes and modes from fixed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.quota_rejections = Counter(
            "sluis_quota_rejections",
            "Requests refused by a quota, by tenant and the limit that refused them.",
            ["tenant", "limit"],
            registry=self.registry,
        )
        self.quota_store_failures = Counter(
            "sluis_quota_store_failures",
            "Quota store calls that failed or timed out, by the mode applied (open admits).",
            ["mode", "operation"],
            registry=self.registry,
        )
