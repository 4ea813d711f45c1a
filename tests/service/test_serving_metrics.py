"""Serving and training metrics after real traffic, scraped from /metrics."""

from prometheus_client.parser import text_string_to_metric_families

from tests.service.test_predict_api import TEXTS, predict, trained


def samples(client):
    text = client.get("/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples], text


def value(all_samples, name, **labels):
    found = [s.value for s in all_samples if s.name == name and labels.items() <= s.labels.items()]
    assert found, f"{name} {labels} not exported"
    return sum(found)


def test_serving_and_training_metrics(app_client):
    trained(app_client)
    for _ in range(3):
        assert predict(app_client, "tickets", TEXTS).status_code == 200
    assert predict(app_client, "nope", TEXTS).status_code == 404
    assert predict(app_client, "tickets", [""]).status_code == 422
    got, text = samples(app_client)

    assert value(got, "loradock_predict_requests_total", protocol="v1") == 3
    assert value(got, "loradock_predict_rows_total") == 3 * len(TEXTS)
    assert value(got, "loradock_predict_failures_total", protocol="v1", reason="not_found") == 1
    assert value(got, "loradock_predict_failures_total", protocol="v1", reason="invalid") == 1
    assert value(got, "loradock_predict_duration_seconds_count", protocol="v1") == 3
    assert value(got, "loradock_queue_wait_seconds_count") == 3
    assert value(got, "loradock_batch_rows_count") >= 1
    assert value(got, "loradock_batch_rows_sum") == 3 * len(TEXTS)
    assert value(got, "loradock_inference_duration_seconds_count") >= 1
    assert value(got, "loradock_queue_rows") == 0
    assert value(got, "loradock_adapters_resident", tier="device") == 1
    assert value(got, "loradock_adapters_resident", tier="cpu") == 0
    assert value(got, "loradock_adapter_cache_loads_total") == 1
    assert value(got, "loradock_adapter_cache_hits_total") >= 2
    assert value(got, "loradock_adapter_load_duration_seconds_count") == 1

    assert value(got, "loradock_training_jobs", state="succeeded") == 1
    assert value(got, "loradock_training_jobs", state="running") == 0
    assert value(got, "loradock_training_epochs_total") >= 1
    assert value(got, "loradock_training_steps_total") >= 1
    assert value(got, "loradock_training_jobs_finished_total", status="succeeded") == 1
    assert sum(s.value for s in got if s.name == "loradock_training_stops_total") == 1
    assert value(got, "loradock_training_duration_seconds_count") == 1
    assert not [s for s in got if s.name == "loradock_training_job_loss"]  # job over: series gone

    # bounded cardinality: no histogram carries an adapter (or any per-object) label
    for s in got:
        if s.name.endswith(("_bucket", "_count", "_sum")):
            assert not {"adapter", "job", "tenant"} & set(s.labels), s
    assert "tickets" not in text
