"""S3-compatible artifact store (AWS S3, MinIO, Ceph RGW, ...) through fsspec/s3fs.

Imported only for `s3://` store URLs, so file:// deployments never import s3fs or botocore.

S3 has no rename and no multi-object transaction, but every PUT of one object is atomic and reads,
writes and listings are strongly consistent. The store keeps LocalStore's guarantees with that:

- publish uploads every file of a version first and its `manifest.json` last. A version exists only
  through its manifest, so a reader never sees a partial version, and a publish that dies half-way
  leaves manifest-less files that no read or listing ever returns.
- Versions are immutable. The manifest is written with a conditional PUT (`If-None-Match: *`): of
  two publishers of one key exactly one wins, the other gets ArtifactExists. The data files are
  written the same way; when one already exists and the key has no manifest, it is a leftover of an
  interrupted publish of this key (a re-queued job publishes the same key again) and is overwritten.
  Two publishers of one key *at the same time* can still overwrite each other's data files before
  one wins the manifest; the winner's version then fails its sha256 check (ArtifactCorrupt), it is
  never silently wrong. loradock never publishes one key from two places at once (the registry
  hands out version numbers).
- Servers that reject `If-None-Match` (HTTP 501) need `conditional_writes=False`: the manifest is
  then written after a check that the key has none (check-then-put: a race between two publishers
  of one key is then only caught by the sha256 check on read).
- delete removes the manifest first (the version disappears atomically), then the files.
- Every publish and delete first writes a small journal record under `<root>/.pending/`; it is
  removed when the operation ends. `sweep()` finishes what a crashed process left: the files of a
  publish that never wrote its manifest, the rest of an interrupted delete. It only ever touches
  objects a journal record names, never other objects in the bucket, and only records older than
  `orphan_max_age_s`, so publishes in flight on other replicas are left alone.
- Reads check every file against the sha256 in the manifest, as LocalStore does.

Credentials, region and endpoint come from the standard AWS settings, which botocore reads itself:
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (or a profile, an instance role, ...),
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`. The store URL may also carry
`endpoint_url`, `region` and `conditional_writes` as query parameters (never credentials).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlparse

import s3fs

from loradock.adapters.artifacts.store import (
    MANIFEST,
    ArtifactExists,
    ArtifactNotFound,
    Manifest,
    StoreError,
    VerifiedReads,
    check_publish,
    validate_filename,
    validate_key,
)

log = logging.getLogger(__name__)

PENDING = ".pending"  # journal of publishes and deletes in progress; never a valid key segment
DEFAULT_ORPHAN_MAX_AGE_S = 3600.0
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_URL_PARAMS = {"endpoint_url", "region", "conditional_writes"}


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (`NoSuchBucket`, ...), if any."""
    response = getattr(exc.__cause__, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


class S3Store(VerifiedReads):
    """Versions under `s3://<bucket>/<prefix>/<tenant>/<adapter_id>/v<N>/`, same layout as local."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        conditional_writes: bool = True,
        orphan_max_age_s: float = DEFAULT_ORPHAN_MAX_AGE_S,
        sweep_on_open: bool = True,
        **storage_options: Any,
    ) -> None:
        if not _BUCKET.match(bucket):
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.conditional_writes = conditional_writes
        self.orphan_max_age_s = orphan_max_age_s
        self._root = f"{bucket}/{prefix}" if prefix else bucket
        client_kwargs = dict(storage_options.pop("client_kwargs", None) or {})
        if region:
            client_kwargs["region_name"] = region
        # Own instance (no fsspec instance cache) and no listing cache: other replicas write to the
        # same bucket, and every listing must show their publishes and deletes at once.
        self.fs = s3fs.S3FileSystem(
            endpoint_url=endpoint_url,
            client_kwargs=client_kwargs,
            skip_instance_cache=True,
            use_listings_cache=False,
            **storage_options,
        )
        if sweep_on_open:
            self.sweep()  # also fails fast on a missing bucket or missing permissions

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        """`s3://bucket[/prefix][?endpoint_url=...&region=...&conditional_writes=false]`."""
        parsed = urlparse(url)
        if parsed.scheme != "s3":
            raise StoreError(f"not an s3:// URL: {url!r}")
        if "@" in parsed.netloc:
            raise StoreError(
                "S3 store URLs must not carry credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or use a profile or an instance role)"
            )
        params: dict[str, str] = {}
        for name, value in parse_qsl(parsed.query, keep_blank_values=True):
            if name not in _URL_PARAMS:
                known = ", ".join(sorted(_URL_PARAMS))
                raise StoreError(f"unknown S3 store URL parameter {name!r}; known: {known}")
            if name in params:
                raise StoreError(f"S3 store URL parameter {name!r} is given twice")
            params[name] = value
        options: dict[str, Any] = {
            "endpoint_url": params.get("endpoint_url") or None,
            "region": params.get("region") or None,
        }
        if "conditional_writes" in params:
            flag = params["conditional_writes"].lower()
            if flag not in _TRUE | _FALSE:
                raise StoreError(f"conditional_writes must be true or false, not {flag!r}")
            options["conditional_writes"] = flag in _TRUE
        return cls(parsed.netloc, parsed.path, **options, **kwargs)

    # --- paths ---------------------------------------------------------------------------------

    def _dir(self, key: str) -> str:
        return f"{self._root}/{'/'.join(validate_key(key))}"

    def _rel(self, path: str) -> str:
        return path[len(self._root) + 1 :]

    # --- object primitives (through s3fs: its retries, and errors as OSError subclasses) ------

    def _get(self, path: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError as e:
            if _error_code(e) == "NoSuchBucket":
                raise StoreError(f"S3 bucket {self.bucket!r} does not exist") from e
            raise

    def _put(self, path: str, data: bytes, *, create: bool) -> None:
        """One atomic PUT. With `create` (and conditional writes on), FileExistsError when the
        object already exists."""
        mode = "create" if create and self.conditional_writes else "overwrite"
        for attempt in range(4):
            try:
                self.fs.pipe_file(path, data, mode=mode)
                return
            except OSError as e:
                # 409: another conditional write of this object is in flight; AWS says retry.
                if _error_code(e) != "ConditionalRequestConflict" or attempt == 3:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _list(self, rel_prefix: str) -> dict[str, dict[str, Any]]:
        """Objects under `<root>/<rel_prefix>/` (the whole root when empty): path -> info."""
        path = f"{self._root}/{rel_prefix}" if rel_prefix else self._root
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError as e:
            if _error_code(e) == "NoSuchBucket":
                raise StoreError(f"S3 bucket {self.bucket!r} does not exist") from e
            return {}
        return {
            name: info
            for name, info in found.items()
            if info.get("type") == "file" and not name.endswith("/")
        }

    def _head(self, path: str) -> dict[str, Any] | None:
        """The metadata of one object, None when there is none."""
        try:
            out: dict[str, Any] = self.fs.call_s3(
                "head_object", Bucket=self.bucket, Key=self._object_key(path)
            )
        except FileNotFoundError:
            return None
        return out

    def _delete_objects(self, paths: Iterable[str]) -> None:
        keys = [self._object_key(p) for p in paths]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            out = self.fs.call_s3(
                "delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if out.get("Errors"):
                first = out["Errors"][0]
                raise OSError(
                    f"could not delete {len(out['Errors'])} object(s) from s3://{self.bucket}, "
                    f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def _object_key(self, path: str) -> str:
        return path[len(self.bucket) + 1 :]

    def _manifest_etag(self, base: str) -> str | None:
        """The ETag of the manifest in directory `base`, None when it has none."""
        head = self._head(f"{base}/{MANIFEST}")
        return None if head is None else str(head.get("ETag"))

    def _manifest_exists(self, key: str) -> bool:
        return self._manifest_etag(self._dir(key)) is not None

    # --- journal ------------------------------------------------------------------------------

    def _journal(self, record: Mapping[str, object]) -> str:
        path = f"{self._root}/{PENDING}/{uuid.uuid4().hex}.json"
        self._put(path, json.dumps(dict(record), sort_keys=True).encode(), create=False)
        return path

    def _unjournal(self, path: str) -> None:
        self._delete_objects([path])

    # --- the store ----------------------------------------------------------------------------

    def publish(
        self, key: str, files: Mapping[str, bytes], meta: Mapping[str, object] | None = None
    ) -> Manifest:
        check_publish(key, files)
        base = self._dir(key)
        if self._manifest_exists(key):
            raise ArtifactExists(f"artifact {key!r} already exists")
        manifest = Manifest.build(key, files, meta or {})
        record = self._journal({"op": "publish", "key": key, "files": sorted(files)})
        written: list[str] = []
        try:
            for name, data in files.items():
                path = f"{base}/{name}"
                try:
                    self._put(path, data, create=True)
                except FileExistsError:
                    # Published meanwhile (its files stay as they are), or a leftover of an
                    # interrupted publish of this key (overwritten).
                    if self._manifest_exists(key):
                        raise
                    self._put(path, data, create=False)
                written.append(path)
            if not self.conditional_writes and self._manifest_exists(key):
                raise FileExistsError(key)
            self._put(f"{base}/{MANIFEST}", manifest.to_json(), create=True)  # last: now visible
        except FileExistsError as e:
            # Another publisher won this key. The files under it are its version's now: keep them.
            self._finish(record)
            raise ArtifactExists(f"artifact {key!r} already exists") from e
        except Exception:
            # A failed publish cleans up after itself; a crashed one is left to sweep().
            try:
                if written and not self._manifest_exists(key):
                    self._delete_objects(written)
                self._unjournal(record)
            except Exception:
                log.warning("could not clean up the failed publish of %s; sweep() will", key)
            raise
        self._finish(record)
        return manifest

    def _finish(self, record: str) -> None:
        try:
            self._unjournal(record)
        except Exception:
            log.warning("could not remove the journal record %s; sweep() will", record)

    def manifest(self, key: str) -> Manifest:
        try:
            raw = self._get(f"{self._dir(key)}/{MANIFEST}")
        except FileNotFoundError as e:
            raise ArtifactNotFound(f"artifact {key!r} not found") from e
        return Manifest.from_json(raw, key)

    def _read_raw(self, key: str, name: str) -> bytes:
        return self._get(f"{self._dir(key)}/{name}")

    def delete(self, key: str) -> None:
        """Remove a version (or everything under a prefix): every manifest first, so each version
        disappears at once, then the files. Deleting what does not exist does nothing."""
        doomed = self._list("/".join(validate_key(key)))
        if not doomed:
            return
        dirs: dict[str, dict[str, Any]] = {}
        for path, info in doomed.items():
            parent, _, name = self._rel(path).rpartition("/")
            entry = dirs.setdefault(parent, {"manifest_etag": None, "files": []})
            if name == MANIFEST:
                entry["manifest_etag"] = str(info.get("ETag"))
            else:
                entry["files"].append(name)
        record = self._journal({"op": "delete", "dirs": dirs})
        manifests = [p for p in doomed if p.rsplit("/", 1)[-1] == MANIFEST]
        self._delete_objects(manifests)
        self._delete_objects([p for p in doomed if p.rsplit("/", 1)[-1] != MANIFEST])
        self._finish(record)

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything under `prefix` (e.g. all versions and datasets of one adapter)."""
        self.delete(prefix)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys of every published (manifest-complete) version under `prefix`."""
        rel = "/".join(validate_key(prefix)) if prefix else ""
        keys = []
        for path in self._list(rel):
            parent, _, name = self._rel(path).rpartition("/")
            if name == MANIFEST and parent and not parent.startswith(PENDING + "/"):
                keys.append(parent)
        return sorted(keys)

    def sweep(self, max_age_s: float | None = None) -> int:
        """Finish what crashed processes left half-done, once its journal record is older than
        `max_age_s` (default: `orphan_max_age_s`): remove the files of a publish that never wrote
        its manifest, and complete an interrupted delete (unless its version was published anew
        since). Never touches a directory with a publish in flight. Returns how many journal
        records were settled."""
        max_age = self.orphan_max_age_s if max_age_s is None else max_age_s
        records = self._list(PENDING)
        if not records:
            return 0
        cutoff = datetime.now(UTC) - timedelta(seconds=max_age)
        stale: list[tuple[str, dict[str, Any]]] = []
        busy: set[str] = set()  # directories with a publish in flight (a fresh record)
        for path, info in records.items():
            try:
                body = json.loads(self._get(path))
            except FileNotFoundError:
                continue  # settled by its owner or another replica meanwhile
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            modified = info.get("LastModified")
            if isinstance(modified, datetime) and modified > cutoff:
                if body.get("op") == "publish" and isinstance(body.get("key"), str):
                    busy.add(body["key"])
            else:
                stale.append((path, body))
        for path, body in stale:
            try:
                for doomed in self._leftovers(body, busy):
                    self._delete_objects(doomed)
            except (StoreError, KeyError, TypeError, AttributeError, ValueError) as e:
                log.warning("dropping the malformed journal record %s: %r", path, e)
            self._delete_objects([path])
        if stale:
            log.info("settled %d interrupted publish(es)/delete(s) in %s", len(stale), self.url)
        return len(stale)

    def _leftovers(self, record: Mapping[str, Any], busy: set[str]) -> list[list[str]]:
        """What a stale journal record leaves to delete, as batches to delete in order."""
        if record.get("op") == "publish":
            key = str(record["key"])
            if key in busy or self._manifest_exists(key):
                return []  # published after all, or being published again right now
            names = [str(n) for n in record.get("files", [])]
            for name in names:
                validate_filename(name)
            return [[f"{self._dir(key)}/{n}" for n in names]]
        if record.get("op") != "delete":
            raise StoreError(f"unknown journal operation {record.get('op')!r}")
        manifests: list[str] = []
        files: list[str] = []
        for key, entry in dict(record["dirs"]).items():
            base = self._dir(str(key))
            current = self._manifest_etag(base)
            if key in busy or (current is not None and current != entry.get("manifest_etag")):
                continue  # published anew since the delete began: not ours to remove
            for name in map(str, entry.get("files", [])):
                if name and "/" not in name and name not in {".", ".."}:
                    files.append(f"{base}/{name}")
            if current is not None:
                manifests.append(f"{base}/{MANIFEST}")
        return [manifests, files]
