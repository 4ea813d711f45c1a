"""S3Store against a local S3 endpoint: moto's server mode on a loopback port.

moto is an emulator of the S3 API, not S3: these tests pin the store's protocol (manifest last,
conditional writes, journal and sweep, verified reads, what another replica sees), not the
behaviour of any one S3 implementation. The behavioural tests shared with LocalStore live in
test_store.py and run against both stores; this module also holds the emulator plumbing they use.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from loradock.adapters.artifacts.store import (
    MANIFEST,
    ArtifactCorrupt,
    ArtifactExists,
    ArtifactNotFound,
    StoreError,
    open_store,
)

FILES = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": b"\x01" * 4096,
    "head.safetensors": b"\x02" * 512,
}
PREFIX = "artifacts"


class SimulatedCrash(BaseException):
    """The process dies here: no `except Exception` cleanup runs, as after a SIGKILL."""


# --- the emulator -------------------------------------------------------------------------------


@functools.cache
def moto_endpoint() -> str:
    """One moto S3 server for the whole test process, on a free loopback port."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    atexit.register(server.stop)
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


def use_moto(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point botocore at the emulator through the standard AWS variables (as a deployment would),
    with dummy credentials, and keep any real AWS configuration of this machine out of it."""
    endpoint = moto_endpoint()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    return endpoint


@functools.cache
def s3_client() -> Any:
    """A boto3 client of the emulator, apart from the store's own (s3fs) client."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint(),
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def new_bucket() -> str:
    """A fresh, empty bucket: tests never share state on the one server."""
    name = f"loradock-{uuid.uuid4().hex[:16]}"
    s3_client().create_bucket(Bucket=name)
    return name


class S3Raw:
    """Direct access to a bucket with boto3, past the store, to simulate crashes and tampering."""

    def __init__(self, bucket: str, prefix: str = PREFIX) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.client = s3_client()

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def read(self, rel: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        return body

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def files(self) -> list[str]:
        """Every object under the store's prefix, relative to it (journal records included)."""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/"
        ):
            out += [o["Key"][len(self.prefix) + 1 :] for o in page.get("Contents", [])]
        return sorted(out)

    def pending(self) -> list[str]:
        return [f for f in self.files() if f.startswith(".pending/")]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> str:
    use_moto(monkeypatch)
    return new_bucket()


@pytest.fixture
def url(bucket: str) -> str:
    return f"s3://{bucket}/{PREFIX}"


@pytest.fixture
def raw(bucket: str) -> S3Raw:
    return S3Raw(bucket)


def miss_first_check(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next publish's first look for a manifest finds none, as if it ran just before another
    replica's publish wrote one."""
    real = store._manifest_exists
    calls: list[str] = []

    def exists(key: str) -> bool:
        calls.append(key)
        return False if len(calls) == 1 else bool(real(key))

    monkeypatch.setattr(store, "_manifest_exists", exists)


def crash_on_put(store: Any, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make `store` die (SimulatedCrash) when it starts to upload file `name`."""
    real_put = store._put

    def put(path: str, data: bytes, *, create: bool) -> None:
        if path.endswith(f"/{name}"):
            raise SimulatedCrash(name)
        real_put(path, data, create=create)

    monkeypatch.setattr(store, "_put", put)


# --- tests --------------------------------------------------------------------------------------


def test_manifest_is_written_last_after_a_journal_record(url, raw, monkeypatch):
    store = open_store(url)
    order: list[str] = []
    real_put = store._put

    def put(path: str, data: bytes, *, create: bool) -> None:
        order.append(path.rsplit("/", 2)[-2] if "/.pending/" in path else path.rsplit("/", 1)[-1])
        real_put(path, data, create=create)

    monkeypatch.setattr(store, "_put", put)
    store.publish("t/a/v1", FILES)
    assert order[0] == ".pending"
    assert sorted(order[1:-1]) == sorted(FILES)
    assert order[-1] == MANIFEST
    assert raw.pending() == []  # the journal record is gone once the publish ended


def test_crashed_publish_is_invisible_then_swept(url, raw, monkeypatch):
    """A process killed mid-publish leaves files without a manifest: no read or listing sees
    them, a replica's sweep leaves them while they are fresh and removes them once stale."""
    store = open_store(url)
    store.publish("t/a/v1", FILES)
    crash_on_put(store, monkeypatch, "head.safetensors")
    with pytest.raises(SimulatedCrash):
        store.publish("t/a/v2", FILES)
    orphans = [f for f in raw.files() if f.startswith("t/a/v2/")]
    assert orphans
    assert f"t/a/v2/{MANIFEST}" not in orphans
    assert len(raw.pending()) == 1

    replica = open_store(url)  # sweeps on open, but only records older than an hour
    for s in (store, replica):
        assert not s.exists("t/a/v2")
        assert s.list_keys() == ["t/a/v1"]
        with pytest.raises(ArtifactNotFound):
            s.read("t/a/v2", "adapter_config.json")
    assert [f for f in raw.files() if f.startswith("t/a/v2/")] == orphans

    assert replica.sweep(max_age_s=0) == 1
    assert [f for f in raw.files() if not f.startswith("t/a/v1/")] == []
    assert replica.read("t/a/v1", "head.safetensors") == FILES["head.safetensors"]


def test_foreign_objects_are_invisible_and_never_swept(url, raw):
    """Objects no publish of this store wrote (no journal record) are never deleted by sweep."""
    raw.write("t/a/v3/adapter_model.safetensors", b"uploaded by hand")
    raw.write("notes/readme.json", b"{}")
    store = open_store(url)
    assert store.list_keys() == []
    assert not store.exists("t/a/v3")
    assert store.sweep(max_age_s=0) == 0
    assert raw.files() == ["notes/readme.json", "t/a/v3/adapter_model.safetensors"]


def test_republish_after_a_crash_overwrites_the_leftovers(url, raw, monkeypatch):
    """A re-queued job publishes the same key again; the stale journal record of the crashed
    attempt must not then delete the new version's files."""
    store = open_store(url)
    old = {n: b"old" + d for n, d in FILES.items()}
    with monkeypatch.context() as m:
        crash_on_put(store, m, "head.safetensors")
        with pytest.raises(SimulatedCrash):
            store.publish("t/a/v1", old)
    retry = open_store(url)
    retry.publish("t/a/v1", FILES)
    assert retry.sweep(max_age_s=0) == 1
    assert raw.pending() == []
    for name, data in FILES.items():
        assert retry.read("t/a/v1", name) == data


def test_failed_publish_cleans_up_after_itself(url, raw, monkeypatch):
    store = open_store(url)
    real_put = store._put

    def put(path: str, data: bytes, *, create: bool) -> None:
        if path.endswith("/head.safetensors"):
            raise OSError("connection reset")
        real_put(path, data, create=create)

    monkeypatch.setattr(store, "_put", put)
    with pytest.raises(OSError, match="connection reset"):
        store.publish("t/a/v1", FILES)
    assert raw.files() == []


@pytest.mark.parametrize("conditional_writes", [True, False])
def test_publish_race_has_one_winner_and_keeps_its_version(
    bucket, raw, monkeypatch, conditional_writes
):
    """B checked for a manifest before A wrote its one, then publishes: B gets ArtifactExists and
    A's version stays intact (conditional PUT, or check-then-put when that is off)."""
    url = f"s3://{bucket}/{PREFIX}?conditional_writes={str(conditional_writes).lower()}"
    a, b = open_store(url), open_store(url)
    a.publish("t/a/v1", FILES)
    manifest = raw.read(f"t/a/v1/{MANIFEST}")
    miss_first_check(b, monkeypatch)
    other = {"other.json": b"{}"}  # different names: no data file collides, only the manifest
    with pytest.raises(ArtifactExists):
        b.publish("t/a/v1", other)
    assert raw.read(f"t/a/v1/{MANIFEST}") == manifest
    for name, data in FILES.items():
        assert a.read("t/a/v1", name) == data
    if conditional_writes:  # same names: B's conditional data PUT fails before overwriting
        miss_first_check(b, monkeypatch)
        with pytest.raises(ArtifactExists):
            b.publish("t/a/v1", {n: b"B" + d for n, d in FILES.items()})
        for name, data in FILES.items():
            assert a.read("t/a/v1", name) == data
    assert raw.pending() == []


def test_two_replicas_see_each_others_publishes_and_deletes(url):
    a, b = open_store(url), open_store(url)
    assert a.fs is not b.fs  # separate clients, no shared cache
    assert b.list_keys() == []
    a.publish("t/a/v1", FILES)
    assert b.exists("t/a/v1")
    assert b.list_keys("t") == ["t/a/v1"]
    assert b.read("t/a/v1", "adapter_model.safetensors") == FILES["adapter_model.safetensors"]
    with pytest.raises(ArtifactExists):
        b.publish("t/a/v1", FILES)
    b.publish("t/a/v2", FILES)
    b.delete("t/a/v1")
    assert not a.exists("t/a/v1")
    assert a.list_keys() == ["t/a/v2"]
    a.delete_prefix("t/a")
    assert b.list_keys() == []


def test_interrupted_delete_is_invisible_and_finished_by_sweep(url, raw, monkeypatch):
    store = open_store(url)
    store.publish("t/a/v1", FILES)
    store.publish("t/a/v2", FILES)
    real_delete = store._delete_objects
    calls: list[list[str]] = []

    def delete_then_crash(paths: Any) -> None:
        calls.append(list(paths))
        if len(calls) == 2:  # manifests are gone, the files not yet
            raise SimulatedCrash
        real_delete(paths)

    monkeypatch.setattr(store, "_delete_objects", delete_then_crash)
    with pytest.raises(SimulatedCrash):
        store.delete_prefix("t/a")
    assert all(p.endswith(MANIFEST) for p in calls[0])
    assert store.list_keys() == []
    assert not store.exists("t/a/v1")
    assert any(f.startswith("t/a/v2/") for f in raw.files())
    replica = open_store(url)
    assert replica.sweep(max_age_s=0) == 1
    assert raw.files() == []


def test_sweep_finishes_a_delete_but_spares_a_version_published_anew(url, raw, monkeypatch):
    store = open_store(url)
    store.publish("t/a/v1", FILES)
    store.publish("t/a/v2", FILES)
    real_delete = store._delete_objects

    def crash(paths: Any) -> None:
        raise SimulatedCrash

    with monkeypatch.context() as m:
        m.setattr(store, "_delete_objects", crash)
        with pytest.raises(SimulatedCrash):
            store.delete_prefix("t/a")  # dies right after writing its journal record
    assert store.list_keys() == ["t/a/v1", "t/a/v2"]  # nothing deleted yet
    real_delete([f"{store._root}/t/a/v2/{MANIFEST}"])  # v2 lost its manifest only
    store.publish("t/a/v2", {"adapter_config.json": b'{"r": 4}'})  # ... and is published anew
    replica = open_store(url)
    assert replica.sweep(max_age_s=0) == 1
    assert replica.list_keys() == ["t/a/v2"]  # v1 deleted as asked, the new v2 untouched
    assert replica.read("t/a/v2", "adapter_config.json") == b'{"r": 4}'
    assert not [f for f in raw.files() if f.startswith("t/a/v1/")]


def test_truncated_and_replaced_objects_are_corrupt(url, raw):
    store = open_store(url)
    store.publish("t/a/v1", FILES)
    raw.write("t/a/v1/adapter_model.safetensors", FILES["adapter_model.safetensors"][:100])
    with pytest.raises(ArtifactCorrupt, match="does not match"):
        store.read("t/a/v1", "adapter_model.safetensors")
    manifest = json.loads(raw.read(f"t/a/v1/{MANIFEST}"))
    manifest["files"]["head.safetensors"]["sha256"] = "0" * 64
    raw.write(f"t/a/v1/{MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(ArtifactCorrupt):
        store.read("t/a/v1", "head.safetensors")
    assert store.read("t/a/v1", "adapter_config.json") == FILES["adapter_config.json"]


def test_open_store_s3_urls(bucket, monkeypatch):
    endpoint = moto_endpoint()
    store = open_store(f"s3://{bucket}/some/prefix/")
    assert store.url == f"s3://{bucket}/some/prefix"
    store.publish("t/a/v1", FILES)
    assert open_store(f"s3://{bucket}").list_keys() == ["some/prefix/t/a/v1"]
    # Settings on the URL instead of the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    on_url = open_store(f"s3://{bucket}/some/prefix?endpoint_url={endpoint}&region=eu-west-1")
    assert on_url.list_keys() == ["t/a/v1"]
    for bad, match in [
        (f"s3://key:secret@{bucket}/p", "must not carry credentials"),
        (f"s3://{bucket}/p?endpoint={endpoint}", "unknown S3 store URL parameter 'endpoint'"),
        (f"s3://{bucket}/p?region=a&region=b", "given twice"),
        (f"s3://{bucket}/p?conditional_writes=maybe", "true or false"),
        (f"s3://{bucket}/../etc", "invalid artifact key"),
        ("s3:///p", "invalid S3 bucket name"),
    ]:
        with pytest.raises(StoreError, match=match):
            open_store(bad)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    with pytest.raises(StoreError, match="does not exist"):
        open_store("s3://no-such-bucket-here/p")


def test_file_stores_never_import_s3fs(tmp_path: Path):
    import subprocess
    import sys

    code = (
        "import sys; from loradock.adapters.artifacts.store import open_store; "
        f"open_store({str(tmp_path)!r}).publish('t/a/v1', {{'a.json': b'{{}}'}}); "
        "bad = [m for m in ('s3fs', 'botocore', 'aiobotocore') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
