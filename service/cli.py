"""The `loradock` command. `loradock serve` runs the server; every setting is also an option.

Every other command (adapters, predict, jobs, ...) belongs to the Python client's CLI
(`loradock_client.cli`, distribution loradock-client in clients/python): one `loradock` command.
The server's heavy modules (torch, the app) are imported only by `serve`, so client commands start
fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, get_args, get_origin

import uvicorn
from pydantic import ValidationError

from loradock.service.settings import Settings

if TYPE_CHECKING:
    from loradock.service.runtime import Runtime

log = logging.getLogger("loradock")

EXIT_CONFIG = 2  # bad settings or base model path: fixed by the operator, not by a restart
EXIT_START = 1  # start-up failed after the server began (e.g. the model failed to load)
CLIENT_INSTALL = "pip install ./clients/python"


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with a readiness-first shutdown.

    First SIGTERM/SIGINT: /readyz turns 503 at once, the listener stays open `drain_seconds` (so
    load balancers stop routing here), then uvicorn stops accepting and waits up to the graceful
    timeout for in-flight requests. A second signal skips the wait. Exits 0 on a clean stop.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_seconds: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.drain_seconds = drain_seconds
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self.should_exit = True
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self.runtime.begin_drain()
        if self.drain_seconds <= 0:
            self.should_exit = True
            return
        self._drain_timer = threading.Timer(self.drain_seconds, self._close)
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def _close(self) -> None:
        self.should_exit = True


def _option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per Settings field, documented from the field itself; unset = env or default."""
    for name, field in Settings.model_fields.items():
        choices = None
        args = get_args(field.annotation)
        if args and all(isinstance(a, str) for a in args):
            choices = list(args)
        default = field.default if field.default is not None else "computed"
        parser.add_argument(
            _option_name(name),
            dest=name,
            default=None,
            choices=choices,
            metavar=None if choices else name.upper(),
            help=f"{field.description} [env LORADOCK_{name.upper()}; default: {default}]",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradock",
        description="Serve and train many LoRA adapters on one frozen base model.",
        epilog="The client commands (adapters, predict, jobs, monitoring, versions, tenants, "
        f"keys) come with the Python client: {CLIENT_INSTALL}",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the loradock HTTP server. Options override LORADOCK_* environment "
        "variables, which override the defaults.",
    )
    _add_settings_options(serve)
    return parser


def _is_list_field(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    return any(get_origin(a) is list for a in (annotation, *get_args(annotation)))


def _option_value(name: str, value: Any) -> Any:
    """An option's string as the setting's type: list settings take a JSON list (as their
    environment variable does) or comma-separated names."""
    if not isinstance(value, str) or not _is_list_field(name):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value  # validation reports it, naming the option's setting
    return [part.strip() for part in text.split(",") if part.strip()]


def load_settings(overrides: dict[str, Any]) -> Settings:
    return Settings(**{k: _option_value(k, v) for k, v in overrides.items() if v is not None})


def preflight(settings: Settings) -> None:
    """Checks that fail fast, before the port is bound: model directory (a preset's package;
    a GGUF preset is converted here on first use), device and dtype."""
    from loradock.adapters.core.base import check_model_dir
    from loradock.adapters.core.device import resolve_device, resolve_dtype

    check_model_dir(settings.resolved_base_model().path)
    resolve_dtype(settings.dtype, resolve_device(settings.device))


def serve(settings: Settings, stop_tracing: Callable[[], None] | None = None) -> int:
    from loradock.service.app import create_app
    from loradock.service.http import guarded_protocol

    fatal: list[BaseException] = []
    server: DrainingServer | None = None

    def on_fatal(e: BaseException) -> None:
        fatal.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # main() applied logging_config already: uvicorn's loggers included
        access_log=False,  # the access line is RequestContext's (it knows the request id)
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        lifespan="on",
        http=guarded_protocol(settings.header_timeout_seconds),
        timeout_keep_alive=max(1, round(settings.keep_alive_seconds)),
        limit_concurrency=settings.max_concurrency,
        proxy_headers=False,
        server_header=False,
    )
    server = DrainingServer(config, app.state.runtime, settings.drain_seconds)
    log.info("settings: %s", settings.public())
    try:
        server.run()
    finally:
        if stop_tracing is not None:
            stop_tracing()  # flushes the spans still queued
    if fatal:
        print(f"loradock: start-up failed: {fatal[0]}", file=sys.stderr)
        return EXIT_START
    return 0


def client_main(argv: list[str]) -> int | None:
    """Run a client command through loradock_client.cli; None: not installed, the server's own
    usage applies (no command, --help)."""
    try:
        from loradock_client.cli import main as run_client
    except ModuleNotFoundError as e:
        if e.name != "loradock_client" and not (e.name or "").startswith("loradock_client."):
            raise
        if not argv or argv[0] in ("-h", "--help"):
            return None
        print(
            f"loradock: {argv[0]!r} is a client command and the Python client is not installed; "
            f"install it with: {CLIENT_INSTALL}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return run_client(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] != ["serve"]:
        code = client_main(args_list)
        if code is not None:
            return code
    args = build_parser().parse_args(args_list)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = load_settings(overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in e.errors()
        )
        print(f"loradock: invalid settings: {problems}", file=sys.stderr)
        return EXIT_CONFIG
    from loradock.service.observability import logging_config

    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    if args.command == "serve":
        from loradock.adapters.core.base import BaseModelError
        from loradock.adapters.core.device import DeviceError
        from loradock.adapters.core.presets import PresetError
        from loradock.service.observability import TracingError, configure_tracing

        try:
            preflight(settings)
            stop_tracing = configure_tracing(settings.tracing, settings.trace_sample_ratio)
        except (BaseModelError, DeviceError, PresetError, TracingError) as e:
            print(f"loradock: {e}", file=sys.stderr)
            return EXIT_CONFIG
        return serve(settings, stop_tracing)
    return EXIT_CONFIG  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
