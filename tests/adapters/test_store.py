"""Artifact store behaviour, run against every store: LocalStore (a directory) and S3Store on a
local S3 endpoint (moto's server mode: an emulator of the S3 API, see test_s3_store.py).

Tests that need to go past a store (tamper with a file, leave a partial version) do it through
`raw`: the directory for LocalStore, boto3 for S3Store.
"""

import json
import os
from pathlib import Path

import pytest

from loradock.adapters.artifacts import store as store_mod
from loradock.adapters.artifacts.store import (
    MANIFEST,
    ArtifactCorrupt,
    ArtifactExists,
    ArtifactNotFound,
    LocalStore,
    StoreError,
    artifact_key,
    open_store,
    sha256_hex,
)
from tests.adapters.test_s3_store import S3Raw, new_bucket, use_moto

FILES = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": os.urandom(4096),
    "head.safetensors": os.urandom(512),
}


class LocalRaw:
    """Direct access to a LocalStore's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink()

    def files(self) -> list[str]:
        """Every file under the root, relative to it (staging and trash included)."""
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    use_moto(monkeypatch)
    return open_store(f"s3://{new_bucket()}/artifacts")


@pytest.fixture
def raw(store):
    return LocalRaw(store.root) if isinstance(store, LocalStore) else S3Raw(store.bucket)


def test_publish_then_read_verified(store, raw):
    key = artifact_key("tn_1", "ad_1", 1)
    manifest = store.publish(key, FILES, {"labels": ["a", "b"]})
    assert key == "tn_1/ad_1/v1"
    assert store.exists(key)
    for name, data in FILES.items():
        assert store.read(key, name) == data
        assert manifest.files[name].sha256 == sha256_hex(data)
    on_disk = json.loads(raw.read(f"{key}/{MANIFEST}"))
    assert on_disk["meta"] == {"labels": ["a", "b"]}
    assert set(on_disk["files"]) == set(FILES)
    assert store.list_keys() == [key]
    assert store.list_keys("tn_1") == [key]
    assert store.list_keys("tn_2") == []


def test_versions_are_immutable(store):
    store.publish("t/a/v1", FILES)
    with pytest.raises(ArtifactExists):
        store.publish("t/a/v1", {"x.json": b"{}"})
    assert store.read("t/a/v1", "adapter_config.json") == FILES["adapter_config.json"]


@pytest.mark.parametrize("key", ["../x/v1", "t/../../etc", "/abs/path", "t//v1", "t/a/.", "t/a b"])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(StoreError, match="invalid artifact key"):
        store.publish(key, FILES)


@pytest.mark.parametrize(
    "name", ["model.bin", "weights.pt", "pickle.pkl", "../x.json", "a/b.json", MANIFEST]
)
def test_only_safetensors_and_json_files(store, raw, name):
    with pytest.raises(StoreError):
        store.publish("t/a/v1", {name: b"x"})
    assert raw.files() == []


def test_empty_publish_is_refused(store):
    with pytest.raises(StoreError, match="no files"):
        store.publish("t/a/v1", {})


def fail_second_file(store, monkeypatch):
    """Make the second file a publish writes fail with an I/O error."""
    calls = []

    def should_fail(path: str) -> bool:
        calls.append(path)
        return len(calls) == 2

    if isinstance(store, LocalStore):
        real_write = store_mod._write_durable

        def failing_write(path, data):
            if should_fail(path.name):
                raise OSError("disk full")
            real_write(path, data)

        monkeypatch.setattr(store_mod, "_write_durable", failing_write)
    else:
        real_put = store._put

        def failing_put(path, data, *, create):
            if "/.pending/" not in path and should_fail(path):
                raise OSError("disk full")
            real_put(path, data, create=create)

        monkeypatch.setattr(store, "_put", failing_put)


def test_failed_write_leaves_nothing_behind(store, raw, monkeypatch):
    fail_second_file(store, monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        store.publish("t/a/v1", FILES)
    assert not store.exists("t/a/v1")
    assert store.list_keys() == []
    assert raw.files() == []  # staging (local) or the uploaded files and journal (S3) cleaned up


def test_leftover_staging_is_swept_and_never_listed(tmp_path):
    root = tmp_path / "artifacts"
    LocalStore(root).publish("t/a/v1", FILES)
    # Simulate a process killed mid-publish: a staging dir with files but no manifest.
    orphan = root / ".staging" / "dead"
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"partial")
    reopened = LocalStore(root)
    assert not orphan.exists()
    assert reopened.list_keys() == ["t/a/v1"]


def test_directory_without_manifest_does_not_exist(store, raw):
    raw.write("t/a/v2/adapter_model.safetensors", b"x")
    assert not store.exists("t/a/v2")
    assert store.list_keys() == []
    with pytest.raises(ArtifactNotFound):
        store.read("t/a/v2", "adapter_model.safetensors")


def test_tampered_file_is_detected(store, raw):
    store.publish("t/a/v1", FILES)
    data = bytearray(raw.read("t/a/v1/head.safetensors"))
    data[10] ^= 0xFF
    raw.write("t/a/v1/head.safetensors", bytes(data))
    with pytest.raises(ArtifactCorrupt, match="does not match"):
        store.read("t/a/v1", "head.safetensors")
    assert store.read("t/a/v1", "adapter_config.json") == FILES["adapter_config.json"]


def test_missing_file_and_bad_manifest_are_corrupt(store, raw):
    store.publish("t/a/v1", FILES)
    raw.delete("t/a/v1/head.safetensors")
    with pytest.raises(ArtifactCorrupt, match="missing"):
        store.read("t/a/v1", "head.safetensors")
    raw.write(f"t/a/v1/{MANIFEST}", b"{not json")
    with pytest.raises(ArtifactCorrupt, match="unreadable"):
        store.manifest("t/a/v1")
    assert not store.exists("t/a/v1")


def test_file_not_in_manifest_and_unknown_key_are_not_found(store):
    store.publish("t/a/v1", FILES)
    with pytest.raises(ArtifactNotFound):
        store.read("t/a/v1", "other.safetensors")
    with pytest.raises(ArtifactNotFound):
        store.manifest("t/a/v9")
    with pytest.raises(StoreError, match="invalid artifact file name"):
        store.read("t/a/v1", MANIFEST)


def test_delete_is_atomic_and_idempotent(store, raw):
    store.publish("t/a/v1", FILES)
    store.publish("t/a/v2", FILES)
    store.delete("t/a/v1")
    assert not store.exists("t/a/v1")
    assert store.list_keys() == ["t/a/v2"]
    store.delete("t/a/v1")
    assert raw.files() == sorted(f"t/a/v2/{n}" for n in [*FILES, MANIFEST])  # no trash left


def test_prefixes_end_at_a_path_segment(store, raw):
    """`tn_1` is not a prefix of `tn_10`: listings and deletes stop at segment boundaries."""
    for key in ["tn_1/ad_1/v1", "tn_1/ad_1/datasets/job_1", "tn_1/ad_10/v1", "tn_10/ad_1/v1"]:
        store.publish(key, {"data.json": key.encode()})
    assert store.list_keys("tn_1") == ["tn_1/ad_1/datasets/job_1", "tn_1/ad_1/v1", "tn_1/ad_10/v1"]
    assert store.list_keys("tn_1/ad_1") == ["tn_1/ad_1/datasets/job_1", "tn_1/ad_1/v1"]
    store.delete_prefix("tn_1/ad_1")
    assert store.list_keys() == ["tn_1/ad_10/v1", "tn_10/ad_1/v1"]
    assert store.read("tn_10/ad_1/v1", "data.json") == b"tn_10/ad_1/v1"
    assert not [f for f in raw.files() if f.startswith("tn_1/ad_1/")]
    with pytest.raises(StoreError, match="invalid artifact key"):
        store.delete_prefix("")


def test_open_store_urls(tmp_path):
    assert isinstance(open_store((tmp_path / "a").as_uri()), LocalStore)
    assert open_store(str(tmp_path / "b")).root == (tmp_path / "b").resolve()
    with pytest.raises(StoreError, match=r"unsupported store URL scheme 'ftp'.*s3://"):
        open_store("ftp://example/x")
    with pytest.raises(StoreError, match="must not name a host"):
        open_store("file://otherhost/x")
