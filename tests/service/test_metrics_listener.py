"""/metrics on its own listener, and a scrape cost that does not grow with the scrape rate."""

import httpx

from tests.conftest import started_client
from tests.service.test_app import assert_problem
from tests.service.test_predict_api import trained


def test_metrics_can_move_to_their_own_port(settings, metrics):
    settings.metrics_port = 0  # any free port
    with started_client(settings, metrics) as c:
        trained(c)
        assert_problem(c.get("/metrics"), 404, "LORADOCK_METRICS_PORT")
        port = c.app.state.metrics_port
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert resp.status_code == 200
        assert 'loradock_training_jobs{state="succeeded"} 1.0' in resp.text
        assert "loradock_adapter_validation_loss" in resp.text


def test_registry_aggregates_are_read_once_per_cache_period(settings, metrics):
    settings.metrics_cache_seconds = 60
    with started_client(settings, metrics) as c:
        collector = c.app.state.runtime.state_collector
        for _ in range(20):
            assert c.get("/metrics").status_code == 200
        assert collector.registry_reads == 1
        trained(c)  # in-memory metrics stay live; registry aggregates wait for the period
        body = c.get("/metrics").text
        assert "loradock_predict_requests_total" in body or "loradock_http_requests" in body
        assert collector.registry_reads == 1
        collector._cached_at = float("-inf")  # the period has passed
        assert 'loradock_training_jobs{state="succeeded"} 1.0' in c.get("/metrics").text
        assert collector.registry_reads == 2
