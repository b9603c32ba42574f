"""Kubernetes names and label values derived from user-chosen names, always valid whatever their length."""

from __future__ import annotations

import hashlib

SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63
DIGEST_CHARS = 10


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def placement_name(key: str) -> str:
    """Name of the cluster-scoped ModelPlacement of a model (``namespace/name``).

    ``namespace.name`` is a DNS subdomain when it fits in 253 characters (a namespace is a DNS label, a
    model name a DNS subdomain); a longer one is cut and ends in a digest of the whole key, so that two
    long names never share a placement."""
    name = key.replace("/", ".", 1)
    if len(name) <= SUBDOMAIN_MAX:
        return name
    head = name[: SUBDOMAIN_MAX - DIGEST_CHARS - 1].rstrip("-.")
    return f"{head}-{_digest(key)}"


def label_value(text: str) -> str:
    """``text`` as a label value: at most 63 characters, beginning and ending with a letter or digit.

    Kept as is when valid; a longer one is cut and ends in a digest of the whole text. Whoever selects by
    such a label computes the same value (the worker its node's); checks that need the whole name read
    it from the object (the admission policy reads a placement's ``spec.nodeName``)."""
    if len(text) <= LABEL_VALUE_MAX and (not text or (text[0].isalnum() and text[-1].isalnum())):
        return text
    head = text[: LABEL_VALUE_MAX - DIGEST_CHARS - 1].strip("-._")
    return f"{head}-{_digest(text)}" if head else _digest(text)
