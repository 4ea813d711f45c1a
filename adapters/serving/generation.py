"""Text generation on the shared causal LM, one request at a time: correct and simple.

A KV-cached decode loop under a LoRA context (an adapter's slot, or none for the base), with
OpenAI's sampling parameters: `temperature` (0 = greedy), `top_p`, `max_tokens`, `stop` strings,
and `seed` (a private torch.Generator: a seeded request repeats exactly and never disturbs another
thread's random state). It stops at the model's end-of-sequence tokens, at a stop string (which
is not returned, as in OpenAI's API), or at `max_tokens` / the context length.

Continuous batching of many adapters in one decode batch is the next step (issue 16); this path is
what that engine's greedy output is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel, cache_argument, cache_of
from loradock.adapters.training.sft import render_chat


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence ids
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the model's context."""


def stop_token_ids(base: BaseModel) -> set[int]:
    """End-of-sequence ids of the model: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    eos = base.tokenizer.eos_token_id
    if eos is not None:
        ids.add(int(eos))
    gen_cfg = getattr(base.lm, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, list):
        ids.update(int(i) for i in cfg_eos)
    return ids


def chat_prompt_ids(base: BaseModel, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a chat rendered by the base's chat template, ready for the reply."""
    text = render_chat(base, messages, add_generation_prompt=True)
    return list(base.tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_prompt_ids(base: BaseModel, prompt: str) -> list[int]:
    return list(base.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def row_prompt(base: BaseModel, row: dict[str, Any]) -> tuple[list[int], int]:
    """A training row as serving would see it: the prompt's token ids (a chat up to its last
    assistant turn, or the prompt) and the token length of the answer that follows."""
    if "messages" in row:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = chat_prompt_ids(base, messages[:last])
        answer = str(messages[last]["content"])
    else:
        prompt = completion_prompt_ids(base, str(row["prompt"]))
        answer = str(row["completion"])
    return prompt, len(base.tokenizer(answer, add_special_tokens=False)["input_ids"])


def context_length(base: BaseModel) -> int:
    return int(getattr(base.config, "max_position_embeddings", None) or base.max_length)


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
         ) -> torch.Tensor:  # fmt: skip
    """The next token (a 0-d tensor, on the device: no host sync) from last-position logits
    [vocab], by `params`; the decode engine draws each sampled row with it too."""
    if params.temperature <= 0:
        return logits.argmax()
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest set reaching top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return order[choice][0]
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.inference_mode()
def generate(
    base: BaseModel,
    ctx: lora.LoRAContext | None,
    prompt_ids: Sequence[int],
    params: SamplingParams,
) -> Generated:
    """Generate a continuation of `prompt_ids` under the LoRA context `ctx` (None: the base)."""
    assert base.lm is not None, "generation needs a causal-LM base"
    room = context_length(base) - len(prompt_ids)
    if room <= 0:
        raise PromptTooLong(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is "
            f"{context_length(base)} tokens"
        )
    max_new = min(params.max_tokens, room)
    generator = None
    if params.seed is not None and params.temperature > 0:
        generator = torch.Generator(device=base.device).manual_seed(params.seed)
    stops = set() if params.ignore_eos else stop_token_ids(base)
    tok = base.tokenizer
    out_ids: list[int] = []
    finish = "length"
    text = ""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=base.device)
    cache_arg = cache_argument(type(base.lm).forward)
    with lora.active(ctx):
        # logits_to_keep=1: the prompt's other positions need no vocabulary projection
        result = base.lm(input_ids=ids, use_cache=True, logits_to_keep=1)
        past = cache_of(result)
        logits = result.logits[0, -1]
        for _ in range(max_new):
            nxt = int(draw(logits, params, generator))
            if nxt in stops:
                finish = "stop"
                break
            out_ids.append(nxt)
            if params.stop:
                text = tok.decode(out_ids, skip_special_tokens=True)
                cut = min((i for s in params.stop if (i := text.find(s)) >= 0), default=-1)
                if cut >= 0:
                    return Generated(text[:cut], out_ids, "stop", len(prompt_ids))
            step = torch.tensor([[nxt]], dtype=torch.long, device=base.device)
            result = base.lm(input_ids=step, use_cache=True, **{cache_arg: past})
            past = cache_of(result)
            logits = result.logits[0, -1]
    text = tok.decode(out_ids, skip_special_tokens=True)
    return Generated(text, out_ids, finish, len(prompt_ids))
