"""Retries against a real local HTTP server: which requests, how long between, how many."""

import asyncio
import itertools
import time
from datetime import UTC, datetime

import pytest
from loradock_client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionFailed,
    RateLimited,
    RetryEvent,
    RetryPolicy,
    ServerError,
    ServerUnavailable,
)
from loradock_client.errors import APIError, parse_retry_after

from tests.clients import samples
from tests.clients.fake_server import FakeServer, Reply, closed_port, problem

PREDICT = "/v1/adapters/tickets/predict"
FAST = RetryPolicy(max_attempts=4, backoff=0.05, max_backoff=1.0)


def client_for(server: FakeServer, retry: RetryPolicy = FAST, seen: list | None = None) -> Client:
    return Client(server.url, "k", retry=retry, on_retry=seen.append if seen is not None else None)


def gaps(requests) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(requests)]


def test_429_waits_retry_after_then_succeeds():
    with FakeServer() as server:
        server.on(
            "POST",
            PREDICT,
            Reply(429, problem(429, "queue full"), {"Retry-After": "1"}),
            Reply(200, samples.prediction(["billing"])),
        )
        seen: list[RetryEvent] = []
        with client_for(server, seen=seen) as client:
            result = client.predict("tickets", ["refund"])
    assert result.labels == ["billing"]
    hits = server.hits("POST", PREDICT)
    assert len(hits) == 2
    assert gaps(hits)[0] >= 1.0  # Retry-After honoured, not the (shorter) backoff
    assert seen[0].status == 429
    assert 1.0 <= seen[0].delay <= 1.0 + FAST.backoff
    assert hits[1].json() == {"inputs": ["refund"], "version": None}


def test_503_without_retry_after_backs_off_exponentially_with_jitter():
    with FakeServer() as server:
        server.on(
            "GET",
            "/v1/adapters",
            *[Reply(503, problem(503, "loading"))] * 3,
            Reply(200, {"adapters": [samples.adapter()]}),
        )
        seen: list[RetryEvent] = []
        policy = RetryPolicy(max_attempts=4, backoff=0.1, max_backoff=10)
        with client_for(server, policy, seen) as client:
            assert [a.name for a in client.adapters.list()] == ["tickets"]
    delays = [e.delay for e in seen]
    assert [e.attempt for e in seen] == [1, 2, 3]
    for n, delay in enumerate(delays, 1):  # equal jitter: [cap/2, cap], cap = 0.1 * 2**(n-1)
        cap = 0.1 * 2 ** (n - 1)
        assert cap / 2 <= delay <= cap
    for gap, delay in zip(gaps(server.hits("GET", "/v1/adapters")), delays, strict=True):
        assert gap >= delay


def test_backoff_is_capped_and_jittered():
    policy = RetryPolicy(backoff=1.0, max_backoff=2.0)
    delays = [policy.backoff_delay(10) for _ in range(200)]
    assert all(1.0 <= d <= 2.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100  # jitter: clients do not retry in lockstep


def test_attempts_are_bounded_and_the_last_error_is_raised():
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(429, problem(429, "slow down"), {"Retry-After": "0"}))
        with (
            client_for(server, RetryPolicy(max_attempts=3, backoff=0.01)) as client,
            pytest.raises(RateLimited) as err,
        ):
            client.predict("tickets", ["x"])
    assert len(server.hits("POST", PREDICT)) == 3
    assert err.value.status == 429
    assert err.value.retry_after == 0
    assert err.value.detail == "slow down"


def test_a_retry_after_beyond_the_limit_is_raised_at_once():
    with FakeServer() as server:
        server.on(
            "GET", "/v1/adapters", Reply(503, problem(503, "draining"), {"Retry-After": "120"})
        )
        policy = RetryPolicy(max_retry_after=30)
        with client_for(server, policy) as client, pytest.raises(ServerUnavailable) as err:
            client.adapters.list()
    assert len(server.hits("GET", "/v1/adapters")) == 1
    assert err.value.retry_after == 120


