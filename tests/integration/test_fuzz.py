"""Property-based fuzz of the whole OpenAPI document (schemathesis) against a running server.

Valid and invalid requests for every operation, with random ids and with the ids of real objects.
Every answer must be a non-5xx; every error must be problem+json (OIP routes: `{"error"}`) with no
stack trace or internal path; the server stays healthy and the seeded adapter keeps answering the
same predictions. Bounded: LORADOCK_FUZZ_EXAMPLES examples per generation mode (default 120).
"""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.datasets import keyword_rows
from tests.integration.test_jobs_restart import wait_for
from tests.server import ServerProcess

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("LORADOCK_FUZZ_EXAMPLES", "120"))
TEXTS = ["refund for my card charge", "login password error"]
LEAKS = ("Traceback", 'File "/', "site-packages", "/tmp/", "/work/", "sqlalchemy", "sqlite3")
OPENAI_ROUTES = ("/v1/chat/", "/v1/completions", "/v1/models", "/v1/files", "/v1/fine_tuning")
FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    # Seed one trained adapter, then fuzz a server that trains nothing (jobs the fuzz queues stay
    # queued), so the run is about the HTTP surface and stays short on two cores.
    with ServerProcess(data, base_model=tiny_bert_dir) as seed, seed.client() as c:
        body = {"name": "tickets", "training_data": keyword_rows(20), "hyperparameters": FAST}
        job = c.post("/v1/adapters", json=body).json()["job"]["id"]
        wait_for(c, job, lambda j: j["status"] == "succeeded", timeout=120)
    with ServerProcess(data, base_model=tiny_bert_dir, job_workers=0) as srv:
        with srv.client() as c:
            srv.job_id = job  # type: ignore[attr-defined]
            srv.before = c.post(  # type: ignore[attr-defined]
                "/v1/adapters/tickets/predict", json={"inputs": TEXTS}
            ).json()["predictions"]
        yield srv


def check(case, response):
    path = case.operation.path
    text = response.content.decode("utf-8", errors="replace")  # downloads are binary zips
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {text[:300]}"
    assert response.status_code < 500, where
    for leak in LEAKS:
        assert leak not in text, where
    if response.status_code < 400:
        return
    ctype = response.headers.get("content-type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if path.startswith("/v2"):
        assert ctype.startswith("application/json"), where
        assert isinstance(response.json().get("error"), str), where
    elif path.startswith(OPENAI_ROUTES):  # OpenAI's shape, which the openai client parses
        assert ctype.startswith("application/json"), where
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert error["message"], where
        assert error["type"], where
    else:
        assert ctype.startswith("application/problem+json"), where
        body = response.json()
        assert body["status"] == response.status_code, where
        assert body["title"], where
        assert body["detail"], where
        assert body["type"].startswith("urn:loradock:"), where
    retry = response.headers.get("retry-after")
    if response.status_code == 429:  # retrying helps: the header says when
        assert retry is not None, where
    if retry is not None:  # whole seconds, at least 1 (0 would invite a retry storm)
        assert int(retry[0] if isinstance(retry, list) else retry) >= 1, where


def fuzz(server, strategy):
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    calls = {"n": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case):
        calls["n"] += 1
        response = case.call(base_url=server.url, headers=headers, timeout=30)
        check(case, response)

    run()
    assert calls["n"] > EXAMPLES // 2  # the strategy really produced requests
    with server.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_random_ids(server, schema, mode):
    fuzz(server, schema.as_strategy(generation_mode=mode))


def test_fuzz_real_ids(server, schema):
    """The same operations on the real adapter, version and job (deletes excluded: they would
    only end the run early), so request bodies reach the code behind the lookups."""
    real = schema.exclude(method="DELETE")
    ids = {"adapter": "tickets", "version": 1, "job_id": server.job_id}
    fuzz(server, real.as_strategy(path_parameters=ids))


def test_state_is_intact_after_the_fuzz(server):
    with server.client() as c:
        assert c.get("/healthz").status_code == 200
        after = c.post("/v1/adapters/tickets/predict", json={"inputs": TEXTS})
        assert after.status_code == 200, after.text
        for got, want in zip(after.json()["predictions"], server.before, strict=True):
            assert got["label"] == want["label"]
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
