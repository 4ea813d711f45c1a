"""What the sync and async clients share: settings, the retry policy, request descriptions, SSE."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from loradock_client._version import __version__
from loradock_client.errors import (
    APIError,
    ConnectionFailed,
    RetryableError,
    error_from_response,
)
from loradock_client.models import KEEP_ALIVE, JobEvent

log = logging.getLogger("loradock_client")

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "LORADOCK_URL"
KEY_ENV = "LORADOCK_API_KEY"
DEFAULT_TIMEOUT = 30.0
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Transport errors raised before the request left this machine: safe to retry for any method.
NOT_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# Errors after it may have been sent: the server may have acted, so only idempotent requests.
MAYBE_SENT: tuple[type[Exception], ...] = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)
# Statuses that say "nothing was done, come back later": retried for every method.
REFUSED = frozenset({429, 503})
# Gateway statuses (an ingress in front of the server): retried for idempotent requests only.
GATEWAY = frozenset({502, 504})

T = TypeVar("T")


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get(KEY_ENV) or None


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"loradock-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


def stream_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    """Event streams may stay quiet for long (a queued job): no read timeout, the rest kept."""
    return httpx.Timeout(connect=timeout.connect, read=None, write=timeout.write, pool=timeout.pool)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    Semantics: a request is tried at most `max_attempts` times. It is retried when the server
    refused it before doing anything (429, 503: every method), when the connection could not be
    made (nothing was sent: every method), and on a broken connection, a read timeout or a
    gateway 502/504 only for idempotent methods (GET, PUT, DELETE, HEAD, OPTIONS, and
    predict's POST, which changes nothing). The wait is
    the server's Retry-After plus up to `backoff` seconds of jitter when it sent one (a
    Retry-After above `max_retry_after` is not waited for: the error is raised at once), else
    "equal jitter" backoff: half of min(max_backoff, backoff * 2**(n-1)) plus a random share of
    the other half, for the n-th retry.
    """

    max_attempts: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff, max_backoff and max_retry_after must be >= 0")

    @classmethod
    def none(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def backoff_delay(self, attempt: int) -> float:
        cap = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def delay_after_status(
        self, method: str, status: int, retry_after: float | None, attempt: int
    ) -> float | None:
        """Seconds to wait before the next attempt after an error status, or None: give up."""
        if attempt >= self.max_attempts:
            return None
        if status in REFUSED or (status in GATEWAY and method in IDEMPOTENT):
            if retry_after is not None:
                if retry_after > self.max_retry_after:
                    return None
                return retry_after + random.uniform(0, self.backoff)
            return self.backoff_delay(attempt)
        return None

    def delay_after_error(self, method: str, exc: Exception, attempt: int) -> float | None:
        """Seconds to wait after a transport error, or None: give up."""
        if attempt >= self.max_attempts:
            return None
        if isinstance(exc, NOT_SENT) or (isinstance(exc, MAYBE_SENT) and method in IDEMPOTENT):
            return self.backoff_delay(attempt)
        return None


@dataclass(frozen=True)
class RetryEvent:
    """Passed to a client's `on_retry` hook before it sleeps and tries again."""

    method: str
    url: str
    attempt: int  # the attempt that failed, 1-based
    delay: float  # seconds until the next one
    reason: str  # "429 Too Many Requests", "ConnectError: ...", ...
    status: int | None = None


RetryHook = Callable[[RetryEvent], None]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request, described without doing it, and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    data: Mapping[str, str] | None = None
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    # A POST that changes nothing a repeat could double (predict): retried like a GET.
    read_only: bool = False

    @property
    def retry_method(self) -> str:
        """The method the retry policy treats this call as."""
        return "GET" if self.read_only else self.method

    def request_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.json is not None:
            kw["json"] = self.json
        if self.params:
            kw["params"] = {k: v for k, v in self.params.items() if v is not None}
        if self.files is not None:
            kw["files"] = dict(self.files)
            kw["data"] = dict(self.data or {})
        if self.extra_headers:
            kw["headers"] = dict(self.extra_headers)
        return kw


def describe_error(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def connection_failed(method: str, url: str, exc: Exception, attempts: int) -> ConnectionFailed:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    hint = ""
    if isinstance(exc, httpx.ConnectError):
        hint = f" (is a loradock server running there? the default URL comes from {URL_ENV})"
    return ConnectionFailed(f"{method} {url} failed{tries}: {describe_error(exc)}{hint}")


def retry_delay(
    policy: RetryPolicy, method: str, response: httpx.Response, attempt: int
) -> tuple[float | None, APIError]:
    """The error for an error response, and the wait before retrying it (None: do not)."""
    error = error_from_response(response)
    retry_after = error.retry_after if isinstance(error, RetryableError) else None
    return policy.delay_after_status(method, response.status_code, retry_after, attempt), error


def log_retry(event: RetryEvent, hook: RetryHook | None) -> None:
    log.info(
        "%s %s: %s; retry %d in %.2fs",
        event.method,
        event.url,
        event.reason,
        event.attempt,
        event.delay,
    )
    if hook is not None:
        hook(event)


# --- server-sent events --------------------------------------------------------------------------


class SSEDecoder:
    """Turns the lines of a text/event-stream into events (WHATWG rules for event/data/id). A
    comment line (the server's keep-alive) becomes a `keep-alive` event at once: proof that the
    stream is alive, which a job watcher needs, though it carries no data."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None  # the last event id seen (it persists across events)

    def feed(self, line: str) -> JobEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return JobEvent(KEEP_ALIVE, {"comment": line[1:].strip()}, self._id)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # `retry` is not used by this API

    def _dispatch(self) -> JobEvent | None:
        if not self._data:
            self._event = ""
            return None
        raw = "\n".join(self._data)
        event = self._event or "message"
        self._event, self._data = "", []
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = {"raw": raw}
        return JobEvent(event, data if isinstance(data, dict) else {"value": data}, self._id)


def decode_sse(lines: Iterable[str]) -> Iterable[JobEvent]:
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
