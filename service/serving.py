"""What predict routes need: which version is live (cached), the engine and the batcher."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loradock.adapters.artifacts import ArtifactError
from loradock.adapters.engine import BatchTooLarge, Engine, RowResult
from loradock.adapters.slots import AdapterRef, CapacityError, IncompatibleAdapter
from loradock.adapters.store import ArtifactNotFound, StoreError
from loradock.service.api.lookup import find_adapter, find_version
from loradock.service.batcher import MicroBatcher
from loradock.service.db.registry import Database
from loradock.service.errors import Conflict, LoradockError, NotFound
from loradock.service.metrics import Metrics
from loradock.service.monitor import Monitor

log = logging.getLogger(__name__)


class AdapterUnavailable(LoradockError):
    status, slug, title = 503, "adapter-unavailable", "Adapter unavailable"


class AdapterMissing(NotFound):
    """The adapter itself is not in the registry (not merely one of its versions)."""


@dataclass(frozen=True)
class Target:
    """A resolved predict target: one ready version of one adapter of the caller's tenant."""

    adapter_id: str
    name: str
    version: int
    key: str
    task: str

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.adapter_id, self.version)


class LiveVersions:
    """Resolves `{adapter}` (+ optional version) to a Target, caching the live version.

    A promotion or delete in this process invalidates the entry at once, so a response after a
    promote's acknowledgement always comes from the new version. Other replicas' changes are seen
    within `ttl` seconds (the entries expire and the registry is read again). When that read finds
    a cached adapter gone (deleted on another replica, perhaps re-created under the same name),
    `on_gone(adapter_id)` frees what this process still holds of it (its slots, its window).
    """

    def __init__(
        self, db: Database, ttl: float = 1.0, on_gone: Callable[[str], None] | None = None
    ) -> None:
        self.db = db
        self.ttl = ttl
        self.on_gone = on_gone
        self._cache: dict[tuple[str, str], tuple[float, Target]] = {}
        self._lock = threading.Lock()
        # Bumped by every invalidation. A lookup that read the registry while an invalidation
        # happened must not cache what it read: it may be the version just replaced.
        self._generation = 0

    def invalidate(self, adapter_id: str) -> None:
        with self._lock:
            self._generation += 1
            for key in [k for k, (_, t) in self._cache.items() if t.adapter_id == adapter_id]:
                del self._cache[key]

    def resolve(self, tenant_id: str, ref: str, version: int | None) -> Target:
        with self._lock:
            hit = self._cache.get((tenant_id, ref))
            generation = self._generation
        if version is None and hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        try:
            target = self._read(tenant_id, ref, version)
        except AdapterMissing:
            if hit is not None:
                self._gone(hit[1].adapter_id)
            raise
        if hit is not None and hit[1].adapter_id != target.adapter_id:
            self._gone(hit[1].adapter_id)
        if version is None:
            with self._lock:
                if self._generation == generation:
                    self._cache[(tenant_id, ref)] = (time.monotonic(), target)
        return target

    def _gone(self, adapter_id: str) -> None:
        """A cached adapter no longer exists in the registry: drop it here too."""
        self.invalidate(adapter_id)
        if self.on_gone is not None:
            log.info("adapter %s was deleted elsewhere: freeing it here", adapter_id)
            self.on_gone(adapter_id)

    def _read(self, tenant_id: str, ref: str, version: int | None) -> Target:
        with self.db.session() as s:
            try:
                adapter = find_adapter(s, tenant_id, ref)
            except NotFound as e:
                raise AdapterMissing(e.detail) from None
            number = version if version is not None else adapter.live_version
            if number is None:
                if adapter.status == "training":
                    raise Conflict(
                        f"adapter {adapter.name!r} is still training: no live version yet"
                    )
                raise Conflict(
                    f"adapter {adapter.name!r} has no live version (status {adapter.status})"
                )
            ver = find_version(s, adapter, number)
            if ver.status != "ready" or not ver.artifact_key:
                raise Conflict(f"version {number} of {adapter.name!r} is {ver.status}, not ready")
            return Target(adapter.id, adapter.name, number, ver.artifact_key, adapter.task)


class Serving:
    """The engine, the batcher and the live-version cache, used by /v1 and /v2 alike."""

    def __init__(
        self,
        engine: Engine,
        batcher: MicroBatcher,
        live: LiveVersions,
        monitor: Monitor | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.engine = engine
        self.batcher = batcher
        self.live = live
        self.monitor = monitor
        if live.on_gone is None:  # deletes on other replicas free this process's copy too
            live.on_gone = self.forget

    def forget(self, adapter_id: str) -> None:
        """Drop a deleted adapter's slots (after in-flight use) and its monitoring window."""
        self.engine.pool.drop(adapter_id)
        if self.monitor is not None:
            self.monitor.forget(adapter_id)

    async def predict(
        self, target: Target, texts: list[str], *, observe: bool = True
    ) -> list[RowResult]:
        """Rows through the target's adapter; answered rows go to the drift monitor."""
        results = await self._predict(target, texts)
        if observe and self.monitor is not None:
            self.monitor.observe(
                target.adapter_id, target.name, target.version, target.key, results
            )
        return results

    def _load_failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_load_failures.labels(reason).inc()

    async def _predict(self, target: Target, texts: list[str]) -> list[RowResult]:
        try:
            resident = await asyncio.to_thread(self.engine.acquire, target.ref, target.key)
        except IncompatibleAdapter as e:
            self._load_failed("incompatible")
            raise Conflict(
                f"version {target.version} of {target.name!r} cannot be served: {e}"
            ) from e
        except CapacityError as e:
            self._load_failed("capacity")
            raise AdapterUnavailable(str(e), headers={"Retry-After": "1"}) from e
        except (StoreError, ArtifactError, ValueError, KeyError, OSError) as e:
            # One broken version fails its own requests only; nothing is cached, so a repaired
            # store (or a promote to another version) serves again without a restart.
            reason = (
                "missing"
                if isinstance(e, ArtifactNotFound)
                else "corrupt"
                if isinstance(e, StoreError)
                else "incompatible"
            )
            self._load_failed(reason)
            log.error("adapter %s v%d cannot be loaded (%s): %s", target.adapter_id,
                      target.version, reason, e)  # fmt: skip
            raise AdapterUnavailable(
                f"version {target.version} of {target.name!r} cannot be loaded ({reason}): {e}; "
                "promote another version or retrain it"
            ) from e
        try:
            return await self.batcher.submit(resident, texts)
        except BatchTooLarge as e:
            raise AdapterUnavailable(str(e)) from e
        finally:
            self.engine.release([resident])
