"""Typed errors: one class per HTTP status the API uses, carrying the RFC 9457 problem fields."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

PROBLEM_FIELDS = ("type", "title", "status", "detail", "instance")


class LoradockError(Exception):
    """Base of every error this package raises.

    `status` is the HTTP status (None when no response came back); `title`, `detail`, `type` and
    `instance` are the problem+json fields; `extra` holds any other fields of the body (e.g.
    `errors`, the list of validation problems with their locations).
    """

    status: int | None = None
    default_title = "loradock error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        type: str | None = None,  # the problem+json field name
        instance: str | None = None,
        extra: dict[str, Any] | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(detail)
        if status is not None:
            self.status = status
        self.detail = detail
        self.title = title or self.default_title
        self.type = type
        self.instance = instance
        self.extra: dict[str, Any] = extra or {}
        self.response = response

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Validation problems (row, field or location, message) when the server listed them."""
        errors = self.extra.get("errors")
        return errors if isinstance(errors, list) else []

    @property
    def problem(self) -> dict[str, Any]:
        """The problem+json object (what the server said, or what the client would have)."""
        fields = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": self.instance,
        }
        return {**{k: v for k, v in fields.items() if v is not None}, **self.extra}

    def __str__(self) -> str:
        head = f"{self.status} {self.title}" if self.status is not None else self.title
        return f"{head}: {self.detail}"


class ConnectionFailed(LoradockError):
    """No HTTP answer: the server could not be reached, or the connection broke or timed out."""

    default_title = "Connection failed"


class StreamInterrupted(ConnectionFailed):
    """An event stream broke after it had started (`jobs.watch` reconnects on its own)."""

    default_title = "Event stream interrupted"


class TrainingFailed(LoradockError):
    """A training job ended `failed` or `cancelled`; `result` has the adapter and the job."""

    default_title = "Training did not succeed"

    def __init__(self, detail: str, result: Any) -> None:
        super().__init__(detail)
        self.result = result


class JobFailed(LoradockError):
    """A prediction (batch) job ended `failed` or `cancelled`; `job` says how."""

    default_title = "The job did not succeed"

    def __init__(self, job: Any) -> None:
        super().__init__(f"job {job.id} {job.status}: {job.error or job.stop_reason or ''}")
        self.job = job


class APIError(LoradockError):
    """The server answered with an error status."""

    default_title = "HTTP error"


class BadRequest(APIError):
    status, default_title = 400, "Bad request"


class AuthenticationError(APIError):
    status, default_title = 401, "Unauthorized"


class PermissionDenied(APIError):
    status, default_title = 403, "Forbidden"


class NotFound(APIError):
    status, default_title = 404, "Not found"


class Conflict(APIError):
    status, default_title = 409, "Conflict"


class PayloadTooLarge(APIError):
    status, default_title = 413, "Payload too large"


class ValidationFailed(APIError):
    status, default_title = 422, "Invalid request"


class RetryableError(APIError):
    """The server refused the request before doing anything; `retry_after` is in seconds."""

    def __init__(self, detail: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retry_after = retry_after


class RateLimited(RetryableError):
    status, default_title = 429, "Too many requests"


class ServerUnavailable(RetryableError):
    status, default_title = 503, "Service not ready"


class ServerError(APIError):
    status, default_title = 500, "Internal error"


BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
    503: ServerUnavailable,
}


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for an error response: problem+json, the OIP `{"error"}` or plain text."""
    status = response.status_code
    body: Any = None
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
        body = response.json()
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if isinstance(body, dict):
        for key, value in body.items():
            (fields if key in PROBLEM_FIELDS else extra)[key] = value
        if "detail" not in fields and isinstance(extra.get("error"), str):
            fields["detail"] = extra.pop("error")  # Open Inference Protocol routes
    detail = fields.get("detail")
    if not isinstance(detail, str) or not detail:
        detail = response.text.strip()[:500] or response.reason_phrase or f"HTTP {status}"
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    kw: dict[str, Any] = {
        "status": status,
        "title": fields.get("title") if isinstance(fields.get("title"), str) else None,
        "type": fields.get("type") if isinstance(fields.get("type"), str) else None,
        "instance": fields.get("instance") if isinstance(fields.get("instance"), str) else None,
        "extra": extra,
        "response": response,
    }
    if issubclass(cls, RetryableError):
        kw["retry_after"] = parse_retry_after(response.headers.get("retry-after"))
    return cls(detail, **kw)
