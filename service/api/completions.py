"""OpenAI-compatible generation: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

`model` is one of the caller's generation adapters (name or id: its live version), or the base
model itself (`base`, the preset name such as `smollm2-135m-instruct`, its Hugging Face id, or the
name /readyz shows) for no adapter. Requests from every tenant and adapter share the
continuous-batching decode engine (`adapters/serving/decode.py`).

`stream: true` answers with server-sent events in OpenAI's chunk format: each choice's first delta
carries the role, its last one the `finish_reason`, then `data: [DONE]`;
`stream_options.include_usage` adds a usage chunk before it; a failure mid-stream is an
`{"error": ...}` event. A client that disconnects (streaming or not) frees its rows at the next
decode step. Errors are in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`
(service/errors.py), so the `openai` client raises its usual exceptions.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from loradock.adapters import tasks
from loradock.adapters.core.presets import PRESETS
from loradock.adapters.serving.decode import Failed, Finished, Token, TokenLogprob
from loradock.adapters.serving.generation import (
    SamplingParams,
    chat_prompt_ids,
    completion_prompt_ids,
)
from loradock.adapters.tasks.generation import parse_messages
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, require
from loradock.service.api.embeddings import BASE, base_names
from loradock.service.dataplane import Choice, GenerationStream
from loradock.service.db.models import Adapter
from loradock.service.errors import BadRequest, LoradockError, NotFound

router = APIRouter(prefix="/v1", tags=["openai"])
ReadDep = Depends(require("predict"))
MAX_TOKENS = 4096


class ClientClosedRequest(LoradockError):
    status, slug, title = 499, "client-closed-request", "Client closed request"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(BaseModel):
    """What both routes take. Unknown OpenAI fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=16)  # extensions, vLLM's names
    ignore_eos: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return v

    def params(self, vocab: int, logprobs: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bad = [t for t in self.stop_token_ids or [] if not 0 <= t < vocab]
        if bad:
            raise BadRequest(
                f"stop_token_ids: {bad[0]} is not a token id of this model (0..{vocab - 1})",
                extra={"param": "stop_token_ids"},
            )
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(stops),
            seed=self.seed,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=1000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str = Field(max_length=1_000_000)
    logprobs: int | None = Field(None, ge=0, le=5)


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
    logprobs: dict[str, Any] | None = None


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
    logprobs: dict[str, Any] | None = None


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


async def _start(
    runtime: Any, principal: Any, body: _Sampling, prompt: Callable[[Any], list[int]],
    logprobs: int | None, protocol: str, prompt_field: str,
) -> GenerationStream:  # fmt: skip
    plane = runtime.require_serving()
    params = body.params(len(runtime.base.tokenizer), logprobs)
    try:
        return await plane.start_generation(
            principal.tenant_id, _adapter_of(runtime, body.model), prompt, params, n=body.n,
            protocol=protocol, prompt_field=prompt_field,
        )  # fmt: skip
    except NotFound as e:  # OpenAI's code for it, so clients can tell it from a missing route
        raise NotFound(e.detail, extra={"param": "model", "code": "model_not_found"}) from e


async def _unless_disconnected(request: Request, stream: GenerationStream) -> list[Choice]:
    """The whole answer, but a client that goes away meanwhile frees its rows at once."""
    task = asyncio.ensure_future(stream.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                stream.cancel()
                task.cancel()
                raise ClientClosedRequest("the client disconnected before the answer was ready")
    finally:
        if not task.done():
            stream.cancel()
            task.cancel()


def _usage(stream: GenerationStream, completion_tokens: int) -> Usage:
    prompt = stream.prompt_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens,
                 total_tokens=prompt + completion_tokens)  # fmt: skip


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(k, v) for k, v in t.top]}
            for t in items
        ],
        "refusal": None,
    }


def _completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [dict(t.top) for t in items],
        "text_offset": offsets,
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _error_event(event: Failed) -> bytes:
    kind = "rate_limit_error" if event.kind == "overloaded" else "server_error"
    return _sse({"error": {"message": event.message, "type": kind, "param": None,
                           "code": event.kind}})  # fmt: skip