@pytest.mark.parametrize(
    ("status", "error"), [(500, ServerError), (409, Conflict), (502, APIError), (504, APIError)]
)
def test_a_post_the_server_may_have_acted_on_is_not_retried(status, error):
    cancel = "/v1/jobs/job_1/cancel"
    with FakeServer() as server:
        server.on("POST", cancel, Reply(status, problem(status, "nope")), Reply(202, samples.job()))
        with client_for(server) as client, pytest.raises(error):
            client.jobs.cancel("job_1")
    assert len(server.hits("POST", cancel)) == 1


@pytest.mark.parametrize("status", [502, 504])
def test_predict_changes_nothing_so_gateway_errors_are_retried(status):
    with FakeServer() as server:
        server.on(
            "POST",
            PREDICT,
            Reply(status, problem(status, "nope")),
            Reply(200, samples.prediction(["billing"])),
        )
        with client_for(server) as client:
            assert client.predict("tickets", ["x"]).labels == ["billing"]
    assert len(server.hits("POST", PREDICT)) == 2


def test_gateway_errors_are_retried_for_idempotent_requests():
    with FakeServer() as server:
        server.on(
            "GET",
            "/v1/adapters/tickets",
            Reply(502, "bad gateway"),
            Reply(504, ""),
            Reply(200, samples.adapter()),
        )
        with client_for(server) as client:
            assert client.adapters.get("tickets").name == "tickets"
    assert len(server.hits("GET", "/v1/adapters/tickets")) == 3


def test_a_dropped_connection_is_retried_for_get_but_not_for_post():
    with FakeServer() as server:
        server.on("GET", "/v1/jobs/job_1", Reply(drop=True), Reply(200, samples.job()))
        server.on("POST", "/v1/jobs/job_1/cancel", Reply(drop=True), Reply(202, samples.job()))
        with client_for(server) as client:
            assert client.jobs.get("job_1").status == "succeeded"
            with pytest.raises(ConnectionFailed) as err:
                client.jobs.cancel("job_1")  # the server may have cancelled it: not repeated
    assert len(server.hits("GET", "/v1/jobs/job_1")) == 2
    assert len(server.hits("POST", "/v1/jobs/job_1/cancel")) == 1
    assert "/v1/jobs/job_1/cancel" in str(err.value)
    assert err.value.status is None


def test_connect_errors_are_retried_for_every_method_then_reported():
    url = f"http://127.0.0.1:{closed_port()}"
    for send in (lambda c: c.adapters.list(), lambda c: c.predict("tickets", ["x"])):
        seen: list[RetryEvent] = []
        with (
            Client(url, "k", retry=FAST, on_retry=seen.append) as client,
            pytest.raises(ConnectionFailed) as err,
        ):
            send(client)
        assert len(seen) == FAST.max_attempts - 1  # nothing was sent, so even POST is retried
        assert "ConnectError" in seen[0].reason
        assert url in str(err.value)
        assert "after 4 attempts" in str(err.value)


def test_retry_after_as_an_http_date():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:07 GMT", now=now) == 7
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0  # in the past
    assert parse_retry_after("3") == 3
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_policy_refuses_nonsense():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    assert RetryPolicy.none().delay_after_status("GET", 503, 1.0, 1) is None


def test_async_client_retries_the_same_way():
    async def run(url: str) -> tuple[list[str], ServerUnavailable]:
        seen: list[RetryEvent] = []
        async with AsyncClient(url, "k", retry=FAST, on_retry=seen.append) as client:
            labels = (await client.predict("tickets", "refund")).labels
            with pytest.raises(ServerUnavailable) as err:
                await client.adapters.list()
        assert [e.status for e in seen] == [429, 503, 503, 503]
        return labels, err.value

    with FakeServer() as server:
        server.on(
            "POST",
            PREDICT,
            Reply(429, problem(429, "busy"), {"Retry-After": "0"}),
            Reply(200, samples.prediction(["billing"])),
        )
        server.on("GET", "/v1/adapters", Reply(503, problem(503, "loading"), {"Retry-After": "0"}))
        started = time.monotonic()
        labels, error = asyncio.run(run(server.url))
    assert labels == ["billing"]
    assert error.retry_after == 0
    assert error.detail == "loading"
    assert len(server.hits("GET", "/v1/adapters")) == FAST.max_attempts
    assert time.monotonic() - started < 5
