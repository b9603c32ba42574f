"""The wake ConfigMap: how the router tells the operator that requests wait for a model that is not running.

One ConfigMap in the router's (and operator's) namespace, key `<namespace>.<name>` per model, value
`<RFC 3339 time> <requests waiting>`. The router may patch that one object (RBAC by name) and nobody's
models; the operator watches it (an informer of its cache) and reads it each round as if it were the model's
wake annotation.
"""

from __future__ import annotations

WAKE_CONFIGMAP = "residency-wake"


def wake_entry_key(model_key: str) -> str:
    """The ConfigMap key of model `namespace/name` (a namespace holds no dot, so the first one splits)."""
    namespace, name = model_key.split("/", 1)
    return f"{namespace}.{name}"


def parse_wake_entries(data: dict[str, str] | None) -> dict[str, tuple[str, str]]:
    """model key → (wake time, waiting requests) of a wake ConfigMap's data; malformed entries skipped."""
    entries: dict[str, tuple[str, str]] = {}
    for key, value in (data or {}).items():
        namespace, dot, name = key.partition(".")
        parts = str(value).split()
        if dot and namespace and name and len(parts) == 2:
            entries[f"{namespace}/{name}"] = (parts[0], parts[1])
    return entries
