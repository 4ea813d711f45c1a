"""POST /v1/adapters/{adapter}/predict: batched, mixed-adapter inference."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from loradock.service.api.deps import Principal, ReadyRuntimeDep, require
from loradock.service.api.schemas import MAX_VERSION

router = APIRouter(prefix="/v1", tags=["predict"])
ReadDep = Depends(require("predict"))


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="Texts to predict, in order.")
    version: int | None = Field(
        None, ge=1, le=MAX_VERSION, description="A ready version; default the live one."
    )


class PredictResponse(BaseModel):
    adapter: str
    version: int
    predictions: list[dict[str, Any]]


@router.post("/adapters/{adapter}/predict", response_model=PredictResponse)
async def predict(
    adapter: str, body: PredictRequest, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> PredictResponse:
    """Rows come back in input order. Texts longer than the model's token limit are truncated and
    flagged (`truncated: true`)."""
    plane = runtime.require_serving()
    answer = await plane.predict(
        principal.tenant_id, adapter, body.version, body.inputs, protocol="v1"
    )
    return PredictResponse(
        adapter=answer.ref.adapter_id, version=answer.ref.version, predictions=answer.predictions
    )
