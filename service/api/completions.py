"""OpenAI-compatible generation: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

`model` is one of the caller's generation adapters (name or id: its live version), or the base
model itself (`base`, the preset name such as `smollm2-135m-instruct`, its Hugging Face id, or the
name /readyz shows) for no adapter. Non-streaming, one generation at a time: the correct, simple
path (`adapters/serving/generation.py`); streaming and batched decoding are the generation
engine's. Errors on these routes are in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}` (service/errors.py), so the `openai` client raises its usual exceptions.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from loradock.adapters import tasks
from loradock.adapters.core.presets import PRESETS
from loradock.adapters.serving.generation import (
    SamplingParams,
    chat_prompt_ids,
    completion_prompt_ids,
)
from loradock.adapters.tasks.generation import parse_messages
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, require
from loradock.service.api.embeddings import BASE, base_names
from loradock.service.db.models import Adapter
from loradock.service.errors import BadRequest, NotFound

router = APIRouter(prefix="/v1", tags=["openai"])
ReadDep = Depends(require("predict"))
MAX_TOKENS = 4096


class _Sampling(BaseModel):
    """What both routes take; OpenAI fields loradock does not implement are refused by name."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return v

    def params(self) -> SamplingParams:
        if self.stream:
            raise BadRequest("stream: streaming is not available yet; send stream=false")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(stops),
            seed=self.seed,
        )


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=1000)


class CompletionRequest(_Sampling):
    prompt: str = Field(max_length=1_000_000)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def base_model_names(runtime: Any) -> list[str]:
    """What `model` may say for the base itself, the canonical name first: the preset's name
    (e.g. smollm2-135m-instruct), its Hugging Face id, then what /v1/embeddings accepts."""
    base = runtime.base
    configured = (runtime.settings.base_model or "").lower()
    names = [configured if configured in PRESETS else None, base.hf_id, BASE,
             *sorted(base_names(base.name))]  # fmt: skip
    return list(dict.fromkeys(n for n in names if n))


def _adapter_of(runtime: Any, model: str) -> str | None:
    return None if model in base_model_names(runtime) else model


def _check_generation_base(runtime: Any) -> None:
    if runtime.base.lm is None:
        raise BadRequest(
            "this server's base is an encoder; generation needs a causal-LM base "
            "(setting LORADOCK_BASE_MODEL, e.g. smollm2-135m-instruct)",
            extra={"param": "model"},
        )


async def _generate(plane: Any, tenant_id: str, adapter: str | None, *args: Any,
                    **kwargs: Any) -> Any:  # fmt: skip
    try:
        return await plane.generate(tenant_id, adapter, *args, **kwargs)
    except NotFound as e:  # OpenAI's code for it, so clients can tell it from a missing route
        raise NotFound(e.detail, extra={"param": "model", "code": "model_not_found"}) from e


def _usage(results: list[Any]) -> Usage:
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)  # fmt: skip


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatRequest, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> ChatCompletion:
    """A reply to a chat (`openai.OpenAI(base_url=.../v1).chat.completions.create`)."""
    _check_generation_base(runtime)
    plane = runtime.require_serving()
    messages, problems = parse_messages(body.messages, runtime.settings.max_text_chars,
                                        needs_assistant=False)  # fmt: skip
    if problems:
        where, message = problems[0]
        raise BadRequest(f"{where}: {message}", extra={"param": where})
    ref, results = await _generate(
        plane, principal.tenant_id, _adapter_of(runtime, body.model),
        lambda base: chat_prompt_ids(base, messages), body.params(), n=body.n, protocol="chat",
    )  # fmt: skip
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        system_fingerprint=_fingerprint(runtime, ref),
        choices=[
            ChatChoice(index=i, message=ChatMessage(content=r.text), finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ],
        usage=_usage(results),
    )


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> Completion:
    """A continuation of a prompt (`client.completions.create`)."""
    _check_generation_base(runtime)
    plane = runtime.require_serving()
    prompt = body.prompt
    ref, results = await _generate(
        plane, principal.tenant_id, _adapter_of(runtime, body.model),
        lambda base: completion_prompt_ids(base, prompt), body.params(), n=body.n,
        protocol="completions",
    )  # fmt: skip
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        system_fingerprint=_fingerprint(runtime, ref),
        choices=[
            CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ],
        usage=_usage(results),
    )


def _fingerprint(runtime: Any, ref: Any) -> str:
    """The base's fingerprint, and the adapter version that answered."""
    fp = f"fp_{runtime.base.fingerprint}"
    return fp if ref is None else f"{fp}_{ref.adapter_id}_v{ref.version}"


@router.get("/models", response_model=ModelList)
async def models(
    runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = ReadDep
) -> ModelList:
    """The base (for no adapter) and the caller's servable generation adapters."""
    data = [Model(id=base_model_names(runtime)[0], created=0, owned_by="loradock")]
    generation = [name for name in tasks.names() if not tasks.get(name).has_head]
    with db.session() as s:
        rows = s.scalars(
            select(Adapter)
            .where(
                Adapter.tenant_id == principal.tenant_id,
                Adapter.task.in_(generation),
                Adapter.live_version.is_not(None),
            )
            .order_by(Adapter.name)
        ).all()
        data += [
            Model(id=a.name, created=int(a.created_at.timestamp()), owned_by=principal.tenant_id)
            for a in rows
        ]
    return ModelList(data=data)
