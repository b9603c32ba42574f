"""Huge pages for the host memory the engine streams its weights from.

A decode step reads every weight once. On the CPU (the emulated tier, and layers computed on the host)
that is gigabytes a step through 4 KiB pages unless the buffers are backed by transparent huge pages.
torch has its own switch for that (``THP_MEM_ALLOC_ENABLE``, read once by c10's CPU allocator): CPU
buffers of 2 MiB or more are then 2 MiB-aligned and advised ``MADV_HUGEPAGE``. The kernel decides
(``/sys/kernel/mm/transparent_hugepage/enabled``: with ``never`` nothing changes). Measured on the 2-core
AMD EPYC VM (shared, so noisy): the decoder math of a float32 0.5B model at batch 1 (24 packed layers and
the head, outside the engine) took a median 74-88 ms a step with it against 107-129 ms without; the
engine's own figures are in docs/engine.md.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> bool:
    """Turns torch's huge-page allocation on unless the environment set ``THP_MEM_ALLOC_ENABLE`` (``0``
    turns it off). Returns whether it is on. Must run before torch is imported: torch reads it once."""
    if THP_ENV not in os.environ:
        if "torch" in sys.modules:
            log.warning("torch is already imported: %s=1 may come too late to take effect", THP_ENV)
        os.environ[THP_ENV] = "1"
    return os.environ[THP_ENV] == "1"
