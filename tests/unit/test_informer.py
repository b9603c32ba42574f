"""The watch-fed cache: a paginated LIST, then WATCH from its version; handlers see every change; an expired
watch lists again; an object this process wrote is in the store before its event arrives."""

from __future__ import annotations

import json
import threading
from typing import Any

from residency.informer import Informer


def obj(name: str, version: int, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(version)}, **extra}


class Response:
    def __init__(self, data: Any = None, lines: list[dict[str, Any]] | None = None) -> None:
        self.data = json.dumps(data).encode() if data is not None else b""
        self._lines = [json.dumps(line).encode() + b"\n" for line in lines or []]

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        return iter(self._lines)

    def read_chunked(self, *args: Any, **kwargs: Any) -> Any:
        return iter(self._lines)

    def release_conn(self) -> None:
        pass


class FakeApi:
    """LIST answers in pages of `limit`; each WATCH answers the next scripted batch of events."""

    def __init__(
        self, objects: list[dict[str, Any]], version: int, watches: list[list[dict[str, Any]]]
    ) -> None:
        self.objects, self.version, self.watches = objects, version, watches
        self.calls: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def list(self, *args: Any, **kwargs: Any) -> Response:
        self.calls.append(kwargs)
        if kwargs.get("watch"):
            if not self.watches:
                self.stop.set()
                return Response(lines=[])
            return Response(lines=self.watches.pop(0))
        start = int(kwargs.get("_continue") or 0)
        limit = kwargs["limit"]
        page = self.objects[start : start + limit]
        more = start + limit < len(self.objects)
        meta = {"resourceVersion": str(self.version), **({"continue": str(start + limit)} if more else {})}
        return Response({"items": page, "metadata": meta})


def run(api: FakeApi, events: list[tuple[str, str]], page_size: int = 2) -> Informer:
    informer = Informer(
        "things",
        api.list,
        "group",
        handler=lambda kind, old, new: events.append((kind, (new or old or {})["metadata"]["name"])),
        page_size=page_size,
    )
    informer.run(api.stop)
    return informer


def test_lists_in_pages_then_watches_from_the_list_version() -> None:
    api = FakeApi(
        [obj("a", 1), obj("b", 2), obj("c", 3)],
        10,
        [
            [
                {"type": "ADDED", "object": obj("d", 11)},
                {"type": "MODIFIED", "object": obj("a", 12, spec={"x": 1})},
                {"type": "BOOKMARK", "object": obj("", 13)},
                {"type": "DELETED", "object": obj("b", 14)},
            ]
        ],
    )
    events: list[tuple[str, str]] = []
    informer = run(api, events)
    lists = [c for c in api.calls if not c.get("watch")]
    assert [c.get("_continue") for c in lists] == [None, "2"]  # two pages of two
    watches = [c for c in api.calls if c.get("watch")]
    assert watches[0]["resource_version"] == "10" and watches[0]["allow_watch_bookmarks"] is True
    assert watches[1]["resource_version"] == "14"  # resumed after the last event, not listed again
    assert sorted(o["metadata"]["name"] for o in informer.items()) == ["a", "c", "d"]
    assert informer.get("a") == obj("a", 12, spec={"x": 1})
    assert events == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("ADDED", "d"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert informer.synced.is_set() and informer.lists == 1


def test_an_expired_watch_lists_again_and_reports_what_changed_meanwhile() -> None:
    api = FakeApi([obj("a", 1), obj("b", 2)], 5, [[{"type": "ERROR", "object": {"code": 410}}]])
    events: list[tuple[str, str]] = []
    original = api.list

    def relist_sees_new_state(*args: Any, **kwargs: Any) -> Response:
        if not kwargs.get("watch") and api.calls and api.calls[-1].get("watch"):
            api.objects = [obj("a", 1), obj("c", 7)]  # b went and c came while the watch was away
        return original(*args, **kwargs)

    api.list = relist_sees_new_state  # type: ignore[method-assign]
    informer = run(api, events)
    assert informer.lists == 2
    assert sorted(o["metadata"]["name"] for o in informer.items()) == ["a", "c"]
    assert events[2:] == [("ADDED", "c"), ("DELETED", "b")]


def test_a_written_object_is_kept_unless_the_store_has_a_newer_one() -> None:
    api = FakeApi([obj("a", 5)], 5, [])
    informer = run(api, [])
    informer.written(obj("a", 9, status={"phase": "Ready"}))
    assert informer.get("a") == obj("a", 9, status={"phase": "Ready"})
    informer.written(obj("a", 7))  # an older answer (a slow write) never replaces a newer one
    assert informer.get("a") == obj("a", 9, status={"phase": "Ready"})
    informer.written(None)  # a write that found nothing (404): nothing to keep
    assert len(informer) == 1
