"""The `loradock` command line on top of `Client`: adapters, predict, jobs, monitoring, ...

`loradock serve` is handed to the server package (`loradock.service.cli`) when it is installed, so
the one `loradock` command behaves the same whichever distribution installed it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from loradock_client._transport import KEY_ENV, URL_ENV, RetryEvent
from loradock_client.client import Client
from loradock_client.commands import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Handler,
    UsageError,
    cmd_adapters_create,
    cmd_adapters_delete,
    cmd_adapters_download,
    cmd_adapters_export,
    cmd_adapters_import,
    cmd_adapters_list,
    cmd_adapters_retrain,
    cmd_adapters_show,
    cmd_feedback,
    cmd_jobs_cancel,
    cmd_jobs_list,
    cmd_jobs_results,
    cmd_jobs_show,
    cmd_jobs_watch,
    cmd_keys_create,
    cmd_keys_revoke,
    cmd_monitoring_show,
    cmd_predict,
    cmd_tenants_create,
    cmd_tenants_list,
    cmd_versions_promote,
    cmd_versions_show,
)
from loradock_client.errors import AuthenticationError, LoradockError

SERVER_HINT = "pip install -e . (the loradock server distribution, from the repository root)"


# --- the parser -----------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the command (defaults applied in main)."""
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument("--url", default=s, help=f"server URL [env {URL_ENV}; default: local]")
    p.add_argument("--api-key", default=s, help=f"API key [env {KEY_ENV}]")
    p.add_argument("--timeout", type=float, default=s, help="seconds per request [30]")
    p.add_argument("--json", action="store_true", default=s, help="machine-readable output")
    return p


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", "-f", required=True, help="training data: JSONL or CSV text,label")
    p.add_argument("--validation-file", help="validation data (else a stratified split)")
    p.add_argument("--validation-split", type=float, help="share held out [0.2]")
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", help="a hyperparameter")
    p.add_argument("--hyperparameters", metavar="JSON", help="hyperparameters as a JSON object")
    p.add_argument("--promote", choices=["if_better", "always", "never"], default="if_better")
    p.add_argument("--no-wait", action="store_true", help="return once the job is queued")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="loradock",
        parents=[common],
        description="Train, serve and monitor LoRA adapters on a loradock server.",
        epilog="Every command takes --json for scripts. Exit codes: 0 ok, 1 API or training "
        "error, 2 usage error.",
    )
    top = parser.add_subparsers(dest="command", required=True)
    p = top.add_parser("serve", help="run the server (needs the loradock server package)")
    p.add_argument("options", nargs=argparse.REMAINDER, help="see: loradock serve --help")

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        g = top.add_parser(name, help=help_text, description=help_text)
        return g.add_subparsers(dest="action", required=True, metavar="ACTION")

    def leaf(sub: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(handler=handler)
        return p

    ad = group("adapters", "create, list, show, retrain, download, import and delete adapters")
    p = leaf(ad, "create", cmd_adapters_create, "create an adapter and train version 1")
    p.add_argument("name")
    p.add_argument(
        "--task",
        choices=["classification", "regression", "multilabel", "generation"],
        default=None,
        help="default: the server base's first task (classification, or generation on a causal LM)",
    )
    _training_options(p)
    p = leaf(ad, "retrain", cmd_adapters_retrain, "train the next version of an adapter")
    p.add_argument("adapter", help="id or name")
    _training_options(p)
    leaf(ad, "list", cmd_adapters_list, "this tenant's adapters (every page)").add_argument(
        "--full", action="store_true", help="every version's history and report (larger)"
    )
    leaf(ad, "show", cmd_adapters_show, "an adapter and its versions").add_argument("adapter")
    leaf(ad, "delete", cmd_adapters_delete, "delete an adapter").add_argument("adapter")
    p = leaf(ad, "download", cmd_adapters_download, "save a version as a zip")
    p.add_argument("adapter")
    p.add_argument("--version", type=int, help="default: the live version")
    p.add_argument("--output", "-o", help="file or directory [current directory]")
    p = leaf(ad, "export", cmd_adapters_export, "save a version for peft / sentence-transformers")
    p.add_argument("adapter")
    p.add_argument("--version", type=int, help="default: the live version")
    p.add_argument(
        "--format", choices=["peft", "sentence-transformers"], default="peft", help="[peft]"
    )
    p.add_argument("--output", "-o", help="file or directory [current directory]")
    p = leaf(ad, "import", cmd_adapters_import, "upload an adapter zip")
    p.add_argument("file")
    p.add_argument("--name", help="import under this name")

    p = leaf(top, "predict", cmd_predict, "predict labels (or values) of texts")
    p.add_argument("adapter")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--file", "-f", help="texts: one per line, JSONL with text, or CSV ('-': stdin)")
    p.add_argument("--version", type=int, help="a ready version [the live one]")
    p.add_argument(
        "--output", "-o", help="write JSONL (each row + prediction + version) here, with progress"
    )
    p.add_argument("--batch-size", type=int, default=64, help="texts per request [64]")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight [4]")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--server-side",
        action="store_true",
        help="run the file as one batch job on the server (big files); needs --output",
    )

    p = leaf(top, "feedback", cmd_feedback, "send true labels (for live accuracy)")
    p.add_argument("adapter")
    p.add_argument("--file", "-f", help="JSONL or CSV with text,label")
    p.add_argument("--item", nargs=2, action="append", metavar=("TEXT", "LABEL"))

    jobs = group("jobs", "list, show, watch and cancel training jobs")
    p = leaf(jobs, "list", cmd_jobs_list, "jobs, newest first (every page)")
    p.add_argument("--adapter")
    p.add_argument("--full", action="store_true", help="with each job's per-epoch history")
    leaf(jobs, "show", cmd_jobs_show, "one job").add_argument("job")
    leaf(jobs, "watch", cmd_jobs_watch, "follow a job live until it ends").add_argument("job")
    leaf(jobs, "cancel", cmd_jobs_cancel, "cancel a queued or running job").add_argument("job")
    p = leaf(jobs, "results", cmd_jobs_results, "save a batch prediction job's results (JSONL)")
    p.add_argument("job")
    p.add_argument("--output", "-o", required=True, help="JSONL file to write")

    mon = group("monitoring", "drift and overfitting reports")
    leaf(mon, "show", cmd_monitoring_show, "an adapter's report").add_argument("adapter")

    ver = group("versions", "show and promote versions")
    for name, handler, text in (
        ("show", cmd_versions_show, "a version's metrics and loss curves"),
        ("promote", cmd_versions_promote, "make a version live (or roll back)"),
    ):
        p = leaf(ver, name, handler, text)
        p.add_argument("adapter")
        p.add_argument("version", type=int)

    ten = group("tenants", "tenants (admin)")
    leaf(ten, "create", cmd_tenants_create, "create a tenant").add_argument("name")
    leaf(ten, "list", cmd_tenants_list, "all tenants")

    keys = group("keys", "API keys (admin)")
    p = leaf(keys, "create", cmd_keys_create, "create an API key for a tenant")
    p.add_argument("tenant_id")
    p.add_argument("--scopes", default="train,predict", help="comma-separated [train,predict]")
    leaf(keys, "revoke", cmd_keys_revoke, "revoke an API key").add_argument("key_id")
    return parser


