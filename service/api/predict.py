"""POST /v1/adapters/{adapter}/predict: batched, mixed-adapter inference."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from loradock.service.api.deps import Principal, ReadyRuntimeDep, require
from loradock.service.errors import Unprocessable
from loradock.service.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["predict"])
ReadDep = Depends(require("predict"))


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="Texts to predict, in order.")
    version: int | None = Field(None, ge=1, description="A ready version; default the live one.")


class PredictResponse(BaseModel):
    adapter: str
    version: int
    predictions: list[dict[str, Any]]


def check_inputs(runtime: Runtime, texts: list[str]) -> None:
    s = runtime.settings
    if len(texts) > s.max_texts_per_request:
        raise Unprocessable(
            f"{len(texts)} inputs exceed the limit of {s.max_texts_per_request} per request "
            "(setting LORADOCK_MAX_TEXTS_PER_REQUEST)"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise Unprocessable(f"inputs[{i}] is empty")
        if len(text) > s.max_text_chars:
            raise Unprocessable(
                f"inputs[{i}] has {len(text)} characters, the limit is {s.max_text_chars} "
                "(setting LORADOCK_MAX_TEXT_CHARS)"
            )


@router.post("/adapters/{adapter}/predict", response_model=PredictResponse)
async def predict(
    adapter: str, body: PredictRequest, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> PredictResponse:
    """Rows come back in input order. Texts longer than the model's token limit are truncated and
    flagged (`truncated: true`)."""
    with runtime.metrics_for("v1", len(body.inputs)):
        runtime.rate_limiter.take(principal.tenant_id)
        check_inputs(runtime, body.inputs)
        serving = runtime.require_serving()
        target = await asyncio.to_thread(
            serving.live.resolve, principal.tenant_id, adapter, body.version
        )
        results = await serving.predict(target, body.inputs)
    limit = runtime.base.max_length if runtime.base is not None else 0
    predictions = []
    for r in results:
        row = dict(r.output)
        if r.tokens >= limit:
            row["truncated"] = True
        predictions.append(row)
    return PredictResponse(
        adapter=target.adapter_id, version=target.version, predictions=predictions
    )
