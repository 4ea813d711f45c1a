"""Open Inference Protocol v2 against a real server, with the real tritonclient (JSON data)."""

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