async def _events(
    stream: GenerationStream,
    head: dict[str, Any],
    include_usage: bool,
    first: Callable[[int], dict[str, Any]],
    piece: Callable[[int, Token], dict[str, Any] | None],
    last: Callable[[int, str], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed answer; leaving early (a disconnect) cancels the rows."""
    extra = {"usage": None} if include_usage else {}
    tokens = 0
    try:
        for i in range(len(stream.seqs)):
            yield _sse({**head, "choices": [first(i)], **extra})
        async for index, event in stream.events():
            if isinstance(event, Token):
                choice = piece(index, event)
                if choice is not None:
                    yield _sse({**head, "choices": [choice], **extra})
            elif isinstance(event, Finished):
                tokens += event.completion_tokens
                yield _sse({**head, "choices": [last(index, event.finish_reason)], **extra})
            else:
                yield _error_event(event)
                return
        if include_usage:
            usage = _usage(stream, tokens).model_dump()
            yield _sse({**head, "choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:
        stream.cancel()  # a no-op for rows that ended


def _streaming(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatRequest, request: Request, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> ChatCompletion | StreamingResponse:
    """A reply to a chat (`openai.OpenAI(base_url=.../v1).chat.completions.create`)."""
    _check_generation_base(runtime)
    messages, problems = parse_messages(body.messages, runtime.settings.max_text_chars,
                                        needs_assistant=False)  # fmt: skip
    if problems:
        where, message = problems[0]
        raise BadRequest(f"{where}: {message}", extra={"param": where})
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    stream = await _start(runtime, principal, body, lambda base: chat_prompt_ids(base, messages),
                          logprobs, "chat", "messages")  # fmt: skip
    head = _head("chatcmpl", runtime, body, stream)
    if body.stream:
        chunk = {**head, "object": "chat.completion.chunk"}

        def first(i: int) -> dict[str, Any]:
            return {"index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}  # fmt: skip

        def piece(i: int, t: Token) -> dict[str, Any] | None:
            if not t.text and t.logprob is None:
                return None
            lp = _chat_logprobs([t.logprob]) if t.logprob is not None else None
            return {"index": i, "delta": {"content": t.text}, "logprobs": lp,
                    "finish_reason": None}  # fmt: skip

        def last(i: int, reason: str) -> dict[str, Any]:
            return {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}

        return _streaming(_events(stream, chunk, body.include_usage, first, piece, last))
    choices = await _unless_disconnected(request, stream)
    return ChatCompletion(
        **head,
        choices=[
            ChatChoice(
                index=i,
                message=ChatMessage(content=c.text),
                finish_reason=c.finish_reason,
                logprobs=_chat_logprobs(c.logprobs) if logprobs is not None else None,
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(stream, sum(c.completion_tokens for c in choices)),
    )


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest,
    request: Request,
    runtime: ReadyRuntimeDep,
    principal: Principal = ReadDep,
) -> Completion | StreamingResponse:
    """A continuation of a prompt (`client.completions.create`)."""
    _check_generation_base(runtime)
    prompt = body.prompt
    stream = await _start(runtime, principal, body,
                          lambda base: completion_prompt_ids(base, prompt), body.logprobs,
                          "completions", "prompt")  # fmt: skip
    head = _head("cmpl", runtime, body, stream)
    if body.stream:
        chunk = {**head, "object": "text_completion"}
        offsets = [0] * body.n

        def first(i: int) -> dict[str, Any]:
            return {"index": i, "text": "", "logprobs": None, "finish_reason": None}

        def piece(i: int, t: Token) -> dict[str, Any] | None:
            if not t.text and t.logprob is None:
                return None
            lp = None
            if t.logprob is not None:
                lp = _completion_logprobs([t.logprob], offsets[i])
            offsets[i] += len(t.text)
            return {"index": i, "text": t.text, "logprobs": lp, "finish_reason": None}

        def last(i: int, reason: str) -> dict[str, Any]:
            return {"index": i, "text": "", "logprobs": None, "finish_reason": reason}

        return _streaming(_events(stream, chunk, body.include_usage, first, piece, last))
    choices = await _unless_disconnected(request, stream)
    return Completion(
        **head,
        choices=[
            CompletionChoice(
                index=i,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=_completion_logprobs(c.logprobs, 0) if body.logprobs is not None else None,
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(stream, sum(c.completion_tokens for c in choices)),
    )


def _head(kind: str, runtime: Any, body: _Sampling, stream: GenerationStream) -> dict[str, Any]:
    """The fields every answer and chunk of one request share."""
    return {
        "id": f"{kind}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": _fingerprint(runtime, stream.ref),
    }


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
