"""LoRA on the shared frozen backbone, without copying it.

The backbone's targeted nn.Linear modules are wrapped once, in place, by `LoRALinear`. A wrapper
adds nothing unless a *LoRA context* is active in the calling thread (a contextvar), so serving
threads, training threads and plain base-model calls share one set of base weights and never see
each other's adapters. A context decides what delta each wrapped layer adds:

- `LoRAWeights` (training, or a single adapter): y = base(x) + scale * B(A(dropout(x)))
- `BatchedLoRA` (serving, adapters/serving/slots.py) gathers a different adapter per row.

Weights are kept in PEFT's layout (A: [r, d_in], B: [d_out, r]) so artifacts load with
`peft.PeftModel.from_pretrained` outside loradock.
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


class LoRAContext(Protocol):
    """What a wrapped Linear asks while a context is active."""

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The low-rank delta to add to layer `name`'s output for input x, or None."""
        ...


_ACTIVE: contextvars.ContextVar[LoRAContext | None] = contextvars.ContextVar(
    "loradock_lora", default=None
)


@contextmanager
def active(ctx: LoRAContext | None) -> Iterator[None]:
    """Make `ctx` the LoRA context of this thread (or asyncio task) for the block."""
    token = _ACTIVE.set(ctx)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus whatever delta the active LoRA context gives for it."""

    def __init__(self, base: nn.Linear, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `.weight` keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = _ACTIVE.get()
        if ctx is None:
            return y
        d = ctx.delta(self.name, x)
        return y if d is None else y + d


def install(backbone: nn.Module, names: Sequence[str]) -> list[str]:
    """Wrap the Linear modules at `names` (full module paths) in LoRALinear. Idempotent.

    Returns the names newly wrapped. Without an active context the outputs are bit-identical.
    """
    names = list(names)
    done: set[str] = backbone.__dict__.setdefault("_loradock_wrapped", set())
    if done.issuperset(names):  # every hot load asks again: answer without walking the modules
        return []
    wrapped = []
    for name in names:
        module = backbone.get_submodule(name)
        if isinstance(module, LoRALinear):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        wrapper = LoRALinear(module, name)
        wrapper.train(module.training)  # a frozen eval-mode backbone stays in eval mode
        setattr(parent, child, wrapper)
        wrapped.append(name)
    done.update(names)
    return wrapped


def wrapped_names(backbone: nn.Module) -> list[str]:
    return [m.name for m in backbone.modules() if isinstance(m, LoRALinear)]


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def select_targets(
    linear_names: Sequence[str],
    target_modules: Sequence[str],
    layers: Sequence[int] | None,
) -> list[str]:
    """Full module names whose last component is in `target_modules` (peft's suffix match),
    restricted to transformer blocks in `layers` when given."""
    wanted = set(target_modules)
    keep = set(layers) if layers is not None else None
    out = []
    for name in linear_names:
        if name.rsplit(".", 1)[-1] not in wanted:
            continue
        if keep is not None and layer_of(name) not in keep:
            continue
        out.append(name)
    return out


@dataclass(frozen=True)
class LoRASpec:
    """The shape of one adapter's LoRA: which layers, what rank and scale."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...] | None  # None = every block

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAWeights(nn.Module):
    """Trainable (or loaded) A/B matrices for a set of wrapped layers; itself a LoRA context."""

    def __init__(
        self,
        spec: LoRASpec,
        shapes: dict[str, tuple[int, int]],  # name -> (d_in, d_out)
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        init: bool = True,
    ) -> None:
        """`init=False` leaves A uninitialized (B is still zero): for callers that copy
        weights in right away, such as `from_peft` on every hot load."""
        super().__init__()
        self.spec = spec
        self.names = sorted(shapes)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for name in self.names:
            d_in, d_out = shapes[name]
            a = torch.empty(spec.rank, d_in, device=device, dtype=dtype)
            # peft's default init: A kaiming-uniform, B zero, so training starts at the base model.
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
            if init:
                with torch.no_grad():
                    if generator is not None:
                        a.uniform_(-bound, bound, generator=generator)
                    else:
                        a.uniform_(-bound, bound)
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(d_out, spec.rank, device=device, dtype=dtype)))
        # Dropout masks come from an own generator: seeded runs repeat exactly, and training in one
        # thread never consumes the global RNG another thread relies on.
        self._dropout_gen: torch.Generator | None = None

    def seed_dropout(self, seed: int) -> None:
        device = self.A[0].device if len(self.A) else torch.device("cpu")
        self._dropout_gen = torch.Generator(device=device).manual_seed(seed)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout with a drop probability rounded to 1/256: the mask comes from random
        bytes (8 per 64-bit draw), ~6x faster on the CPU than a Bernoulli draw per element,
        which cost a sixth of a generation training step (bench/README.md)."""
        p = self.spec.dropout
        if not self.training or p <= 0:
            return x
        threshold = max(1, min(255, round(p * 256)))
        words = -(-x.numel() // 8)
        rand = torch.randint(
            -(2**63), 2**63 - 1, (words,), generator=self._dropout_gen, device=x.device,
            dtype=torch.int64,
        )  # fmt: skip
        keep = rand.view(torch.uint8)[: x.numel()].view(x.shape) >= threshold
        return x * keep * (256 / (256 - threshold))

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        i = self._index.get(name)
        if i is None:
            return None
        a, b = self.A[i], self.B[i]
        h = self._dropout(x).to(a.dtype) @ a.t()
        return ((h @ b.t()) * self.spec.scale).to(x.dtype)

    # --- PEFT interchange ----------------------------------------------------------------------

    def peft_state_dict(self, module_prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under PEFT's key names (`base_model.model.<prefix><name>.lora_A.weight`);
        `module_prefix` is where the backbone sits in the model PEFT wraps ('model.' for the
        decoder inside a Llama causal LM, '' for an encoder)."""
        out = {}
        for i, name in enumerate(self.names):
            key = f"{PEFT_PREFIX}{module_prefix}{name}"
            out[f"{key}.lora_A.weight"] = self.A[i].detach().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = self.B[i].detach().contiguous().cpu()
        return out

    def peft_config(
        self,
        base_model_name_or_path: str,
        *,
        module_prefix: str = "",
        task_type: str | None = None,
    ) -> dict[str, Any]:
        """A PEFT `adapter_config.json` (LoraConfig fields) matching these weights.

        target_modules lists the exact module paths rather than suffixes plus
        layers_to_transform: peft's layer-pattern matching misses blocks at the top level of a
        model (e.g. `layers.0...` of a bare LlamaModel), exact names never do.
        """
        spec = self.spec
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": spec.rank,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "target_modules": [f"{module_prefix}{n}" for n in self.names],
            "layers_to_transform": None,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }

    @classmethod
    def from_peft(
        cls,
        spec: LoRASpec,
        tensors: dict[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        module_prefix: str = "",
    ) -> LoRAWeights:
        """Rebuild from PEFT-named tensors (as written by `peft_state_dict` with the same
        `module_prefix`)."""
        shapes: dict[str, tuple[int, int]] = {}
        suffix_a = ".lora_A.weight"
        head = f"{PEFT_PREFIX}{module_prefix}"
        for key, t in tensors.items():
            if key.endswith(suffix_a):
                if not key.startswith(head):
                    raise ValueError(f"LoRA tensor {key} is not under {head}")
                name = key.removeprefix(head).removesuffix(suffix_a)
                b = tensors.get(f"{head}{name}.lora_B.weight")
                if b is None:
                    raise ValueError(f"LoRA weights for {name} have A but no B")
                if t.shape[0] != spec.rank or b.shape[1] != spec.rank:
                    raise ValueError(
                        f"LoRA rank of {name} is {t.shape[0]}, adapter config says {spec.rank}"
                    )
                shapes[name] = (int(t.shape[1]), int(b.shape[0]))
        weights = cls(spec, shapes, device=device, dtype=dtype, init=False)
        with torch.no_grad():
            for i, name in enumerate(weights.names):
                weights.A[i].copy_(tensors[f"{head}{name}.lora_A.weight"])
                weights.B[i].copy_(tensors[f"{head}{name}.lora_B.weight"])
        weights.requires_grad_(False)
        return weights.eval()  # loaded to serve: no dropout on the LoRA path
