"""Artifact stores: where adapter versions live, published atomically, verified on read.

A version is a directory `<tenant>/<adapter_id>/v<N>/` of safetensors and JSON files plus a
`manifest.json` with the sha256 of every other file. The manifest is written last: a version without
a valid manifest does not exist. Only safetensors and JSON are ever stored or loaded (no pickle).

Stores: LocalStore (a directory) here, S3Store (S3-compatible, `s3://`) in s3store, imported only
when a URL asks for it. `open_store(url)` picks one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
ALLOWED_SUFFIXES = (".json", ".jsonl", ".safetensors")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class StoreError(Exception):
    """Base class for artifact store failures."""


class ArtifactNotFound(StoreError):
    """No published version under this key."""


class ArtifactCorrupt(StoreError):
    """A published version whose files do not match its manifest."""


class ArtifactExists(StoreError):
    """A version is already published under this key; versions are immutable."""


def artifact_key(tenant_id: str, adapter_id: str, version: int) -> str:
    """The store key of one adapter version: `<tenant>/<adapter_id>/v<N>`."""
    key = f"{tenant_id}/{adapter_id}/v{int(version)}"
    validate_key(key)
    return key


def validate_key(key: str) -> list[str]:
    """Split a key into safe path segments; refuse traversal, absolute paths and odd names."""
    parts = key.split("/")
    if not parts or any(not _SEGMENT.match(p) or p in {".", ".."} for p in parts):
        raise StoreError(f"invalid artifact key {key!r}")
    return parts


def validate_filename(name: str) -> None:
    if "/" in name or "\\" in name or not _SEGMENT.match(name) or name == MANIFEST:
        raise StoreError(f"invalid artifact file name {name!r}")
    if not name.endswith(ALLOWED_SUFFIXES):
        raise StoreError(f"artifact file {name!r} must be one of {', '.join(ALLOWED_SUFFIXES)}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_publish(key: str, files: Mapping[str, bytes]) -> list[str]:
    """Refuse what no store may publish: no files, unsafe names, non-JSON/safetensors files."""
    if not files:
        raise StoreError(f"refusing to publish {key!r} with no files")
    for name in files:
        validate_filename(name)
    return validate_key(key)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    key: str
    files: dict[str, FileEntry]
    created_at: str
    meta: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "key": self.key,
            "created_at": self.created_at,
            "files": {n: {"sha256": e.sha256, "size": e.size} for n, e in self.files.items()},
            "meta": self.meta,
        }
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, key: str) -> Manifest:
        try:
            body = json.loads(raw)
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unsupported manifest format {body.get('format')!r}")
            files = {
                n: FileEntry(sha256=str(e["sha256"]), size=int(e["size"]))
                for n, e in body["files"].items()
            }
            return cls(key=key, files=files, created_at=body["created_at"], meta=body["meta"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ArtifactCorrupt(f"manifest of {key!r} is unreadable: {e}") from e

    @classmethod
    def build(cls, key: str, files: Mapping[str, bytes], meta: Mapping[str, object]) -> Manifest:
        entries = {n: FileEntry(sha256=sha256_hex(d), size=len(d)) for n, d in files.items()}
        return cls(
            key=key, files=entries, created_at=datetime.now(UTC).isoformat(), meta=dict(meta)
        )


def verify_file(key: str, name: str, entry: FileEntry, data: bytes) -> bytes:
    """`data` if it matches its manifest entry, else ArtifactCorrupt."""
    if len(data) != entry.size or sha256_hex(data) != entry.sha256:
        raise ArtifactCorrupt(f"artifact {key!r} file {name!r} does not match its manifest")
    return data


class ArtifactStore(Protocol):
    """Where versions are published. Implementations must make `publish` all-or-nothing."""

    url: str

    def publish(
        self, key: str, files: Mapping[str, bytes], meta: Mapping[str, object] | None = None
    ) -> Manifest: ...

    def manifest(self, key: str) -> Manifest: ...

    def read(self, key: str, name: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list_keys(self, prefix: str = "") -> list[str]: ...

    def delete_prefix(self, prefix: str) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class VerifiedReads:
    """`read` and `exists` of a store in terms of its `manifest` and `_read_raw` (the bytes of one
    file, FileNotFoundError when absent): every file read is checked against the manifest."""

    def manifest(self, key: str) -> Manifest:
        raise NotImplementedError

    def _read_raw(self, key: str, name: str) -> bytes:
        raise NotImplementedError

    def read(self, key: str, name: str) -> bytes:
        """Read one file and check it against the manifest's sha256."""
        validate_filename(name)
        entry = self.manifest(key).files.get(name)
        if entry is None:
            raise ArtifactNotFound(f"artifact {key!r} has no file {name!r}")
        try:
            data = self._read_raw(key, name)
        except FileNotFoundError as e:
            raise ArtifactCorrupt(f"artifact {key!r} is missing its file {name!r}") from e
        return verify_file(key, name, entry, data)

    def exists(self, key: str) -> bool:
        try:
            self.manifest(key)
        except (ArtifactNotFound, ArtifactCorrupt):
            return False
        return True


