"""A NodeProfile's GPUs as the planner sees them (pure): each GPU's memory and bandwidths, the host links
several of them share, and the GPU-to-GPU bandwidth a split's activations cross."""

from __future__ import annotations

from typing import Any

from residency_operator.planner.types import GpuCapacity, HostLinkCapacity


def profile_gpus(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``NodeCapacity`` fields that describe a node's GPUs, from a NodeProfile spec (camelCase).

    A profile that lists ``gpus`` gives each; one without them but with ``gpuCount`` > 1 is that many
    identical GPUs sharing ``gpuMemoryBytes`` equally, each on its own host link (none measured as shared);
    a single-GPU profile gives nothing (the node-level fields describe its one GPU)."""
    listed = spec.get("gpus") or []
    count = int(spec.get("gpuCount") or 1)
    if listed:
        gpus = tuple(
            GpuCapacity(
                index=int(g["index"]),
                memory_bytes=int(g["memoryBytes"]),
                hbm_gbps=float(g["hbmGbps"]),
                host_to_device_gbps=float(g["hostToDeviceGbps"]),
                host_link=int(g.get("hostLink") or 0),
            )
            for g in sorted(listed, key=lambda g: int(g["index"]))
        )
    elif count > 1:
        each = int(spec["gpuMemoryBytes"]) // count
        gpus = tuple(
            GpuCapacity(
                index=i,
                memory_bytes=each,
                hbm_gbps=float(spec["hbmGbps"]),
                host_to_device_gbps=float(spec["hostToDeviceGbps"]),
                host_link=i,
            )
            for i in range(count)
        )
    else:
        return {}
    if len(gpus) < 2:
        return {}
    links = tuple(
        HostLinkCapacity(
            int(link["id"]),
            tuple(int(i) for i in link["gpus"]),
            float(link["concurrentHostToDeviceGbps"]),
        )
        for link in spec.get("hostLinks") or []
    )
    d2d = spec.get("deviceToDeviceGbps")
    return {
        "gpus": gpus,
        "host_links": links,
        "device_to_device_gbps": None if d2d is None else float(d2d),
    }
