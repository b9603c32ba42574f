"""Who a caller is and which models it may use.

Three policies behind one interface (`Access`):
- `KubernetesAccess`: the caller presents any token the API server accepts (a ServiceAccount token from
  `kubectl create token`, or a projected one); TokenReview says who it is, SubjectAccessReview whether it
  may use a model (verb `infer` on `llmmodels` in the model's namespace, named). Both answers are cached
  briefly, and concurrent misses for the same key share one API call.
- `StaticTokenAccess`: one shared token (tests, demos); whoever holds it may use every model.
- `OpenAccess`: nobody is asked anything (only for tests that build the app by hand).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from residency.httpguard import bearer_matches

log = logging.getLogger("residency.router.auth")

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
DEFAULT_VERB = "infer"
"""The verb a caller needs on `llmmodels` (resource name = the model) to call or wake a model. A custom verb:
the built-in `view`/`edit` roles do not grant it by accident."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller, as TokenReview reports it."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def namespace(self) -> str | None:
        """The namespace of a ServiceAccount caller (its bare model names resolve there); None otherwise."""
        if not self.username.startswith(SERVICE_ACCOUNT_PREFIX):
            return None
        namespace, _, _ = self.username[len(SERVICE_ACCOUNT_PREFIX) :].partition(":")
        return namespace or None


class AccessError(Exception):
    """A request refused before any work: 401 (who are you), 403 (not yours) or 503 (cannot check now)."""

    def __init__(self, status: int, message: str, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_seconds = retry_after_seconds


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Access(Protocol):
    default_namespace: str

    async def authenticate(self, authorization: str) -> Caller:
        """The caller of a request (its Authorization header); raises AccessError 401 when unknown."""

    async def allowed(self, caller: Caller, namespace: str, name: str) -> bool:
        """Whether `caller` may use (and wake) model `namespace/name`."""

    async def may_read_metrics(self, caller: Caller) -> bool:
        """Whether `caller` may read /metrics (it names models)."""


@dataclass
class OpenAccess:
    """Everybody may use everything (only for apps built by hand in tests)."""

    default_namespace: str = "default"

    async def authenticate(self, authorization: str) -> Caller:
        return Caller("system:anonymous")

    async def allowed(self, caller: Caller, namespace: str, name: str) -> bool:
        return True

    async def may_read_metrics(self, caller: Caller) -> bool:
        return True


@dataclass
class StaticTokenAccess:
    """One shared bearer token; its holder may use every model."""

    token: str
    default_namespace: str = "default"

    async def authenticate(self, authorization: str) -> Caller:
        if not bearer_matches(authorization, self.token):
            raise AccessError(401, "missing or wrong bearer token")
        return Caller("residency:static-token")

    async def allowed(self, caller: Caller, namespace: str, name: str) -> bool:
        return True

    async def may_read_metrics(self, caller: Caller) -> bool:
        return True


class Reviews(Protocol):
    """The two API calls (blocking; run in a thread)."""

    def review_token(self, token: str) -> Caller | None:
        """TokenReview: the token's user, or None when the API server does not accept it."""

    def review_access(self, caller: Caller, verb: str, namespace: str, name: str) -> bool:
        """SubjectAccessReview for `verb` on llmmodels/`name` in `namespace`."""

    def review_path(self, caller: Caller, verb: str, path: str) -> bool:
        """SubjectAccessReview for `verb` on the non-resource URL `path` (as kube-rbac-proxy checks)."""


@dataclass
class _Entry:
    expires_at: float
    value: object


@dataclass
class TtlCache:
    """Answers kept for `ttl_seconds`; concurrent misses for one key share one computation."""

    ttl_seconds: float
    max_entries: int = 10_000
    _entries: dict[object, _Entry] = field(default_factory=dict)
    _pending: dict[object, asyncio.Future[object]] = field(default_factory=dict)

    async def get(self, key: object, compute: Callable[[], Awaitable[object]]) -> object:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at > now:
            return entry.value
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await compute()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._pending[key]
        if len(self._entries) >= self.max_entries:
            self._evict(now)
        self._entries[key] = _Entry(time.monotonic() + self.ttl_seconds, value)
        future.set_result(value)
        return value

    def _evict(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[key]
        while len(self._entries) >= self.max_entries:  # still full: drop the oldest insertions
            del self._entries[next(iter(self._entries))]


class KubernetesAccess:
    """TokenReview + SubjectAccessReview, each answer cached for `cache_seconds`."""

    def __init__(
        self,
        reviews: Reviews,
        verb: str = DEFAULT_VERB,
        cache_seconds: float = 10.0,
        default_namespace: str = "default",
    ) -> None:
        self.reviews = reviews
        self.verb = verb
        self.default_namespace = default_namespace
        self._tokens = TtlCache(cache_seconds)
        self._decisions = TtlCache(cache_seconds)

    async def authenticate(self, authorization: str) -> Caller:
        token = bearer_token(authorization)
        if token is None:
            raise AccessError(401, "a bearer token is required (a Kubernetes ServiceAccount token)")
        digest = hashlib.sha256(token.encode()).hexdigest()  # the cache keeps no token in clear

        async def review() -> object:
            return await self._call(self.reviews.review_token, token)

        caller = await self._tokens.get(("token", digest), review)
        if not isinstance(caller, Caller):
            raise AccessError(401, "the API server does not accept this token")
        return caller

    async def allowed(self, caller: Caller, namespace: str, name: str) -> bool:
        async def review() -> object:
            return await self._call(self.reviews.review_access, caller, self.verb, namespace, name)

        return bool(await self._decisions.get((caller, namespace, name), review))

    async def may_read_metrics(self, caller: Caller) -> bool:
        async def review() -> object:
            return await self._call(self.reviews.review_path, caller, "get", "/metrics")

        return bool(await self._decisions.get((caller, "/metrics"), review))

    @staticmethod
    async def _call(function: Callable[..., object], *args: object) -> object:
        try:
            return await asyncio.to_thread(function, *args)
        except Exception as exc:  # the API server is away: the request cannot be checked, so refuse it
            log.warning("access review failed: %s", exc.__class__.__name__)
            raise AccessError(503, "cannot check access now: the API server did not answer", 2) from exc
