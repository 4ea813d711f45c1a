"""Error answers become typed exceptions carrying the problem+json fields; settings from env."""

import httpx
import loradock_client
import pytest
from loradock_client import (
    APIError,
    AuthenticationError,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    LoradockError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    ServerError,
    ServerUnavailable,
    ValidationFailed,
)

from tests.clients import samples
from tests.clients.fake_server import FakeServer, Reply, problem

ROW_ERRORS = [{"dataset": "training_data", "row": 3, "field": "label", "message": "missing"}]
CASES = [
    # status, body, headers, exception
    (400, problem(400, "bad"), {}, BadRequest),
    (
        401,
        problem(401, "invalid or revoked API key"),
        {"WWW-Authenticate": "Bearer"},
        AuthenticationError,
    ),
    (403, problem(403, "this API key lacks the 'train' scope"), {}, PermissionDenied),
    (404, problem(404, "adapter 'x' not found"), {}, NotFound),
    (409, problem(409, "already training"), {}, Conflict),
    (413, problem(413, "body over 32 MiB"), {}, PayloadTooLarge),
    (
        422,
        problem(422, "training_data: row 3: missing label", errors=ROW_ERRORS),
        {},
        ValidationFailed,
    ),
    (429, problem(429, "queue full"), {"Retry-After": "7"}, RateLimited),
    (503, problem(503, "loading the base model"), {"Retry-After": "5"}, ServerUnavailable),
    (500, problem(500, "an internal error occurred"), {}, ServerError),
    (418, problem(418, "teapot"), {}, APIError),
]


@pytest.mark.parametrize(("status", "body", "headers", "cls"), CASES)
def test_statuses_map_to_typed_errors(status, body, headers, cls):
    with FakeServer() as server:
        server.on("GET", "/v1/adapters/x", Reply(status, body, headers))
        with (
            Client(server.url, "k", retry=RetryPolicy.none()) as client,
            pytest.raises(cls) as err,
        ):
            client.adapters.get("x")
    e = err.value
    assert type(e) is cls
    assert isinstance(e, LoradockError)
    assert isinstance(e, APIError)
    assert e.status == status
    assert e.detail == body["detail"]
    assert e.title == body["title"]
    assert e.type == body["type"]
    assert e.instance == "/x"
    assert e.response is not None
    assert e.response.status_code == status
    assert str(e) == f"{status} {body['title']}: {body['detail']}"
    assert e.problem["status"] == status
    if status == 422:
        assert e.errors == ROW_ERRORS
        assert e.problem["errors"] == ROW_ERRORS
    if status in (429, 503):
        assert e.retry_after == float(headers["Retry-After"])


def test_bodies_that_are_not_problem_json():
    with FakeServer() as server:
        server.on("POST", "/v2/x", Reply(400, {"error": "input 'text' must be BYTES"}))
        server.on("GET", "/plain", Reply(404, "nothing here"))
        server.on("GET", "/empty", Reply(500, b""))
        with Client(server.url, retry=RetryPolicy.none()) as client:
            from loradock_client._calls import nothing
            from loradock_client._transport import Call

            with pytest.raises(BadRequest, match="must be BYTES") as oip:
                client._call(Call("POST", "/v2/x", nothing, json={}))
            with pytest.raises(NotFound, match="nothing here"):
                client._call(Call("GET", "/plain", nothing))
            with pytest.raises(ServerError, match="Internal Server Error"):
                client._call(Call("GET", "/empty", nothing))
    assert oip.value.title == "Bad request"  # the class's title when the body has none


def test_url_and_key_come_from_the_environment(monkeypatch):
    with FakeServer() as server:
        server.on("GET", "/v1/tenants", Reply(200, {"tenants": [{"id": "tn_1", "name": "a"}]}))
        monkeypatch.setenv("LORADOCK_URL", server.url + "/")
        monkeypatch.setenv("LORADOCK_API_KEY", "from-env")
        with Client() as client:
            assert client.url == server.url
            assert [t.name for t in client.tenants.list()] == ["a"]
        with Client(api_key="explicit") as client:
            client.tenants.list()
    first, second = server.hits("GET", "/v1/tenants")
    assert first.headers["authorization"] == "Bearer from-env"
    assert second.headers["authorization"] == "Bearer explicit"
    assert first.headers["user-agent"] == f"loradock-client/{loradock_client.__version__}"


def test_defaults_without_environment(monkeypatch):
    monkeypatch.delenv("LORADOCK_URL", raising=False)
    monkeypatch.delenv("LORADOCK_API_KEY", raising=False)
    with Client() as client:
        assert client.url == "http://127.0.0.1:8000"
        assert client.api_key is None
        assert "authorization" not in client._http.headers


def test_read_timeouts_raise_connection_failed_and_only_idempotent_requests_repeat():
    slow = Reply(200, samples.adapter(), delay=0.5)
    policy = RetryPolicy(max_attempts=2, backoff=0.01)
    with FakeServer() as server:
        server.on("GET", "/v1/adapters/x", slow)
        server.on("POST", "/v1/adapters/x/versions/1/promote", slow)
        with Client(server.url, "k", timeout=0.2, retry=policy) as client:
            assert client.timeout == httpx.Timeout(0.2)
            with pytest.raises(ConnectionFailed, match="ReadTimeout"):
                client.adapters.get("x")
            with pytest.raises(ConnectionFailed, match="ReadTimeout"):
                client.versions.promote("x", 1)
    assert len(server.hits("GET", "/v1/adapters/x")) == 2
    assert len(server.hits("POST", "/v1/adapters/x/versions/1/promote")) == 1
