"""Every API request as a `Call` (path, body, answer parser), shared by Client and AsyncClient."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from loradock_client._transport import Call
from loradock_client.models import (
    Adapter,
    BatchSubmission,
    FeedbackResult,
    Identity,
    Job,
    Key,
    MonitoringReport,
    PredictionResult,
    Tenant,
    TrainingResult,
    Version,
)

M = TypeVar("M", bound=BaseModel)
PAGE_SIZE = 100  # items per list page (the server allows up to 1000)
Rows = Sequence[Mapping[str, Any]]
PathArg = str | os.PathLike[str]
FeedbackItems = Sequence[Mapping[str, Any] | tuple[str, str | float]]


def seg(part: str | int) -> str:
    """One path segment, percent-encoded."""
    return quote(str(part), safe="")


def one(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: cls.model_validate(r.json())


def many(cls: type[M], key: str) -> Callable[[httpx.Response], list[M]]:
    return lambda r: [cls.model_validate(item) for item in r.json()[key]]


def nothing(_: httpx.Response) -> None:
    return None


def raw(r: httpx.Response) -> httpx.Response:
    return r


# --- training -------------------------------------------------------------------------------------


def as_rows(data: Any) -> list[dict[str, Any]]:
    """Training rows from what data scientists hold: a sequence of mappings, a pandas or polars
    DataFrame, or a Hugging Face `datasets.Dataset` (recognised by their methods, so none of
    them is a dependency). Missing values (None, NaN) are left out of their row; numpy scalars
    become plain numbers."""
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas
        records = data.to_dict(orient="records")
    elif hasattr(data, "to_dicts"):  # polars
        records = data.to_dicts()
    elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        records = data.to_list()
    else:
        records = list(data)
    return [{str(k): _plain(v) for k, v in dict(r).items() if not _missing(v)} for r in records]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # a numpy scalar
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()  # a numpy array (multi-label lists)
    return value


def _jsonl(rows: Rows) -> bytes:
    return "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows).encode()


def _upload(path: PathArg) -> tuple[str, bytes, str]:
    p = Path(path)
    kind = {".csv": "text/csv", ".parquet": "application/vnd.apache.parquet"}.get(
        p.suffix.lower(), "application/x-ndjson"
    )
    return p.name, p.read_bytes(), kind


def training_call(
    path: str,
    *,
    training_data: Rows | None,
    training_file: PathArg | None,
    validation_data: Rows | None,
    validation_file: PathArg | None,
    validation_split: float | None,
    hyperparameters: Mapping[str, Any] | None,
    promote: str | None,
    fields: Mapping[str, str],
) -> Call[TrainingResult]:
    """POST of a create/retrain body: JSON when every dataset is rows in memory, else multipart
    with the files (rows given alongside a file are sent as a JSONL file)."""
    if (training_data is None) == (training_file is None):
        raise TypeError("pass exactly one of training_data (rows) or training_file (a path)")
    if validation_data is not None and validation_file is not None:
        raise TypeError("pass at most one of validation_data or validation_file")
    parse = one(TrainingResult)
    train_rows = as_rows([] if training_data is None else training_data)
    if training_file is None and validation_file is None:
        body: dict[str, Any] = {**fields, "training_data": train_rows}
        if validation_data is not None:
            body["validation_data"] = as_rows(validation_data)
        if validation_split is not None:
            body["validation_split"] = validation_split
        if hyperparameters:
            body["hyperparameters"] = dict(hyperparameters)
        if promote is not None:
            body["promote"] = promote
        return Call("POST", path, parse, json=body)
    files = {
        "training_file": _upload(training_file)
        if training_file is not None
        else ("training.jsonl", _jsonl(train_rows), "application/x-ndjson")
    }
    if validation_file is not None:
        files["validation_file"] = _upload(validation_file)
    elif validation_data is not None:
        files["validation_file"] = (
            "validation.jsonl",
            _jsonl(as_rows(validation_data)),
            "application/x-ndjson",
        )
    data = dict(fields)
    if validation_split is not None:
        data["validation_split"] = str(validation_split)
    if hyperparameters:
        data["hyperparameters"] = json.dumps(dict(hyperparameters))
    if promote is not None:
        data["promote"] = promote
    return Call("POST", path, parse, files=files, data=data)


# --- adapters and versions ------------------------------------------------------------------------


def page(cls: type[M], key: str) -> Callable[[httpx.Response], tuple[list[M], str | None]]:
    """A list page: its items and the cursor of the next page (None on the last)."""

    def parse(r: httpx.Response) -> tuple[list[M], str | None]:
        body = r.json()
        return [cls.model_validate(item) for item in body[key]], body.get("next_cursor")

    return parse


def list_adapters(
    cursor: str | None = None, limit: int = PAGE_SIZE, view: str = "full"
) -> Call[tuple[list[Adapter], str | None]]:
    params = {"cursor": cursor, "limit": limit, "view": view}
    return Call("GET", "/v1/adapters", page(Adapter, "adapters"), params=params)


def get_adapter(adapter: str) -> Call[Adapter]:
    return Call("GET", f"/v1/adapters/{seg(adapter)}", one(Adapter))


def delete_adapter(adapter: str) -> Call[None]:
    return Call("DELETE", f"/v1/adapters/{seg(adapter)}", nothing)


def get_version(adapter: str, version: int) -> Call[Version]:
    return Call("GET", f"/v1/adapters/{seg(adapter)}/versions/{seg(version)}", one(Version))


def promote_version(adapter: str, version: int) -> Call[Adapter]:
    path = f"/v1/adapters/{seg(adapter)}/versions/{seg(version)}/promote"
    return Call("POST", path, one(Adapter))


def predict(
    adapter: str, texts: str | Sequence[str], version: int | None
) -> Call[PredictionResult]:
    inputs = [texts] if isinstance(texts, str) else list(texts)
    body = {"inputs": inputs, "version": version}
    path = f"/v1/adapters/{seg(adapter)}/predict"
    return Call("POST", path, one(PredictionResult), json=body, read_only=True)


def feedback(adapter: str, items: FeedbackItems) -> Call[FeedbackResult]:
    rows = []
    for item in items:
        if isinstance(item, tuple):
            text, label = item
            rows.append({"text": text, "label": label})
        else:
            rows.append({"text": item["text"], "label": item["label"]})
    path = f"/v1/adapters/{seg(adapter)}/feedback"
    return Call("POST", path, one(FeedbackResult), json={"items": rows})


def monitoring(adapter: str) -> Call[MonitoringReport]:
    return Call("GET", f"/v1/adapters/{seg(adapter)}/monitoring", one(MonitoringReport))


def download(adapter: str, version: int | None) -> Call[httpx.Response]:
    path = f"/v1/adapters/{seg(adapter)}/download"
    return Call("GET", path, raw, params={"version": version}, extra_headers={"Accept": "*/*"})


def export(adapter: str, version: int | None, fmt: str) -> Call[httpx.Response]:
    path = f"/v1/adapters/{seg(adapter)}/export"
    params = {"version": version, "format": fmt}
    return Call("GET", path, raw, params=params, extra_headers={"Accept": "*/*"})


def import_adapter(path: PathArg, name: str | None) -> Call[Adapter]:
    p = Path(path)
    data = {"name": name} if name else {}
    files = {"file": (p.name, p.read_bytes(), "application/zip")}
    return Call("POST", "/v1/adapters/import", one(Adapter), files=files, data=data)


_FILENAME = re.compile(r'filename="?([^";]+)"?')


def download_target(
    response: httpx.Response, adapter: str, version: int | None, path: PathArg | None
) -> Path:
    """Where a download goes: `path` if it names a file, else the server's filename in `path`
    (a directory, default the current one)."""
    match = _FILENAME.search(response.headers.get("content-disposition", ""))
    name = Path(match.group(1)).name if match else f"{adapter}-v{version or 'live'}.zip"
    target = Path(path) if path is not None else Path.cwd()
    return target / name if target.is_dir() else target


def write_file(target: Path, content: bytes) -> None:
    """Write through a temporary file and a rename: no half-written zip is left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(content)
    os.replace(partial, target)


