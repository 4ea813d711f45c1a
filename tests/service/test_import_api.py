"""POST /v1/adapters/import: a downloaded version comes back as a new adapter; anything off is
refused with a clear 4xx before a byte is stored."""

import io
import json
import stat
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loradock.adapters.artifacts.files import load_adapter
from loradock.adapters.core import lora
from loradock.adapters.core.lora import PEFT_PREFIX
from tests.service.test_app import assert_problem
from tests.service.test_predict_api import TEXTS, predict, trained
from tests.service.test_training_api import store_keys

HEAD, META, PEFT_WEIGHTS = "head.safetensors", "loradock.json", "adapter_model.safetensors"


def download(client, adapter="tickets"):
    resp = client.get(f"/v1/adapters/{adapter}/download")
    assert resp.status_code == 200, resp.text
    return resp.content


def unzip(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rezip(files, *, drop_manifest=True):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, raw in files.items():
            if drop_manifest and name == "manifest.json":
                continue
            zf.writestr(name, raw)
    return buf.getvalue()


def upload(client, data, name="copy", filename="tickets-v1.zip"):
    fields = {"name": name} if name is not None else {}
    return client.post(
        "/v1/adapters/import",
        files={"file": (filename, data, "application/zip")},
        data=fields,
    )


def edit_tensors(files, name, fn):
    tensors = st_load(files[name])
    fn(tensors)
    return {**files, name: st_save(tensors)}


def edit_meta(files, fn):
    meta = json.loads(files[META])
    fn(meta)
    return {**files, META: json.dumps(meta).encode()}


def with_lora(files, runtime, rank=4):
    """The files plus random LoRA matrices on every served layer (a LoRA-winner artifact)."""
    pool = runtime.serving.engine.pool
    shapes = {t.name: (t.in_features, t.out_features) for t in runtime.base.linear_targets()}
    spec = lora.LoRASpec(
        rank=rank,
        alpha=2.0 * rank,
        dropout=0.0,
        target_modules=tuple(pool.target_modules),
        layers=None,
    )
    weights = lora.LoRAWeights(
        spec, {n: shapes[n] for n in pool.names}, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        for b in weights.B:
            b.normal_(0, 0.5)
    files = edit_meta(
        files,
        lambda m: m.update(
            has_lora=True,
            lora={"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0,
                  "target_modules": list(pool.target_modules), "layers": None,
                  "modules": weights.names},
        ),
    )  # fmt: skip
    config = json.dumps(weights.peft_config(str(runtime.base.path))).encode()
    return {
        **files,
        "adapter_config.json": config,
        PEFT_WEIGHTS: st_save(weights.peft_state_dict()),
    }


def test_download_then_import_serves_the_same_predictions(app_client):
    trained(app_client)
    original = predict(app_client, "tickets", TEXTS).json()["predictions"]
    resp = upload(app_client, download(app_client))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["name"] == "copy"
    assert body["status"] == "ready"
    assert body["live_version"] == 1
    assert body["labels"] == ["billing", "login", "shipping"]
    assert body["versions"][0]["report"]["imported_from"]["version"] == 1
    assert body["versions"][0]["metrics"]["val_macro_f1"] is not None
    copied = predict(app_client, "copy", TEXTS).json()
    assert copied["adapter"] == body["id"]
    for got, want in zip(copied["predictions"], original, strict=True):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    # the reference profile came along: monitoring works on the copy
    assert app_client.get("/v1/adapters/copy/monitoring").status_code == 200
    # and the copy downloads again as an importable zip
    again = upload(app_client, download(app_client, "copy"), name="copy2")
    assert again.status_code == 201, again.text


def test_name_defaults_to_the_file_name_and_must_be_free(app_client):
    trained(app_client)
    data = download(app_client)
    before = store_keys(app_client)
    assert_problem(upload(app_client, data, name=None), 409, "already exists")  # "tickets"
    assert store_keys(app_client) == before  # the refused import left nothing behind
    resp = upload(app_client, data, name=None, filename="routing-v3.zip")
    assert resp.status_code == 201, resp.text
    assert resp.json()["name"] == "routing"
    assert_problem(upload(app_client, data, name="bad name!"), 422, "name")


def _symlink_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("loradock.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _bomb(size):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("reference.json", b"0" * size)
    return buf.getvalue()


def _nan_head(t):
    t["weight"][0, 0] = float("nan")


def _int_head(t):
    t["weight"] = t["weight"].to(torch.int32)


def _wrong_head_shape(t):
    t["weight"] = t["weight"][:, :-1].contiguous()


def _foreign_module(t):
    key = next(k for k in t if k.endswith(".lora_A.weight"))
    t[f"{PEFT_PREFIX}encoder.layer.0.output.dense.lora_A.weight"] = t[key].clone()


def _not_a_module(t):
    key = next(k for k in t if k.endswith(".lora_A.weight"))
    t[f"{PEFT_PREFIX}encoder.layer.99.attention.self.query.lora_A.weight"] = t[key].clone()


def _wrong_lora_shape(t):
    key = next(k for k in t if k.endswith(".lora_B.weight"))
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])


def _unpaired(t):
    key = next(k for k in t if k.endswith(".lora_B.weight"))
    del t[key]


BAD_META = [
    ("other base", lambda m: m.update(base_fingerprint="sha256:0000"), "base"),
    ("bad task", lambda m: m.update(task="generation"), "task"),
    ("one label", lambda m: m.update(labels=["billing"]), "labels"),
    ("label count", lambda m: m.update(labels=["a", "b"]), "head.safetensors"),
    ("rank too big", lambda m: m["lora"].update(rank=999), "rank"),
    ("bad format", lambda m: m.update(format=99), "format"),
]
BAD_TENSORS = [
    (HEAD, _nan_head, "NaN"),
    (HEAD, _int_head, "floating point"),
    (HEAD, _wrong_head_shape, "head.safetensors"),
    (PEFT_WEIGHTS, _foreign_module, "not served"),
    (PEFT_WEIGHTS, _not_a_module, "not a Linear layer"),
    (PEFT_WEIGHTS, _wrong_lora_shape, "shape"),
    (PEFT_WEIGHTS, _unpaired, "lack lora_A or lora_B"),
]


def test_an_imported_lora_adapter_predicts_like_the_reference_implementation(app_client):
    trained(app_client)
    runtime = app_client.app.state.runtime
    files = with_lora(unzip(download(app_client)), runtime)
    resp = upload(app_client, rezip(files), name="lora-copy")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    tenant = app_client.get("/v1/tenants").json()["tenants"][0]["id"]
    model = load_adapter(runtime.store, f"{tenant}/{body['id']}/v1", runtime.base)
    assert model.weights is not None  # the LoRA matrices were stored, not dropped
    want = model.predict(runtime.base, TEXTS)
    got = predict(app_client, "lora-copy", TEXTS).json()["predictions"]
    plain = predict(app_client, "tickets", TEXTS).json()["predictions"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["score"], abs=1e-4)
    assert any(  # the LoRA delta really changes the outputs of the same head
        abs(g["score"] - p["score"]) > 1e-3 for g, p in zip(got, plain, strict=True)
    )


def test_bad_archives_are_refused_and_store_nothing(app_client):
    trained(app_client)
    good = with_lora(unzip(download(app_client)), app_client.app.state.runtime)
    cases = [
        ("not a zip", b"PK\x03\x04 not really a zip", "not a zip"),
        ("empty", rezip({}), "empty"),
        ("traversal", rezip({**good, "../evil.json": b"{}"}), "top level"),
        ("absolute", rezip({**good, "/etc/evil.json": b"{}"}), "top level"),
        ("folder", rezip({**good, "sub/head.safetensors": good[HEAD]}), "top level"),
        ("pickle", rezip({**good, "model.bin": b"\x80\x04K\x01."}), ".safetensors"),
        ("python", rezip({**good, "evil.py": b"import os"}), ".safetensors"),
        ("symlink", _symlink_zip(), "symbolic link"),
        ("no meta", rezip({k: v for k, v in good.items() if k != META}), META),
        ("no head", rezip({k: v for k, v in good.items() if k != HEAD}), HEAD),
        ("garbage tensors", rezip({**good, HEAD: b"\x00" * 64}), "safetensors"),
        ("bad json", rezip({**good, META: b"{not json"}), "JSON"),
        ("extra file", rezip({**good, "notes.json": b"{}"}), "unexpected"),
        (
            "tampered with manifest",
            rezip({**unzip(download(app_client)), HEAD: good[PEFT_WEIGHTS]}, drop_manifest=False),
            "sha256",
        ),
        (
            "half a profile",
            rezip({k: v for k, v in good.items() if k != "reference.safetensors"}),
            "reference",
        ),
    ]
    cases += [(label, rezip(edit_meta(good, fn)), part) for label, fn, part in BAD_META]
    cases += [
        (f"{name}: {fn.__name__}", rezip(edit_tensors(good, name, fn)), part)
        for name, fn, part in BAD_TENSORS
    ]
    before_keys = store_keys(app_client)
    for label, data, part in cases:
        body = assert_problem(upload(app_client, data, name="x"), 422)
        assert part in body["detail"], (label, body["detail"])
    assert store_keys(app_client) == before_keys
    assert [a["name"] for a in app_client.get("/v1/adapters").json()["adapters"]] == ["tickets"]
    # the server is fine and still imports a good one
    assert upload(app_client, rezip(good)).status_code == 201


def test_size_caps_apply_packed_and_unpacked(app_client):
    runtime = app_client.app.state.runtime
    runtime.settings.max_import_bytes = 64 * 1024
    assert_problem(upload(app_client, b"0" * (65 * 1024)), 413, "LORADOCK_MAX_IMPORT_BYTES")
    bomb = _bomb(10 * 1024 * 1024)  # 10 MiB of zeros packs into ~10 KiB
    assert len(bomb) < 64 * 1024
    assert_problem(upload(app_client, bomb), 413, "unpacks to more than")
    assert app_client.get("/v1/adapters").json()["adapters"] == []


def test_import_needs_a_multipart_file_and_the_train_scope(app_client):
    assert_problem(app_client.post("/v1/adapters/import", json={"file": "x"}), 422, "multipart")
    resp = app_client.post("/v1/adapters/import", data={"name": "x"}, files={"other": ("a", b"")})
    assert resp.status_code == 422
    tenant = app_client.get("/v1/tenants").json()["tenants"][0]["id"]
    key = app_client.post(f"/v1/tenants/{tenant}/keys", json={"scopes": ["predict"]}).json()
    reader = TestClient(app_client.app, headers={"Authorization": f"Bearer {key['key']}"})
    assert_problem(upload(reader, b"PK"), 403)
