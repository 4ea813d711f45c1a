"""What predict routes need: which version is live (cached), the engine and the batcher."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from loradock.adapters.artifacts import ArtifactError
from loradock.adapters.engine import BatchTooLarge, Engine, RowResult
from loradock.adapters.slots import AdapterRef, CapacityError, IncompatibleAdapter
from loradock.adapters.store import ArtifactNotFound, StoreError
from loradock.service.api.lookup import find_adapter, find_version
from loradock.service.batcher import MicroBatcher
from loradock.service.db.registry import Database
from loradock.service.errors import Conflict, LoradockError
from loradock.service.metrics import Metrics
from loradock.service.monitor import Monitor

log = logging.getLogger(__name__)


class AdapterUnavailable(LoradockError):
    status, slug, title = 503, "adapter-unavailable", "Adapter unavailable"


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
    within `ttl` seconds (the entries expire and the registry is read again).
    """

    def __init__(self, db: Database, ttl: float = 1.0) -> None:
        self.db = db
        self.ttl = ttl
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
        if version is None:
            with self._lock:
                hit = self._cache.get((tenant_id, ref))
                generation = self._generation
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
        target = self._read(tenant_id, ref, version)
        if version is None:
            with self._lock:
                if self._generation == generation:
                    self._cache[(tenant_id, ref)] = (time.monotonic(), target)
        return target

    def _read(self, tenant_id: str, ref: str, version: int | None) -> Target:
        with self.db.session() as s:
            adapter = find_adapter(s, tenant_id, ref)
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