# --- jobs, tenants, keys --------------------------------------------------------------------------


def batch(
    adapter: str, texts: Sequence[Any] | None, file: PathArg | None, version: int | None
) -> Call[BatchSubmission]:
    """A batch prediction job over a list (texts, or {"text", "id"} objects) or a file (JSONL,
    CSV with a text column, or .txt, one text per line)."""
    path = f"/v1/adapters/{seg(adapter)}/batch"
    if (texts is None) == (file is None):
        raise ValueError("give texts or file, not both")
    if file is not None:
        p = Path(file)
        files = {"input_file": (p.name, p.read_bytes(), "application/octet-stream")}
        data = {"version": str(version)} if version is not None else None
        return Call("POST", path, one(BatchSubmission), files=files, data=data)
    body: dict[str, Any] = {"inputs": list(texts or [])}
    if version is not None:
        body["version"] = version
    return Call("POST", path, one(BatchSubmission), json=body)


def job_results(job_id: str) -> Call[httpx.Response]:
    path = f"/v1/jobs/{seg(job_id)}/results"
    return Call("GET", path, raw, extra_headers={"Accept": "application/x-ndjson"}, read_only=True)


def list_jobs(
    adapter: str | None, cursor: str | None = None, limit: int = PAGE_SIZE, view: str = "full"
) -> Call[tuple[list[Job], str | None]]:
    params = {"adapter": adapter, "cursor": cursor, "limit": limit, "view": view}
    return Call("GET", "/v1/jobs", page(Job, "jobs"), params=params)


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{seg(job_id)}", one(Job))


def cancel_job(job_id: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{seg(job_id)}/cancel", one(Job))


def job_events(job_id: str, last_event_id: str | None = None) -> Call[httpx.Response]:
    """The job's event stream; with `last_event_id`, resumed after that event."""
    path = f"/v1/jobs/{seg(job_id)}/events"
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return Call("GET", path, raw, extra_headers=headers)


def create_tenant(name: str) -> Call[Tenant]:
    return Call("POST", "/v1/tenants", one(Tenant), json={"name": name})


def list_tenants() -> Call[list[Tenant]]:
    return Call("GET", "/v1/tenants", many(Tenant, "tenants"))


def create_key(tenant_id: str, scopes: Sequence[str]) -> Call[Key]:
    if isinstance(scopes, str):
        scopes = [scopes]
    path = f"/v1/tenants/{seg(tenant_id)}/keys"
    return Call("POST", path, one(Key), json={"scopes": list(scopes)})


def revoke_key(key_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/keys/{seg(key_id)}", nothing)


def rotate_key(key_id: str) -> Call[Key]:
    return Call("POST", f"/v1/keys/{seg(key_id)}/rotate", one(Key))


def list_keys(tenant_id: str | None = None, include_revoked: bool = False) -> Call[list[Key]]:
    params: dict[str, Any] = {"include_revoked": include_revoked}
    if tenant_id is not None:
        params["tenant_id"] = tenant_id
    return Call("GET", "/v1/keys", many(Key, "keys"), params=params)


def whoami() -> Call[Identity]:
    return Call("GET", "/v1/whoami", one(Identity))


def delete_tenant(tenant_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/tenants/{seg(tenant_id)}", nothing)