class LocalStore(VerifiedReads):
    """A directory on a local or mounted filesystem.

    publish: files go to `<root>/.staging/<uuid>/`, fsynced, manifest last, then one rename to the
    final path. A crash at any point leaves either nothing visible or a complete version; leftover
    staging directories are swept on open.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()
        self._staging = self.root / ".staging"
        self._trash = self.root / ".trash"
        for d in (self.root, self._staging, self._trash):
            d.mkdir(parents=True, exist_ok=True)
        self.sweep()

    def sweep(self) -> int:
        """Remove leftovers of interrupted publishes and deletes. Returns how many were removed."""
        removed = 0
        for d in (self._staging, self._trash):
            for child in d.iterdir():
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
        return removed

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key))

    def publish(
        self, key: str, files: Mapping[str, bytes], meta: Mapping[str, object] | None = None
    ) -> Manifest:
        final = self.root.joinpath(*check_publish(key, files))
        if final.exists():
            raise ArtifactExists(f"artifact {key!r} already exists")
        manifest = Manifest.build(key, files, meta or {})
        staging = self._staging / uuid.uuid4().hex
        staging.mkdir()
        try:
            for name, data in files.items():
                _write_durable(staging / name, data)
            _write_durable(staging / MANIFEST, manifest.to_json())  # last: marks it complete
            _fsync_dir(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                # rename() of a directory onto an existing non-empty one fails: no overwrite race.
                os.rename(staging, final)
            except OSError as e:
                if final.exists():
                    raise ArtifactExists(f"artifact {key!r} already exists") from e
                raise
            _fsync_dir(final.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def manifest(self, key: str) -> Manifest:
        path = self._path(key) / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError as e:
            raise ArtifactNotFound(f"artifact {key!r} not found") from e
        return Manifest.from_json(raw, key)

    def _read_raw(self, key: str, name: str) -> bytes:
        return (self._path(key) / name).read_bytes()

    def delete(self, key: str) -> None:
        """Remove a version: first made invisible by one rename, then deleted."""
        path = self._path(key)
        if not path.exists():
            return
        doomed = self._trash / uuid.uuid4().hex
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything under `prefix` (e.g. all versions and datasets of one adapter)."""
        self.delete(prefix)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys of every published (manifest-complete) version under `prefix`."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for manifest in base.rglob(MANIFEST):
            rel = manifest.parent.relative_to(self.root).as_posix()
            if not rel.startswith((".staging", ".trash")):
                keys.append(rel)
        return sorted(keys)


def open_store(url: str) -> ArtifactStore:
    """Open the store a URL names.

    - `file:///path` or a plain path: a local directory (LocalStore).
    - `s3://bucket[/prefix]`: an S3-compatible bucket (S3Store, needs s3fs). Credentials, region
      and endpoint come from the standard AWS settings (`AWS_ACCESS_KEY_ID`, ...,
      `AWS_ENDPOINT_URL_S3`); `?endpoint_url=...&region=...&conditional_writes=false` may be
      given on the URL instead.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StoreError(f"file store URL {url!r} must not name a host")
        return LocalStore(path)
    if parsed.scheme == "s3":
        try:
            from loradock.adapters.artifacts.s3store import S3Store  # lazy: imports s3fs
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise StoreError(f"s3:// store URLs need s3fs installed: {e}") from e
        return S3Store.from_url(url)
    raise StoreError(
        f"unsupported store URL scheme {parsed.scheme!r} in {url!r}; "
        "supported: file://, s3:// or a path"
    )
