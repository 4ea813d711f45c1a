"""Skip the frozen lower blocks during training by feeding their cached output.

When LoRA only adapts blocks s..L-1, blocks 0..s-1 compute the same thing for a text in every
epoch. The trainer computes their output once (during the pass that embeds the texts anyway) and,
while training, runs only the upper blocks. Like LoRA, skipping is per thread (a contextvar): the
wrappers are inert for serving and for every other thread.

The model's own forward still runs (embeddings, masks, position encodings stay correct for any
architecture); only the lower blocks are replaced: block s-1 returns the cached hidden states and
the blocks below it pass their input through.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Skip:
    start: int  # first block that really runs
    hidden: torch.Tensor  # [batch, tokens, hidden]: the input of block `start` for this batch


_SKIP: contextvars.ContextVar[Skip | None] = contextvars.ContextVar("loradock_skip", default=None)


@contextmanager
def skipping(skip: Skip | None) -> Iterator[None]:
    token = _SKIP.set(skip)
    try:
        yield
    finally:
        _SKIP.reset(token)


def _make_skippable(block: nn.Module, index: int) -> None:
    """Give `block` a forward that, under an active Skip, returns cached states instead.

    The block object stays where it is (so module paths, and with them LoRA and PEFT names, do not
    change); only its bound `forward` is replaced on the instance.
    """
    original = block.forward
    state = {"returns_tuple": False}  # learnt from a real call (older transformers: tuples)

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        skip = _SKIP.get()
        if skip is None or index >= skip.start:
            out = original(hidden_states, *args, **kwargs)
            state["returns_tuple"] = isinstance(out, tuple)
            return out
        result = skip.hidden if index == skip.start - 1 else hidden_states
        return (result,) if state["returns_tuple"] else result

    block.forward = forward  # type: ignore[method-assign]
    block._loradock_skippable = True  # type: ignore[assignment]


def find_blocks(backbone: nn.Module, num_layers: int) -> tuple[nn.ModuleList, str] | None:
    """The ModuleList holding the transformer blocks (encoder.layer, layers, h, ...)."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module, name
    return None


def install(backbone: nn.Module, num_layers: int) -> bool:
    """Make every block skippable (idempotent). False if the blocks cannot be found."""
    found = find_blocks(backbone, num_layers)
    if found is None:
        return False
    blocks, _ = found
    for i, block in enumerate(blocks):
        if not getattr(block, "_loradock_skippable", False):
            _make_skippable(block, i)
    return True


@contextmanager
def capture_input_of(backbone: nn.Module, num_layers: int, index: int) -> Iterator[list]:
    """Collect the hidden states entering block `index` for every forward in the block."""
    found = find_blocks(backbone, num_layers)
    if found is None:
        raise ValueError("cannot find the transformer blocks of this model")
    blocks, _ = found
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach())

    handle = blocks[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()
