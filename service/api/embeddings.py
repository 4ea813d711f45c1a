"""POST /v1/embeddings: OpenAI-compatible embeddings from the base or an adapter's encoder.

`model` names what embeds: `base` (or the base model's name as /readyz shows it, or its last path
part) for the frozen base, or one of the caller's adapters (name or id) for its live version's
LoRA-adapted encoder (a head-only version embeds like the base). Embeddings are the mean-pooled
last hidden states, L2-normalized (unit length, as sentence-transformers' all-MiniLM-L6-v2 and
OpenAI's embeddings are), in input order. `encoding_format: "base64"` (what the `openai` client
asks for by default) sends each vector as base64 of little-endian float32.
"""

from __future__ import annotations

import base64
from typing import Literal

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from loradock.service.api.deps import Principal, ReadyRuntimeDep, require
from loradock.service.errors import Unprocessable

router = APIRouter(prefix="/v1", tags=["embeddings"])
ReadDep = Depends(require("predict"))
BASE = "base"


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(
        description="A text or a list of texts (token-id arrays are not accepted)."
    )
    model: str = Field(
        min_length=1,
        max_length=256,
        description="'base' (the frozen base) or one of your adapters (name or id).",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'base64': little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(
        None, ge=1, description="Must equal the model's size if given (no truncation)."
    )
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


def base_names(name: str) -> set[str]:
    return {BASE, name, name.rsplit("/", 1)[-1]}


@router.post("/embeddings", response_model=EmbeddingsResponse)
async def embeddings(
    body: EmbeddingsRequest, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> EmbeddingsResponse:
    """Embeddings in the OpenAI shape (`openai.OpenAI(base_url=.../v1).embeddings.create`)."""
    plane = runtime.require_serving()
    base = plane.engine.base
    if base.is_decoder:
        raise Unprocessable("embeddings are served by encoder bases; this server runs a causal LM")
    hidden = base.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise Unprocessable(
            f"this model's embeddings have {hidden} dimensions; {body.dimensions} were asked for "
            "(they are not truncated: the base was not trained for shorter embeddings)"
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    adapter = None if body.model in base_names(base.name) else body.model
    ref, rows = await plane.embed(principal.tenant_id, adapter, texts)
    vectors = F.normalize(torch.stack([r.pooled for r in rows]).float(), dim=1)
    data = [
        Embedding(index=i, embedding=_encode(v, body.encoding_format))
        for i, v in enumerate(vectors)
    ]
    tokens = sum(r.tokens for r in rows)
    return EmbeddingsResponse(
        data=data,
        model=BASE if ref is None else ref.name or ref.adapter_id,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _encode(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()
