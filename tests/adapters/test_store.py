import json
import os

import pytest

from loradock.adapters import store as store_mod
from loradock.adapters.store import (
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

FILES = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": os.urandom(4096),
    "head.safetensors": os.urandom(512),
}


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "artifacts")


def test_publish_then_read_verified(store):
    key = artifact_key("tn_1", "ad_1", 1)
    manifest = store.publish(key, FILES, {"labels": ["a", "b"]})
    assert key == "tn_1/ad_1/v1"
    assert store.exists(key)
    for name, data in FILES.items():
        assert store.read(key, name) == data
        assert manifest.files[name].sha256 == sha256_hex(data)
    on_disk = json.loads((store.root / key / MANIFEST).read_bytes())
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
def test_only_safetensors_and_json_files(store, name):
    with pytest.raises(StoreError):
        store.publish("t/a/v1", {name: b"x"})
    assert not (store.root / "t").exists()


def test_empty_publish_is_refused(store):
    with pytest.raises(StoreError, match="no files"):
        store.publish("t/a/v1", {})


def test_crash_during_write_leaves_nothing_visible(store, monkeypatch):
    calls = []
    real_write = store_mod._write_durable

    def failing_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(store_mod, "_write_durable", failing_write)
    with pytest.raises(OSError, match="disk full"):
        store.publish("t/a/v1", FILES)
    assert not store.exists("t/a/v1")
    assert not (store.root / "t" / "a" / "v1").exists()
    assert list((store.root / ".staging").iterdir()) == []  # cleaned up


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


def test_directory_without_manifest_does_not_exist(store):
    partial = store.root / "t" / "a" / "v2"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"x")
    assert not store.exists("t/a/v2")
    assert store.list_keys() == []
    with pytest.raises(ArtifactNotFound):
        store.read("t/a/v2", "adapter_model.safetensors")


def test_tampered_file_is_detected(store):
    store.publish("t/a/v1", FILES)
    path = store.root / "t/a/v1/head.safetensors"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="does not match"):
        store.read("t/a/v1", "head.safetensors")
    assert store.read("t/a/v1", "adapter_config.json") == FILES["adapter_config.json"]


def test_missing_file_and_bad_manifest_are_corrupt(store):
    store.publish("t/a/v1", FILES)
    (store.root / "t/a/v1/head.safetensors").unlink()
    with pytest.raises(ArtifactCorrupt, match="missing"):
        store.read("t/a/v1", "head.safetensors")
    (store.root / "t/a/v1" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactCorrupt, match="unreadable"):
        store.manifest("t/a/v1")
    assert not store.exists("t/a/v1")


def test_delete_is_atomic_and_idempotent(store):
    store.publish("t/a/v1", FILES)
    store.publish("t/a/v2", FILES)
    store.delete("t/a/v1")
    assert not store.exists("t/a/v1")
    assert store.list_keys() == ["t/a/v2"]
    store.delete("t/a/v1")
    assert list((store.root / ".trash").iterdir()) == []


def test_open_store_urls(tmp_path):
    assert isinstance(open_store((tmp_path / "a").as_uri()), LocalStore)
    assert open_store(str(tmp_path / "b")).root == (tmp_path / "b").resolve()
    with pytest.raises(StoreError, match="unsupported store URL scheme 'ftp'"):
        open_store("ftp://example/x")
    with pytest.raises(StoreError, match="must not name a host"):
        open_store("file://otherhost/x")
