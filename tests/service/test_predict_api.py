"""Predict through the API: mixed batches, versions, promotion, limits, isolation."""

import threading

import pytest
from fastapi.testclient import TestClient

from loradock.adapters.artifacts.files import load_adapter
from tests.datasets import keyword_rows
from tests.service.test_app import assert_problem
from tests.service.test_training_api import FAST, create, wait_job

TEXTS = ["refund for my card charge", "login password error", "late package tracking", "hello"]


def trained(client, name="tickets", seed=0, rows_per_class=20, **extra):
    rows = keyword_rows(rows_per_class, seed=seed)
    resp = create(client, name=name, rows=rows, training_data=rows, **extra)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    return resp.json()["adapter"]["id"]


def predict(client, adapter, inputs, **extra):
    return client.post(f"/v1/adapters/{adapter}/predict", json={"inputs": inputs, **extra})


def test_predict_matches_the_stored_adapter(app_client):
    adapter_id = trained(app_client)
    resp = predict(app_client, "tickets", TEXTS)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["adapter"] == adapter_id
    assert body["version"] == 1
    assert len(body["predictions"]) == len(TEXTS)
    runtime = app_client.app.state.runtime
    key = app_client.get("/v1/adapters/tickets").json()["versions"][0]
    model = load_adapter(
        runtime.store, f"{runtime_tenant(app_client)}/{adapter_id}/v1", runtime.base
    )
    expected = model.predict(runtime.base, TEXTS)
    for got, want in zip(body["predictions"], expected, strict=True):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert set(got["scores"]) == {"billing", "login", "shipping"}
        assert sum(got["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert key["live"] is True


def runtime_tenant(client):
    return client.get("/v1/tenants").json()["tenants"][0]["id"]


def test_rows_come_back_in_order(app_client):
    trained(app_client)
    forward = predict(app_client, "tickets", TEXTS).json()["predictions"]
    backward = predict(app_client, "tickets", TEXTS[::-1]).json()["predictions"]
    assert [p["label"] for p in forward] == [p["label"] for p in backward[::-1]]


def test_concurrent_requests_for_different_adapters_share_batches(app_client):
    trained(app_client, "one", seed=1)
    trained(app_client, "two", seed=2)
    expected = {n: predict(app_client, n, TEXTS).json()["predictions"] for n in ("one", "two")}
    runtime = app_client.app.state.runtime
    runtime.serving.batcher.max_wait = 0.05  # let concurrent requests meet
    before = runtime.serving.batcher.stats.batches
    results, errors = {}, []

    def call(i):
        name = ("one", "two")[i % 2]
        r = predict(app_client, name, TEXTS)
        if r.status_code != 200:
            errors.append(r.text)
        results[i] = (name, r.json()["predictions"])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name, preds in results.values():
        assert [p["label"] for p in preds] == [p["label"] for p in expected[name]]
        for a, b in zip(preds, expected[name], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    stats = runtime.serving.batcher.stats
    assert stats.batches - before < 8  # some requests were answered by shared forward passes
    assert stats.largest > len(TEXTS)


def test_versions_and_promotion_swap_what_is_served(app_client):
    trained(app_client)
    body = {"training_data": keyword_rows(20, seed=7), "hyperparameters": FAST, "promote": "never"}
    job = app_client.post("/v1/adapters/tickets/versions", json=body).json()["job"]
    wait_job(app_client, job["id"])
    assert predict(app_client, "tickets", TEXTS).json()["version"] == 1
    assert predict(app_client, "tickets", TEXTS, version=2).json()["version"] == 2
    app_client.post("/v1/adapters/tickets/versions/2/promote")
    assert predict(app_client, "tickets", TEXTS).json()["version"] == 2  # at once, no TTL wait
    app_client.post("/v1/adapters/tickets/versions/1/promote")
    assert predict(app_client, "tickets", TEXTS).json()["version"] == 1
    assert_problem(predict(app_client, "tickets", TEXTS, version=5), 404, "no version 5")


def test_deleted_adapter_stops_serving_at_once(app_client):
    trained(app_client)
    assert predict(app_client, "tickets", TEXTS).status_code == 200
    app_client.delete("/v1/adapters/tickets")
    assert_problem(predict(app_client, "tickets", TEXTS), 404)
    assert app_client.app.state.runtime.engine.pool.resident() == 0


def test_adapter_still_training_is_409(app_client):
    slow = {**FAST, "epochs": 500, "early_stopping": False}
    job_id = create(app_client, hyperparameters=slow).json()["job"]["id"]
    assert_problem(predict(app_client, "tickets", TEXTS), 409, "still training")
    app_client.post(f"/v1/jobs/{job_id}/cancel")
    wait_job(app_client, job_id)


@pytest.mark.parametrize(
    ("inputs", "status", "detail"),
    [
        ([], 422, "inputs"),
        ([""], 422, "inputs[0] is empty"),
        (["ok"] * 300, 422, "LORADOCK_MAX_TEXTS_PER_REQUEST"),
        (["x" * 10_001], 422, "LORADOCK_MAX_TEXT_CHARS"),
        ([42], 422, "inputs.0"),
    ],
)
def test_bad_predict_inputs(app_client, inputs, status, detail):
    trained(app_client)
    assert_problem(predict(app_client, "tickets", inputs), status, detail)
    assert predict(app_client, "tickets", ["refund"]).status_code == 200


def test_long_texts_are_truncated_and_flagged(app_client):
    trained(app_client)
    preds = predict(app_client, "tickets", ["refund " * 200, "refund"]).json()["predictions"]
    assert preds[0]["truncated"] is True
    assert "truncated" not in preds[1]


def test_unknown_and_foreign_adapters_are_404(app_client):
    adapter_id = trained(app_client)
    assert_problem(predict(app_client, "nope", TEXTS), 404)
    tenant = app_client.post("/v1/tenants", json={"name": "other"}).json()
    key = app_client.post(f"/v1/tenants/{tenant['id']}/keys", json={"scopes": ["predict"]}).json()
    other = TestClient(app_client.app, headers={"Authorization": f"Bearer {key['key']}"})
    for ref in (adapter_id, "tickets"):
        assert_problem(predict(other, ref, TEXTS), 404)


def test_full_queue_is_429_with_retry_after(app_client):
    trained(app_client)
    app_client.app.state.runtime.serving.batcher.max_queue = 2
    resp = predict(app_client, "tickets", TEXTS)
    assert_problem(resp, 429, "LORADOCK_MAX_QUEUE_ROWS")
    assert int(resp.headers["retry-after"]) >= 1
    app_client.app.state.runtime.serving.batcher.max_queue = 1024
    assert predict(app_client, "tickets", TEXTS).status_code == 200


def test_requests_that_would_wait_too_long_are_shed(app_client):
    trained(app_client)
    batcher = app_client.app.state.runtime.serving.batcher
    assert predict(app_client, "tickets", TEXTS).status_code == 200
    assert batcher.tokens_per_second is not None
    assert batcher.tokens_per_second > 0
    batcher.max_wait = 0.3  # rows pile up while the first batch waits for company
    batcher.max_queue_wait = 1e-6  # any wait behind another request is too long
    statuses, bodies = [], []

    def call():
        r = predict(app_client, "tickets", TEXTS)
        statuses.append(r.status_code)
        bodies.append(r)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(200) >= 1  # the request at the head of the queue always runs
    shed = [r for r in bodies if r.status_code == 429]
    assert shed
    for r in shed:
        assert_problem(r, 429, "LORADOCK_MAX_QUEUE_WAIT_MS")
        assert int(r.headers["retry-after"]) >= 1
    batcher.max_wait, batcher.max_queue_wait = 0.005, 2.0
    assert predict(app_client, "tickets", TEXTS).status_code == 200


def test_training_refuses_what_serving_cannot_hold(app_client):
    assert_problem(create(app_client, hyperparameters={"rank": 16}), 422, "max_lora_rank 8")
    assert_problem(
        create(app_client, hyperparameters={"target_modules": ["dense"]}), 422, "not served"
    )


def test_a_lookup_racing_a_promotion_never_caches_the_old_version(app_client, monkeypatch):
    """The registry read of a request in flight during a promotion must not be cached."""
    trained(app_client)
    body = {"training_data": keyword_rows(20, seed=7), "hyperparameters": FAST, "promote": "never"}
    wait_job(
        app_client, app_client.post("/v1/adapters/tickets/versions", json=body).json()["job"]["id"]
    )
    live = app_client.app.state.runtime.serving.live
    tenant = runtime_tenant(app_client)
    live.invalidate("warm")  # start from an empty cache entry for "tickets"
    real_read = live._read
    read_done, promoted = threading.Event(), threading.Event()

    def slow_read(*args):
        target = real_read(*args)  # reads version 1 ...
        read_done.set()
        promoted.wait(10)  # ... and a promotion commits before it is stored
        return target

    monkeypatch.setattr(live, "_read", slow_read)
    seen = {}
    t = threading.Thread(target=lambda: seen.setdefault("v", live.resolve(tenant, "tickets", None)))
    t.start()
    read_done.wait(10)
    monkeypatch.setattr(live, "_read", real_read)
    assert app_client.post("/v1/adapters/tickets/versions/2/promote").status_code == 200
    promoted.set()
    t.join()
    assert seen["v"].version == 1  # the racing request itself answered from what it read
    assert live.resolve(tenant, "tickets", None).version == 2  # but nothing stale was cached
    assert predict(app_client, "tickets", TEXTS).json()["version"] == 2


def test_per_tenant_rate_limit(app_client):
    from loradock.service.ratelimit import TenantRateLimiter

    trained(app_client)
    runtime = app_client.app.state.runtime
    runtime.serving.rate_limiter = TenantRateLimiter(rate=0.5, burst=2)
    assert predict(app_client, "tickets", ["refund"]).status_code == 200
    assert predict(app_client, "tickets", ["refund"]).status_code == 200
    resp = predict(app_client, "tickets", ["refund"])
    assert_problem(resp, 429, "LORADOCK_PREDICT_RATE_PER_TENANT")
    assert int(resp.headers["retry-after"]) >= 1
    # another tenant has its own bucket
    tenant = app_client.post("/v1/tenants", json={"name": "other"}).json()
    key = app_client.post(f"/v1/tenants/{tenant['id']}/keys", json={"scopes": ["predict"]}).json()
    other = TestClient(app_client.app, headers={"Authorization": f"Bearer {key['key']}"})
    assert_problem(predict(other, "tickets", ["refund"]), 404)  # not 429: its bucket is full


def test_token_bucket_refills():
    import time

    from loradock.service.errors import TooManyRequests
    from loradock.service.ratelimit import TenantRateLimiter

    limiter = TenantRateLimiter(rate=20, burst=1)
    limiter.take("t")
    with pytest.raises(TooManyRequests):
        limiter.take("t")
    time.sleep(0.08)  # 20/s refills one token in 50 ms
    limiter.take("t")
    TenantRateLimiter(rate=0, burst=1).take("t")  # off: never raises


def test_a_corrupt_or_missing_artifact_fails_only_its_adapter(app_client):
    from tests.service.test_app import metric_value

    broken_id = trained(app_client, "broken", seed=1)
    trained(app_client, "fine", seed=2)
    runtime = app_client.app.state.runtime
    key = f"{runtime_tenant(app_client)}/{broken_id}/v1"
    head = runtime.store._path(key) / "head.safetensors"
    good = head.read_bytes()
    assert predict(app_client, "broken", TEXTS).status_code == 200

    def evict_and_predict():
        runtime.serving.engine.pool.drop(broken_id)  # as if evicted, or after a restart
        return predict(app_client, "broken", TEXTS)

    def failures(reason):
        text = app_client.get("/metrics").text
        return metric_value(text, "loradock_adapter_load_failures_total", {"reason": reason}) or 0

    head.write_bytes(good[:-4] + b"\x00\x00\x00\x00")  # bit rot
    body = assert_problem(evict_and_predict(), 503, "corrupt")
    assert "does not match its manifest" in body["detail"]
    assert failures("corrupt") == 1
    assert predict(app_client, "fine", TEXTS).status_code == 200  # the others are untouched

    head.unlink()  # a lost file
    assert_problem(evict_and_predict(), 503, "is missing its file")
    manifest = runtime.store._path(key) / "manifest.json"
    saved = manifest.read_bytes()
    manifest.unlink()  # the whole version gone
    assert_problem(evict_and_predict(), 503, "missing")
    assert failures("missing") == 1
    assert predict(app_client, "fine", TEXTS).status_code == 200
    assert app_client.get("/healthz").status_code == 200

    head.write_bytes(good)  # repaired: served again without a restart
    manifest.write_bytes(saved)
    assert evict_and_predict().status_code == 200
