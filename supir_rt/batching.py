"""Which restores can share one sampler loop: the grouping for servers that batch.

`Pipeline.run_batch` restores a batch of compatible requests (equal processing size and equal values of
every `RestoreConfig` field outside `PER_REQUEST_FIELDS`); this module only decides which requests go
together: `batch_key` is that rule as a hashable key, `group_by_key` groups a list of requests by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from supir_rt.pipeline import Request, shared_settings
from supir_rt.restore_config import PER_REQUEST_FIELDS, RestoreConfig
from supir_rt.stages import processing_sizes

BatchItem = Request  # the name servers used before the pipeline took batches itself


def batch_key(image_size: tuple[int, int], config: RestoreConfig) -> tuple[Any, ...]:
    """Requests with equal keys can share a sampler loop."""
    sizes = processing_sizes(*image_size, config.upscale, config.min_size)
    return (sizes.processing, shared_settings(config))


def group_by_key(items: Sequence[Request], max_batch: int) -> list[list[int]]:
    """Indices of ``items`` grouped by `batch_key` (input order kept, at most ``max_batch`` per group)."""
    groups: dict[Any, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, item in enumerate(items):
        runs = groups.setdefault(batch_key(item.image.size, item.config), [])
        if not runs or len(runs[-1]) >= max_batch:
            runs.append([])
            order.append(runs[-1])
        runs[-1].append(i)
    return order


__all__ = ["BatchItem", "PER_REQUEST_FIELDS", "batch_key", "group_by_key"]
