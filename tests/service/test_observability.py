"""The log formats and the request-id context (the server-level flow is in
tests/integration/test_observability.py)."""

import io
import json
import logging
import logging.config

import pytest

from loradock.service.observability import (
    TracingError,
    configure_tracing,
    logging_config,
    request_id,
)


def capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    config = logging_config("debug", fmt)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(config["formatters"]["default"]["()"]())
    handler.addFilter(config["filters"]["request_id"]["()"]())
    logger = logging.getLogger(f"loradock.test.{fmt}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_json_lines_carry_the_request_id_extras_and_tracebacks():
    logger, stream = capture("json")
    logger.info("outside")
    token = request_id.set("req-1")
    try:
        logger.warning("inside %s", "a request", extra={"rows": 3, "ids": ["a", "b"]})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        request_id.reset(token)
    outside, inside, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "request_id" not in outside
    assert outside["message"] == "outside"
    assert inside["request_id"] == "req-1"
    assert inside["message"] == "inside a request"
    assert inside["level"] == "warning"
    assert inside["logger"] == "loradock.test.json"
    assert (inside["rows"], inside["ids"]) == (3, ["a", "b"])
    assert inside["time"].endswith("+00:00")
    assert "ValueError: boom" in failed["exc_info"]


def test_plain_lines_show_the_request_id_only_inside_a_request():
    logger, stream = capture("plain")
    logger.info("outside")
    token = request_id.set("req-2")
    logger.info("inside")
    request_id.reset(token)
    outside, inside = stream.getvalue().splitlines()
    assert outside.endswith("INFO loradock.test.plain: outside")
    assert inside.endswith("INFO loradock.test.plain [req-2]: inside")


def test_uvicorn_loggers_share_the_root_handler():
    config = logging_config("info", "json")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        assert config["loggers"][name] == {"handlers": [], "level": "INFO", "propagate": True}
    assert config["loggers"]["alembic.runtime.plugins"]["level"] == "WARNING"
    assert config["root"]["handlers"] == ["default"]


def test_tracing_off_installs_nothing():
    assert configure_tracing("off", 1.0) is None


def test_tracing_error_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_sdk(name, *args, **kwargs):
        if name.startswith("opentelemetry.sdk"):
            raise ImportError(name, name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sdk)
    with pytest.raises(TracingError, match=r"loradock\[tracing\]"):
        configure_tracing("otlp", 1.0)
