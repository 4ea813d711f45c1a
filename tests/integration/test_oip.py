"""Open Inference Protocol v2 against a real server, with the real tritonclient: JSON tensors,
and the binary tensor data extension it uses by default."""

import json
import struct
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.datasets import keyword_rows
from tests.server import ServerProcess

pytestmark = pytest.mark.integration
TEXTS = ["refund for my card charge", "login password error", "late package tracking"]
FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 3}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    data = tmp_path_factory.mktemp("oip") / "data"
    with ServerProcess(data, base_model=tiny_bert_dir) as srv:
        with srv.client() as c:
            body = {"name": "tickets", "training_data": keyword_rows(20), "hyperparameters": FAST}
            job_id = c.post("/v1/adapters", json=body).json()["job"]["id"]
            deadline = time.monotonic() + 120
            while c.get(f"/v1/jobs/{job_id}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.2)
        yield srv


@pytest.fixture
def client(server):
    return triton.InferenceServerClient(url=server.url.removeprefix("http://"))


def auth(server):
    return {"Authorization": f"Bearer {server.admin_key}"}


def test_health_and_metadata(server, client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["name"] == "loradock"
    assert client.is_model_ready("tickets", headers=auth(server))
    meta = client.get_model_metadata("tickets", headers=auth(server))
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "scores"]
    assert meta["outputs"][1]["shape"] == [-1, 3]


@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_infer_matches_v1_predict(server, client, shape):
    tensor = triton.InferInput("text", shape, "BYTES")
    tensor.set_data_from_numpy(np.array(TEXTS, dtype=object).reshape(shape), binary_data=False)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=False),
        triton.InferRequestedOutput("scores", binary_data=False),
    ]
    result = client.infer("tickets", [tensor], outputs=outputs, headers=auth(server))
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
    scores = result.as_numpy("scores")
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    with server.client() as c:
        v1 = c.post("/v1/adapters/tickets/predict", json={"inputs": TEXTS}).json()["predictions"]
    assert labels == [p["label"] for p in v1]
    expected = [[p["scores"][k] for k in ("billing", "login", "shipping")] for p in v1]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    versioned = client.infer("tickets", [tensor], model_version="1", headers=auth(server))
    assert versioned.get_response()["model_version"] == "1"


def test_auth_is_required(server, client):
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(["x"], dtype=object), binary_data=False)
    with pytest.raises(InferenceServerException, match="Authorization"):
        client.infer("tickets", [tensor])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}], "datatype BYTES"),
        ([{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}], "shape"),
        ([{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}], "1 elements"),
        ([{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "named 'text'"),
        ([{"name": "text", "shape": [1], "datatype": "BYTES", "data": [5]}], "strings"),
    ],
)
def test_bad_tensors_are_400_in_the_protocols_format(server, inputs, message):
    r = httpx.post(f"{server.url}/v2/models/tickets/infer", json={"inputs": inputs},
                   headers=auth(server))  # fmt: skip
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert message in r.json()["error"]


def test_unknown_model_and_malformed_body(server):
    one = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}
    r = httpx.post(
        f"{server.url}/v2/models/nope/infer", headers=auth(server), json={"inputs": [one]}
    )
    assert r.status_code == 404
    assert "not found" in r.json()["error"]
    for junk in (b"{oops", b"\x00" * 9, b"\xff\xfe\x00"):  # NULs once gave a 500 (found by fuzz)
        r = httpx.post(f"{server.url}/v2/models/tickets/infer", headers=auth(server), content=junk)
        assert r.status_code == 400
        assert set(r.json()) == {"error"}


def v1_predictions(server):
    with server.client() as c:
        return c.post("/v1/adapters/tickets/predict", json={"inputs": TEXTS}).json()["predictions"]


def test_tritonclient_defaults_binary_both_ways(server, client):
    """tritonclient's defaults: the input as binary data, and (no outputs named) every output
    asked for as binary data."""
    tensor = triton.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(TEXTS, dtype=object))  # binary_data=True by default
    result = client.infer("tickets", [tensor], headers=auth(server))
    response = result.get_response()
    assert all("data" not in o for o in response["outputs"])
    assert all(o["parameters"]["binary_data_size"] > 0 for o in response["outputs"])
    v1 = v1_predictions(server)
    assert [x.decode() for x in result.as_numpy("label")] == [p["label"] for p in v1]
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32
    assert scores.shape == (3, 3)
    expected = [[p["scores"][k] for k in ("billing", "login", "shipping")] for p in v1]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    # Named outputs with their default (binary) and one as JSON, on a versioned route.
    outputs = [triton.InferRequestedOutput("label"),
               triton.InferRequestedOutput("scores", binary_data=False)]  # fmt: skip
    mixed = client.infer("tickets", [tensor], outputs=outputs, model_version="1",
                         headers=auth(server))  # fmt: skip
    by_name = {o["name"]: o for o in mixed.get_response()["outputs"]}
    assert "data" not in by_name["label"]
    assert len(by_name["scores"]["data"]) == 9
    assert [x.decode() for x in mixed.as_numpy("label")] == [p["label"] for p in v1]


def binary_request(texts, extra=b"", size_delta=0):
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    size = {"binary_data_size": len(raw) + size_delta}
    tensor = {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "parameters": size}
    head = json.dumps({"inputs": [tensor]})
    return head.encode(), raw + extra


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("trailing", "belong to no input"),
        ("too_big", "does not fit"),
        ("header_length", "Inference-Header-Content-Length"),
        ("not_utf8", "not UTF-8"),
        ("truncated", "runs past the data"),
    ],
)
def test_bad_binary_tensors_are_400(server, case, message):
    head, raw = binary_request(["refund", "late"])
    length = str(len(head))
    if case == "trailing":
        raw += b"xx"
    elif case == "too_big":
        head, raw = binary_request(["refund", "late"], size_delta=10)
        length = str(len(head))
    elif case == "header_length":
        length = str(len(head) + len(raw) + 1)
    elif case == "not_utf8":
        head, raw = binary_request(["ok"])
        raw = raw[:4] + b"\xff\xfe"
        length = str(len(head))
    elif case == "truncated":
        raw = raw[:-2]
        head = head.replace(str(len(raw) + 2).encode(), str(len(raw)).encode())
        length = str(len(head))
    r = httpx.post(f"{server.url}/v2/models/tickets/infer", content=head + raw,
                   headers={**auth(server), "Inference-Header-Content-Length": length})  # fmt: skip
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_versioned_metadata_and_readiness_list_every_version(server, client):
    with server.client() as c:
        body = {"training_data": keyword_rows(20, seed=3), "hyperparameters": FAST,
                "promote": "never"}  # fmt: skip
        job_id = c.post("/v1/adapters/tickets/versions", json=body).json()["job"]["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{job_id}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    live = client.get_model_metadata("tickets", headers=auth(server))
    assert live["versions"] == ["1", "2"]
    assert live["parameters"]["version"] == "1"  # v2 was not promoted
    second = client.get_model_metadata("tickets", model_version="2", headers=auth(server))
    assert second["parameters"]["version"] == "2"
    assert second["versions"] == ["1", "2"]
    assert client.is_model_ready("tickets", model_version="2", headers=auth(server))
    r = httpx.get(f"{server.url}/v2/models/tickets/versions/9/ready", headers=auth(server))
    assert r.status_code == 404
    assert set(r.json()) == {"error"}
    r = httpx.get(f"{server.url}/v2/models/tickets/versions/9", headers=auth(server))
    assert r.status_code == 404
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