# --- entry points ---------------------------------------------------------------------------------


def serve(argv: list[str]) -> int:
    """`loradock serve ...`: the server's own command line, when the server is installed."""
    try:
        from loradock.service.cli import main as server_main
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("loradock"):
            raise
        print(
            "loradock: 'serve' needs the loradock server, which is not installed here; "
            f"install it with: {SERVER_HINT}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return server_main(argv)


def notify_retry(event: RetryEvent) -> None:
    """Say on stderr why the command is waiting, when the wait is long enough to notice."""
    if event.delay >= 1:
        print(f"loradock: {event.reason}; retrying in {event.delay:.0f}s", file=sys.stderr)


def describe(error: LoradockError, client: Client) -> str:
    lines = [f"loradock: error: {error}"]
    for problem in error.errors[:10]:
        where = problem.get("loc") or [problem.get(k) for k in ("dataset", "row", "field")]
        where = ".".join(str(p) for p in where if p is not None)
        message = problem.get("msg") or problem.get("message") or ""
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    if isinstance(error, AuthenticationError) and not client.api_key:
        lines.append(
            f"  no API key was given: pass --api-key or set {KEY_ENV} (a new server writes its "
            "admin key to <data dir>/bootstrap-key, e.g. loradock-data/bootstrap-key)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return serve(args_list)
    args = build_parser().parse_args(args_list)
    if args.command == "serve":  # global options came first: loradock --json serve ...
        return serve(["serve", *args.options])
    for name, default in (("url", None), ("api_key", None), ("timeout", 30.0), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout, on_retry=notify_retry) as client:
            try:
                return int(args.handler(client, args))
            except LoradockError as e:
                if args.json:
                    print(json.dumps(e.problem, default=str), file=sys.stderr)
                else:
                    print(describe(e, client), file=sys.stderr)
                return EXIT_ERROR
    except UsageError as e:
        print(f"loradock: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
