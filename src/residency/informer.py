"""A watch-fed cache of one kind of object: client-go's reflector and store, in small.

LIST (paginated) once, then WATCH from the list's resourceVersion with bookmarks, so that reads come from
memory and the API server sends each change once. A watch that ends is resumed from the last version seen;
one that expired (410 Gone) lists again. Objects are kept as the API server's JSON (plain dicts: no model
classes to build per event). Handlers run on the informer's thread, in order, for every add, change and
deletion.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("residency.informer")

Handler = Callable[[str, dict[str, Any] | None, dict[str, Any] | None], None]
"""(event type ADDED | MODIFIED | DELETED, the object before, the object after)."""

Transform = Callable[[dict[str, Any]], dict[str, Any]]
"""An object as the API server sent it -> what the store keeps (a new dict: never the one passed in)."""

DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
"""Annotations no reader of a cache needs: ``kubectl apply``'s copy of the whole object as last applied."""

PAGE_SIZE = 500
WATCH_SECONDS = 300


def object_key(body: dict[str, Any]) -> str:
    meta = body["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


def slim(body: dict[str, Any]) -> dict[str, Any]:
    """The object without ``metadata.managedFields`` (server-side apply's field ownership: one entry per
    writer, each a tree of the fields it set) and without :data:`DROPPED_ANNOTATIONS` (client-go's
    ``TransformStripManagedFields``, as controller-runtime caches by default). Copies the top level and the
    metadata only: the rest is shared with ``body``."""
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        return dict(body)
    slimmed = {k: v for k, v in meta.items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if isinstance(annotations, dict) and any(a in annotations for a in DROPPED_ANNOTATIONS):
        slimmed["annotations"] = {k: v for k, v in annotations.items() if k not in DROPPED_ANNOTATIONS}
    return {**body, "metadata": slimmed}


def _version(body: dict[str, Any] | None) -> int:
    try:
        return int((body or {}).get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Informer:
    """Keeps every object that ``list_func`` lists (a kubernetes client list call: it must take ``limit``,
    ``_continue``, ``watch``, ``resource_version``, ``allow_watch_bookmarks`` and ``timeout_seconds``), as
    ``transform`` (default :func:`slim`) returns it."""

    def __init__(
        self,
        name: str,
        list_func: Callable[..., Any],
        *args: Any,
        handler: Handler | None = None,
        page_size: int = PAGE_SIZE,
        transform: Transform = slim,
        **kwargs: Any,
    ) -> None:
        self.name = name
        self._list_func, self._args, self._kwargs = list_func, args, kwargs
        self._handler = handler
        self._transform = transform
        self._page_size = page_size
        self._store: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._version = ""
        self.synced = threading.Event()
        """Set once the first LIST is in the store."""
        self.lists = 0
        self.watches = 0

    # -- reads --------------------------------------------------------------------------------------
    def items(self) -> list[dict[str, Any]]:
        """Every object, as last seen (do not modify them: they are the cache's)."""
        with self._lock:
            return list(self._store.values())

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._store.get(key)

    def __len__(self) -> int:
        return len(self._store)

    def written(self, body: dict[str, Any] | None) -> None:
        """An object this process just wrote, as the API server returned it: the store has it at once (the
        watch brings the same version later and changes nothing), so a round that starts before the event
        arrives does not write it again."""
        if not body or "metadata" not in body:
            return
        body = self._transform(body)
        key = object_key(body)
        with self._lock:
            if _version(body) > _version(self._store.get(key)):
                self._store[key] = body

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """LIST, then WATCH until stopped; back off on errors (the API server may be restarting)."""
        backoff = 0.5
        while not stop.is_set():
            try:
                if not self._version:
                    self._relist()
                self._watch(stop)
                backoff = 0.5
            except ApiException as exc:
                if exc.status == 410:
                    self._version = ""  # too old: the next pass lists again
                    continue
                log.warning("%s informer: %s; retrying in %.1f s", self.name, exc.reason, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:  # a dropped connection, an API server restart: watch again
                log.warning("%s informer: %r; retrying in %.1f s", self.name, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name=f"informer-{self.name}", daemon=True)
        thread.start()
        return thread

    def _call(self, **kwargs: Any) -> Any:
        return self._list_func(*self._args, **self._kwargs, **kwargs, _preload_content=False)

    def _relist(self) -> None:
        items: dict[str, dict[str, Any]] = {}
        token: str | None = None
        version = ""
        while True:
            page = json.loads(self._call(limit=self._page_size, _continue=token).data)
            for item in page.get("items") or []:
                items[object_key(item)] = self._transform(item)
            token = (page.get("metadata") or {}).get("continue")
            version = (page.get("metadata") or {}).get("resourceVersion") or version
            if not token:
                break
        self.lists += 1
        with self._lock:
            before, self._store = self._store, items
            self._version = version
        self.synced.set()
        if self._handler is not None:
            for key, item in items.items():
                old = before.get(key)
                if old is None or _version(old) != _version(item):
                    self._handler("ADDED" if old is None else "MODIFIED", old, item)
            for key in before.keys() - items.keys():
                self._handler("DELETED", before[key], None)

    def _watch(self, stop: threading.Event) -> None:
        self.watches += 1
        response = self._call(
            watch=True,
            resource_version=self._version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(5, WATCH_SECONDS + 30),
        )
        try:
            for line in iter_resp_lines(response):
                if stop.is_set():
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, body = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if body.get("code") == 410:
                        raise ApiException(status=410, reason="Gone")
                    raise ApiException(status=body.get("code") or 500, reason=body.get("message"))
                version = (body.get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    self._version = version or self._version
                    continue
                body = self._transform(body)
                key = object_key(body)
                with self._lock:
                    old = self._store.get(key)
                    if kind == "DELETED":
                        self._store.pop(key, None)
                    elif _version(body) >= _version(old):
                        self._store[key] = body
                    self._version = version or self._version
                if self._handler is not None:
                    self._handler(str(kind), old, None if kind == "DELETED" else body)
        finally:
            response.release_conn()


def wait_synced(informers: list[Informer], timeout_seconds: float) -> bool:
    """Whether every informer listed once within the timeout."""
    deadline = time.monotonic() + timeout_seconds
    return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in informers)
